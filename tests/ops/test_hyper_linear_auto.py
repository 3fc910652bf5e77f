"""hyper_linear's backend="auto": the cost model's choice between the fused op and generate-then-apply (CPU
choices, ties, the GPU model, the shape it is given, whole MLP targets) and its memory model against the CPU
allocator's peak; where auto generates, results and gradients are those of the fused op."""
import pytest
import torch

import hyperkernels as hk
from conftest import TRITON_REASON, bench_module, run_hyper_linear_case
from hyperkernels import _dispatch
from hyperkernels._dispatch import HyperShape, resolve_backend
from hyperkernels.ops.hyper_linear import hyper_linear_way
from hyperkernels.backends.torch import hyper_linear as torch_hyper

timing = bench_module("timing")  # the benchmark's peak-memory measurement, shared with bench/hyper_crossover.py

def hyper_linear_choice(device, dtype, layers, impl=None):
    """What hyper_linear's "auto" runs ``layers`` with: "generate", or the backend that runs them fused."""
    if _dispatch.generate_is_better(device, dtype, layers, impl):
        return "generate"
    return impl or resolve_backend("auto", op="hyper_linear", device=device, dtype=dtype)



def _peak_cpu_bytes(fn) -> int:
    """Peak of the bytes allocated and not yet freed during ``fn`` (the benchmark's own measurement)."""
    return timing.peak_bytes(fn, torch.device("cpu"))


# (B, N, in, out, K) and the way the cost model must pick on CPU for a training step. The first: a
# hypernetwork with a 100-wide hidden state generating Linear(100, 5), one point per sample, where the fused op
# forms (B, 100*100) products to save writing (B, 505) weights (bench/results/cpu_hyper_crossover.md: 2.5x slower).
CPU_CHOICES = [
    ((4096, 1, 100, 5, 100), "generate"),    # out << K
    ((1024, 1, 64, 256, 16), "torch_bmm"),   # out >> K: the weights are 16x the products
    ((512, 1, 255, 257, 3), "torch_bmm"),    # odd sizes, K = 3: 3 products per input against 257 weights
    ((64, 64, 64, 64, 64), "generate"),      # many points per sample: N times the fused FLOPs
    ((257, 16, 100, 5, 100), "generate"),    # out << K and 16 points per sample
]


@pytest.mark.parametrize("shape, expected", CPU_CHOICES, ids=[str(s) for s, _ in CPU_CHOICES])
def test_auto_rule_cpu(shape, expected):
    """The CPU choices of the cost model on shapes that clearly favour one way (bench/results/
    cpu_hyper_crossover.md has the measured times)."""
    b, n, i, o, k = shape
    hyper = HyperShape(b, n, i, o, k, True, True, 4, True, False)
    assert hyper_linear_choice(torch.device("cpu"), torch.float32, [hyper]) == expected
    costs = _dispatch.hyper_linear_costs("torch_bmm", torch.device("cpu"), [hyper])
    faster = min(costs, key=lambda way: costs[way][0])
    assert ("generate" if expected == "generate" else "fused") == faster


@pytest.mark.parametrize("shape", [(512, 1, 100, 5, 100), (96, 3, 64, 64, 64), (64, 2, 33, 257, 16)])
@pytest.mark.parametrize("x_grad", [False, True])
def test_auto_rule_memory_model_matches_the_allocator(shape, x_grad):
    """The cost model's peak memory of each way, against the bytes the CPU allocator really holds at the peak
    of a training step (torch.profiler): within 10% (the time side is checked by bench/hyper_crossover.py)."""
    b, n, i, o, k = shape
    x = torch.randn(b, n, i, requires_grad=x_grad)
    h = torch.randn(b, k, requires_grad=True)
    head_weight = (torch.randn(o * i + o, k) / (i * k) ** 0.5).requires_grad_()
    head_bias = torch.zeros(o * i + o, requires_grad=True)
    wrt = (x, h, head_weight, head_bias) if x_grad else (h, head_weight, head_bias)

    def fused():
        return hk.hyper_linear(x, h, head_weight, head_bias, out_features=o, activation="relu", backend="torch")

    def generate():  # the generated weights are held by autograd alone, as inside hyper_linear's generate path
        w, c = torch_hyper.generate(h, head_weight, head_bias, o, i, True)
        return hk.batched_linear(x, w, c, activation="relu")

    def step(forward):
        y = forward()
        torch.autograd.grad(y, wrt, torch.ones_like(y))

    costs = _dispatch.hyper_linear_costs("torch_bmm", torch.device("cpu"),
                                         [HyperShape(b, n, i, o, k, True, True, 4, True, x_grad)])
    for way, forward in (("fused", fused), ("generate", generate)):
        measured, predicted = _peak_cpu_bytes(lambda: step(forward)), costs[way][1]
        assert abs(predicted / measured - 1) < 0.1, f"{way}: predicted {predicted / 2**20:.2f} MiB, " \
                                                   f"measured {measured / 2**20:.2f} MiB"


def test_auto_rule_ties_go_to_the_smaller_memory(monkeypatch):
    """Where the predicted times are within _HYPER_TIME_TIE, the way with the smaller predicted peak wins."""
    cpu, hyper = torch.device("cpu"), HyperShape(1024, 1, 64, 64, 64)
    costs = {"fused": (1.0, 10.0), "generate": (1.05, 5.0)}
    monkeypatch.setattr(_dispatch, "hyper_linear_costs", lambda *a: costs)
    assert _dispatch.generate_is_better(cpu, torch.float32, [hyper])
    costs["fused"] = (1.0, 4.0)
    assert not _dispatch.generate_is_better(cpu, torch.float32, [hyper])
    costs["generate"] = (1.2, 1.0)  # out of the tie: time decides
    costs["fused"] = (1.0, 10.0)
    assert not _dispatch.generate_is_better(cpu, torch.float32, [hyper])


def test_auto_rule_gpu_model():
    """CUDA: the same model with the design's (unmeasured) prices; the Triton kernels form the products in
    registers, so at N = 1 they write nothing of size B*in*K and win; at many points per sample, generate. The rule
    needs no GPU to be checked: it looks at the device type, the dtype and the shape."""
    if TRITON_REASON is not None:
        pytest.skip(f"backend triton unavailable: {TRITON_REASON}")
    cuda = torch.device("cuda")
    for dtype, itemsize in ((torch.bfloat16, 2), (torch.float32, 4)):
        one = HyperShape(16384, 1, 256, 256, 128, itemsize=itemsize)
        many = HyperShape(4096, 256, 256, 256, 128, itemsize=itemsize)
        assert hyper_linear_choice(cuda, dtype, [one]) == "triton"
        assert hyper_linear_choice(cuda, dtype, [many]) == "generate"
    # float64 has no Triton kernels: the torch backend's model, even on CUDA
    assert hyper_linear_choice(cuda, torch.float64, [HyperShape(1024, 1, 64, 256, 16, itemsize=8)]) \
        == "torch_bmm"


def test_named_backends_skip_the_auto_rule():
    """A named backend runs hyper_linear fused even where "auto" would generate (here: out << K)."""
    cpu, layers = torch.device("cpu"), [HyperShape(4096, 1, 100, 5, 100)]
    assert hyper_linear_way("auto", cpu, torch.float32, layers, may_generate=True).generate
    assert hyper_linear_way("torch", cpu, torch.float32, layers, may_generate=False) == (False, "torch_bmm")
    assert resolve_backend("torch", op="hyper_linear", device=cpu, dtype=torch.float32) == "torch_bmm"


def test_auto_passes_the_shape_to_the_rule(monkeypatch):
    """hyper_linear hands the rule K, both biases, the itemsize and whether a backward (and x's gradient) is
    needed."""
    seen = []
    real = _dispatch.generate_is_better
    monkeypatch.setattr(hk.ops.hyper_linear, "generate_is_better", lambda d, t, layers, impl=None: seen.extend(layers)
                        or real(d, t, layers, impl))
    x, h = torch.randn(3, 5, 4, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    head_weight = torch.randn(2 * 4, 7, dtype=torch.float64)
    hk.hyper_linear(x, h, head_weight, out_features=2, bias=False)
    with torch.no_grad():
        hk.hyper_linear(x.requires_grad_(), h, head_weight, out_features=2, bias=False)
    assert seen == [HyperShape(3, 5, 4, 2, 7, False, False, 8, True, False),
                    HyperShape(3, 5, 4, 2, 7, False, False, 8, False, False)]


def test_auto_generate_path_matches_fused():
    """Where "auto" generates, results and gradients are those of the fused op."""
    case = ((3, 6, 5, 4, 7), "sigmoid", torch.float32, True, True)
    run_hyper_linear_case(case, "auto", "cpu")


def _mlp_target_layers(sizes, batch, n, cond, mlp_op):
    """A target MLP's generated layers as HyperNetwork hands them to the rule (x of the first needs no gradient)."""
    return [HyperShape(batch, n, i, o, cond, True, True, 4, True, j > 0, mlp_op)
            for j, (i, o) in enumerate(zip(sizes[:-1], sizes[1:]))]


# (sizes, B, N, K, what fused=None should pick): measured in bench/results/cpu_hyper_crossover.md, table 3.
WHOLE_TARGETS = [
    ([16, 64, 64, 16], 256, 1, 128, "generate"),   # bench/cases_training.py's "MLP N=1" row: fused was 1.8x slower
    ([16, 64, 64, 16], 1024, 1, 128, "generate"),
    ([2, 100, 5], 4096, 1, 100, "generate"),
    ([32, 256, 256, 32], 512, 1, 32, "torch_bmm"),  # wide layers from a narrow trunk: the fused head, 3x faster
]


@pytest.mark.parametrize("sizes, b, n, k, expected", WHOLE_TARGETS, ids=[str(t[:4]) for t in WHOLE_TARGETS])
def test_auto_rule_prices_generate_as_one_mlp_op_over_a_whole_target(sizes, b, n, k, expected):
    """Generate-then-apply runs a target's run of nn.Linear layers as one batched_mlp op, whose backward writes
    each dW once, untransposed, into one (B, P) gradient: priced so (mlp_op), generating costs less than the same
    layers run as lone batched_linear ops, and the rule picks the way measured faster. Priced per layer, the first
    target went fused (a tie on time, then the smaller memory), measured 1.8x slower."""
    cpu = torch.device("cpu")
    as_op = _dispatch.hyper_linear_costs("torch_bmm", cpu, _mlp_target_layers(sizes, b, n, k, True))
    per_layer = _dispatch.hyper_linear_costs("torch_bmm", cpu, _mlp_target_layers(sizes, b, n, k, False))
    assert as_op["fused"] == per_layer["fused"]
    assert as_op["generate"][0] < per_layer["generate"][0]
    assert hyper_linear_choice(cpu, torch.float32, _mlp_target_layers(sizes, b, n, k, True)) == expected
    if sizes == [16, 64, 64, 16] and b == 256:
        assert hyper_linear_choice(cpu, torch.float32, _mlp_target_layers(sizes, b, n, k, False)) \
            == "torch_bmm"
    one = _mlp_target_layers(sizes, b, n, k, True)[0]
    forward_only = HyperShape(**{**vars(one), "grad": False})
    assert _dispatch.generate_work(forward_only) == _dispatch.generate_work(HyperShape(**{**vars(forward_only),
                                                                                        "mlp_op": False}))


@pytest.mark.parametrize("sizes, b, n, k", [([16, 64, 64, 16], 256, 1, 128), ([3, 33, 17, 5], 96, 3, 40),
                                            ([2, 100, 5], 512, 1, 100)])
def test_auto_rule_memory_model_of_a_whole_generated_target(sizes, b, n, k):
    """The predicted peak of generating a whole MLP target (the head's GEMM, then the batched_mlp op), against the
    CPU allocator's during a training step: within 20%."""
    layers = []
    for j, (i, o) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [torch.nn.Linear(i, o)] + ([torch.nn.ReLU()] if j < len(sizes) - 2 else [])
    hnet = hk.nn.HyperNetwork(torch.nn.Sequential(*layers), 8, hidden=(k,))
    x = torch.rand(b, sizes[0]) if n == 1 else torch.rand(b, n, sizes[0])
    h = torch.randn(b, k, requires_grad=True)
    wrt = (h, hnet.head.weight, hnet.head.bias)

    def step():
        y = hnet.target(x, torch.nn.functional.linear(h, hnet.head.weight, hnet.head.bias))
        torch.autograd.grad(y, wrt, torch.ones_like(y))

    shapes = hnet._hyper_layers(x)
    assert all(s.mlp_op for s in shapes)
    predicted = _dispatch.hyper_linear_costs("torch_bmm", torch.device("cpu"), shapes)["generate"][1]
    measured = _peak_cpu_bytes(step)
    assert abs(predicted / measured - 1) < 0.2, f"predicted {predicted / 2**20:.2f} MiB, measured " \
                                                f"{measured / 2**20:.2f} MiB"
