"""hyper_linear / HyperLinear: every backend against generate-then-batched_linear in float64 (the per-sample loop
reference of reference.py on weights sliced from F.linear(h, head_weight, head_bias)), forward and the gradients
of x, h, head_weight and head_bias; N = 1 and N > 1, with and without either bias, every activation and dtype;
the torch backend's bounded memory; the Triton backend's variants under the interpreter; the op layer (opcheck,
gradcheck, double backward, torch.compile, torch.func); bad inputs; the auto rule; GPU cases at real sizes."""
import itertools
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parameters_to_vector

import hyperkernels as hk
from conftest import (TRITON_DEVICE, TRITON_REASON, assert_compiles_without_graph_break, backend_params,
                      is_slow_path, needs_gpu, needs_triton, supports)
from hyperkernels import _dispatch
from hyperkernels._dispatch import GENERATE, HyperShape, resolve_backend
from hyperkernels.backends.torch import hyper_linear as torch_hyper
from hyperkernels.ops import hyper_linear_backward_op, hyper_linear_op
from reference import FORWARD_RTOL, GRAD_RTOL, assert_close, linear_reference

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import timing  # noqa: E402  (the benchmark's peak-memory measurement, shared with bench/hyper_crossover.py)

ACTIVATIONS = [None, "relu", "gelu", "silu", "tanh", "sigmoid", "sine"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]



def hyper_backend_params():
    """backend_params() without torch_conv: the torch backend has one hyper_linear, whatever its formulation."""
    return [p for p in backend_params() if p.values[0][0] != "torch_conv"]


# (B, N, in, out, K): B = 1, N = 1, sizes 1, odd sizes, tile edges (33 = 32 + 1) and K larger than in.
SHAPES = [
    (1, 1, 1, 1, 1),
    (3, 1, 17, 33, 5),
    (2, 5, 3, 4, 7),
    (4, 3, 33, 17, 16),
    (5, 17, 8, 3, 1),
    (2, 1, 100, 7, 33),
    (3, 64, 16, 16, 8),
]
# Interpreted Triton: the shapes that still cover B = 1, N = 1, size 1, masks at tile edges and odd sizes.
SMALL_SHAPES = [(1, 1, 1, 1, 1), (3, 1, 17, 33, 5), (2, 5, 3, 4, 7), (4, 3, 33, 17, 16)]


def _cases(shapes):
    """Every shape with every (bias, head bias) pair, activations cycled; then every activation x dtype on one
    shape with N = 1 and one with N > 1."""
    cases = []
    acts = itertools.cycle(ACTIVATIONS)
    for shape, (bias, head_bias) in itertools.product(shapes, itertools.product([True, False], repeat=2)):
        cases.append((shape, next(acts), torch.float32, bias, head_bias))
    for j, (act, dtype) in enumerate(itertools.product(ACTIVATIONS, DTYPES)):
        shape = (3, 1, 17, 33, 5) if j % 2 else (2, 5, 3, 4, 7)
        cases.append((shape, act, dtype, True, j % 3 != 0))
    return cases


def _case_id(case):
    (b, n, i, o, k), act, dtype, bias, head_bias = case
    return (f"B{b}N{n}I{i}O{o}K{k}-{act}-{str(dtype)[6:]}-{'bias' if bias else 'nobias'}-"
            f"{'headbias' if head_bias else 'noheadbias'}")


def make_leaves(b, n, i, o, k, bias, head_bias, x2d=False):
    """float64 leaves scaled so that the generated layer has unit-order pre-activations."""
    rows = o * i + (o if bias else 0)
    leaves = {
        "x": torch.randn((b, i) if x2d else (b, n, i), dtype=torch.float64),
        "h": torch.randn(b, k, dtype=torch.float64),
        "head_weight": torch.randn(rows, k, dtype=torch.float64) / (k * max(i, 1)) ** 0.5,
    }
    if head_bias:
        leaves["head_bias"] = torch.randn(rows, dtype=torch.float64) / max(i, 1) ** 0.5
    return leaves


def generate_reference(x, h, head_weight, head_bias, out_features, bias, activation, w0):
    """float64 generate-then-apply: F.linear, slice, and the loop reference of reference.py."""
    theta = F.linear(h, head_weight, head_bias)
    ow = out_features * x.shape[-1]
    weight = theta[:, :ow].unflatten(1, (out_features, x.shape[-1]))
    return linear_reference(x, weight, theta[:, ow:] if bias else None, activation, w0)


def run_case(case, backend, device, x2d=False, transform=None):
    (b, n, i, o, k), act, dtype, bias, head_bias = case
    if backend not in ("auto", "torch") and not supports(backend, device, dtype):
        pytest.skip(f"backend {backend} does not support {dtype} on {device}")
    leaves = make_leaves(b, n, i, o, k, bias, head_bias, x2d)
    low = {name: t.to(dtype).to(device).requires_grad_() for name, t in leaves.items()}
    ref = {name: t.to(dtype).double().requires_grad_() for name, t in leaves.items()}
    w0 = 30.0 if dtype in (torch.float32, torch.float64) else 1.5  # half precision: keep sin's argument exact-ish
    if act == "sine" and w0 == 30.0:
        for t in (low, ref):  # SIREN-style scale, so that w0 * z is O(1) and rounding is not amplified 30-fold
            t["head_weight"] = t["head_weight"] / w0
            if "head_bias" in t:
                t["head_bias"] = t["head_bias"] / w0
    view = transform or (lambda t: t)
    y = hk.hyper_linear(view(low["x"]), view(low["h"]), view(low["head_weight"]), low.get("head_bias"),
                        out_features=o, bias=bias, activation=act, w0=w0, backend=backend)
    y_ref = generate_reference(ref["x"], ref["h"], ref["head_weight"], ref.get("head_bias"), o, bias, act, w0)
    assert y.dtype == dtype and y.device.type == device and y.is_contiguous()
    assert y.shape == y_ref.shape
    assert_close(y, y_ref, FORWARD_RTOL[dtype], "forward")
    grad = torch.randn(y_ref.shape, dtype=torch.float64).to(dtype)
    names = list(leaves)
    grads = torch.autograd.grad(y, [low[name] for name in names], grad.to(device))
    grads_ref = torch.autograd.grad(y_ref, [ref[name] for name in names], grad.double())
    for name, g, r in zip(names, grads, grads_ref):
        assert_close(g, r, GRAD_RTOL[dtype], f"grad of {name}")


@pytest.mark.parametrize("backend_device", hyper_backend_params())
@pytest.mark.parametrize("case", _cases(SHAPES), ids=_case_id)
def test_matches_generate_then_batched_linear(backend_device, case):
    backend, device = backend_device
    if not hk._dispatch.implements(backend, "hyper_linear"):
        pytest.skip(f"backend {backend} has no hyper_linear")
    if is_slow_path(backend, device) and case[0] not in SMALL_SHAPES:
        pytest.skip("interpreted Triton on CPU: covered by the small shapes")
    run_case(case, backend, device)


@pytest.mark.parametrize("backend_device", hyper_backend_params())
@pytest.mark.parametrize("layout", ["x2d", "strided"])
def test_two_dim_x_and_strided_views(backend_device, layout):
    """x (B, in) returns (B, out); non-contiguous x, h and a transposed head_weight are read through strides."""
    backend, device = backend_device
    if not hk._dispatch.implements(backend, "hyper_linear"):
        pytest.skip(f"backend {backend} has no hyper_linear")
    case = ((3, 1, 9, 5, 6), "tanh", torch.float32, True, True)
    if layout == "x2d":
        run_case(case, backend, device, x2d=True)
    else:
        # A transposed copy (differentiable): the same values, read through strides (1, rows) for head_weight,
        # (1, B) for h, and x's innermost stride B*N.
        def transposed_copy(t):
            return t.mT.contiguous().mT if t.dim() == 2 else t.transpose(0, 2).contiguous().transpose(0, 2)

        run_case(case, backend, device, transform=transposed_copy)


@pytest.mark.parametrize("budget", ["one_row", "one_sample_in_parts", "several_samples"])
def test_torch_backend_chunks(monkeypatch, budget):
    """The torch backend's chunking: whole samples per chunk, and one sample cut along N, give the same result."""
    b, n, i, o, k = 5, 6, 4, 3, 7
    per_row = i * k * 8 * 2  # float64, backward's two temporaries
    monkeypatch.setattr(torch_hyper, "CHUNK_BYTES", {"one_row": 1, "one_sample_in_parts": 4 * per_row,
                                                      "several_samples": 13 * per_row}[budget])
    run_case(((b, n, i, o, k), "silu", torch.float64, True, True), "torch", "cpu")


def _peak_cpu_bytes(fn) -> int:
    """Peak of the bytes allocated and not yet freed during ``fn`` (the benchmark's own measurement)."""
    return timing.peak_bytes(fn, torch.device("cpu"))


def test_torch_backend_peak_memory_is_bounded():
    """B = 8192, 256x256 generated layers: generate-then-apply would hold B*out*in = 537M weights (2.1 GB) and
    their gradient; the torch backend's forward + backward stays under a tenth of that, and under its chunk
    budget plus the size of its inputs and outputs."""
    b, i, o, k = 8192, 256, 256, 4
    x = torch.randn(b, 1, i)
    h = torch.randn(b, k, requires_grad=True)
    head_weight = (torch.randn(o * i + o, k) / (i * k) ** 0.5).requires_grad_()
    head_bias = torch.zeros(o * i + o, requires_grad=True)

    def step():
        y = hk.hyper_linear(x, h, head_weight, head_bias, out_features=o, activation="relu", backend="torch")
        torch.autograd.grad(y, (h, head_weight, head_bias), torch.ones_like(y))

    peak = _peak_cpu_bytes(step)
    itemsize = x.element_size()
    assert peak < b * o * i * itemsize / 10, f"peak {peak / 2**20:.0f} MiB"
    io = (x.numel() + 4 * b * o + 2 * head_weight.numel() + 2 * b * k) * itemsize
    assert peak < torch_hyper.CHUNK_BYTES + io, f"peak {peak / 2**20:.0f} MiB"


# -- the op layer -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("n", [1, 2])
def test_gradcheck_and_gradgradcheck(activation, n):
    x = torch.randn(2, n, 3, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    head_weight = (torch.randn(2 * 3 + 2, 4, dtype=torch.float64) / 3).requires_grad_()
    head_bias = torch.randn(2 * 3 + 2, dtype=torch.float64, requires_grad=True)
    # squared: the first backward's grad_y then depends on the inputs too
    fn = lambda *a: hk.hyper_linear(*a, out_features=2, activation=activation, w0=2.0,  # noqa: E731
                                    backend="torch").square()
    assert torch.autograd.gradcheck(fn, (x, h, head_weight, head_bias))
    assert torch.autograd.gradgradcheck(fn, (x, h, head_weight, head_bias))


def test_gradgradcheck_without_biases_and_with_some_gradients():
    x = torch.randn(2, 3, 4, dtype=torch.float64)  # no grad: the first backward returns an empty dx
    h = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    head_weight = (torch.randn(3 * 4, 5, dtype=torch.float64) / 3).requires_grad_()
    fn = lambda h, w: hk.hyper_linear(x, h, w, out_features=3, bias=False, activation="tanh",  # noqa: E731
                                      backend="torch")
    assert torch.autograd.gradgradcheck(fn, (h, head_weight))


def _op_args(device, dtype=torch.float32, n=3, bias=True, head_bias=True):
    b, i, o, k = 3, 4, 5, 6
    rows = o * i + (o if bias else 0)
    x = torch.randn(b, n, i, device=device, dtype=dtype, requires_grad=True)
    h = torch.randn(b, k, device=device, dtype=dtype, requires_grad=True)
    # head_weight as a strided view: every other column of a wider buffer.
    head_weight = (torch.randn(rows, 2 * k, device=device, dtype=dtype) / 4)[:, ::2].detach().requires_grad_()
    hb = torch.randn(rows, device=device, dtype=dtype, requires_grad=True) if head_bias else None
    return x, h, head_weight, hb, o, bias


@pytest.mark.parametrize("backend_device", hyper_backend_params())
@pytest.mark.parametrize("activation, save_preact, n, biases", [
    ("none", False, 3, (True, True)), ("relu", False, 1, (True, False)), ("gelu", True, 3, (False, True)),
    ("sine", False, 1, (False, False)),
])
def test_opcheck(backend_device, activation, save_preact, n, biases):
    backend, device = backend_device
    if not hk._dispatch.implements(backend, "hyper_linear"):
        pytest.skip(f"backend {backend} has no hyper_linear")
    x, h, head_weight, hb, o, bias = _op_args(device, n=n, bias=biases[0], head_bias=biases[1])
    args = (x, h, head_weight, hb, o, bias, activation, 2.0, save_preact, backend)
    torch.library.opcheck(hyper_linear_op, args)
    y, preact = hyper_linear_op(*args)
    bargs = (torch.randn_like(y), x, h, head_weight, hb, y.detach(), preact.detach(), o, bias, activation, 2.0,
             [True, True, True, hb is not None], backend)
    torch.library.opcheck(hyper_linear_backward_op, bargs)


@pytest.mark.parametrize("backend_device", hyper_backend_params())
@pytest.mark.parametrize("mask", [(True, False, False, False), (False, True, False, False),
                                  (False, False, True, False), (False, False, False, True)],
                         ids=["dx", "dh", "dhead_weight", "dhead_bias"])
def test_backward_output_mask_and_preact_recompute(backend_device, mask):
    """Each gradient alone matches the full backward's; a forward without the pre-activation is recomputed."""
    backend, device = backend_device
    if not hk._dispatch.implements(backend, "hyper_linear"):
        pytest.skip(f"backend {backend} has no hyper_linear")
    x, h, head_weight, hb, o, bias = _op_args(device)
    y, preact = hyper_linear_op(x, h, head_weight, hb, o, bias, "silu", 1.0, False, backend)
    assert preact.numel() == 0
    dy = torch.randn_like(y)
    full = hyper_linear_backward_op(dy, x, h, head_weight, hb, y, preact, o, bias, "silu", 1.0, [True] * 4, backend)
    part = hyper_linear_backward_op(dy, x, h, head_weight, hb, y, preact, o, bias, "silu", 1.0, list(mask), backend)
    ref = torch.autograd.grad(torch_hyper.reference_forward(x, h, head_weight, hb, o, bias,
                                                            hk.activations.get_activation("silu"), 1.0),
                              (x, h, head_weight, hb), dy)
    for need, f, p, r in zip(mask, full, part, ref):
        assert_close(f, r, GRAD_RTOL[torch.float32])
        if need:
            torch.testing.assert_close(p, f)
        else:
            assert p.numel() == 0


@pytest.mark.parametrize("backend_device", hyper_backend_params())
def test_double_backward_matches_the_torch_backend(backend_device):
    backend, device = backend_device
    if not hk._dispatch.implements(backend, "hyper_linear"):
        pytest.skip(f"backend {backend} has no hyper_linear")
    results = []
    for be, dev in ((backend, device), ("torch", "cpu")):
        torch.manual_seed(1)
        x, h, head_weight, hb, o, bias = _op_args(dev)
        y = hk.hyper_linear(x, h, head_weight, hb, out_features=o, activation="gelu", backend=be)
        (gh,) = torch.autograd.grad(y.pow(2).sum(), h, create_graph=True)
        results.append([g.cpu() for g in torch.autograd.grad(gh.sum(), (x, head_weight, hb))])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _hyper_two_layers(x, h, w1, b1, w2, b2, backend):
    hidden = hk.hyper_linear(x, h, w1, b1, out_features=6, activation="relu", backend=backend)
    return hk.hyper_linear(hidden, h, w2, b2, out_features=2, activation="tanh", backend=backend)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_torch_compile_fullgraph_has_no_graph_break(backend):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    args = [torch.randn(3, 4, 5), torch.randn(3, 7), torch.randn(6 * 5 + 6, 7) / 6, torch.randn(6 * 5 + 6),
            torch.randn(2 * 6 + 2, 7) / 6, torch.randn(2 * 6 + 2)]
    fn = lambda *a: _hyper_two_layers(*a, backend=backend)  # noqa: E731
    assert_compiles_without_graph_break(fn, [a.to(device).requires_grad_() for a in args])


def test_torch_func_grad_and_vmap():
    """Under torch.func transforms hyper_linear runs as generate-then-apply in PyTorch (pytorch/pytorch#170834)."""
    x, h = torch.randn(3, 2, 4), torch.randn(3, 5)
    head_weight, head_bias = torch.randn(3 * 4 + 3, 5), torch.randn(3 * 4 + 3)
    loss = lambda w: hk.hyper_linear(x, h, w, head_bias, out_features=3, activation="gelu").square().sum()  # noqa
    g = torch.func.grad(loss)(head_weight)
    w_ = head_weight.clone().requires_grad_()
    loss(w_).backward()
    torch.testing.assert_close(g, w_.grad)
    y = torch.vmap(lambda x, h: hk.hyper_linear(x, h, head_weight, head_bias, out_features=3))(
        x.unsqueeze(1), h.unsqueeze(1))
    torch.testing.assert_close(y.squeeze(1), hk.hyper_linear(x, h, head_weight, head_bias, out_features=3))


def test_empty_batch():
    x, h = torch.randn(0, 7, 3, requires_grad=True), torch.randn(0, 5, requires_grad=True)
    head_weight = torch.randn(4 * 3 + 4, 5, requires_grad=True)
    head_bias = torch.randn(4 * 3 + 4, requires_grad=True)
    y = hk.hyper_linear(x, h, head_weight, head_bias, out_features=4)
    assert y.shape == (0, 7, 4)
    y.sum().backward()
    assert x.grad.shape == x.shape and h.grad.shape == h.shape
    assert torch.equal(head_weight.grad, torch.zeros_like(head_weight))
    assert torch.equal(head_bias.grad, torch.zeros_like(head_bias))


# -- the auto rule ------------------------------------------------------------------------------------------


# (B, N, in, out, K) and the way the cost model must pick on CPU for a training step. The issue's shape: a
# hypernetwork with a 100-wide hidden state generating Linear(100, 5), one point per sample, where the fused op
# forms (B, 100*100) products to save writing (B, 505) weights (bench/results/cpu_hyper_crossover.md: 2.5x slower).
CPU_CHOICES = [
    ((4096, 1, 100, 5, 100), GENERATE),      # the issue: out << K
    ((1024, 1, 64, 256, 16), "torch_bmm"),   # out >> K: the weights are 16x the products
    ((512, 1, 255, 257, 3), "torch_bmm"),    # odd sizes, K = 3: 3 products per input against 257 weights
    ((64, 64, 64, 64, 64), GENERATE),        # many points per sample: N times the fused FLOPs
    ((257, 16, 100, 5, 100), GENERATE),      # out << K and 16 points per sample
]


@pytest.mark.parametrize("shape, expected", CPU_CHOICES, ids=[str(s) for s, _ in CPU_CHOICES])
def test_auto_rule_cpu(shape, expected):
    """The CPU choices of the cost model on shapes that clearly favour one way (bench/results/
    cpu_hyper_crossover.md has the measured times)."""
    b, n, i, o, k = shape
    hyper = HyperShape(b, n, i, o, k, True, True, 4, True, False)
    got = resolve_backend("auto", op="hyper_linear", device=torch.device("cpu"), dtype=torch.float32, batch=b, n=n,
                          k=i, m=o, hyper=hyper)
    assert got == expected
    costs = _dispatch.hyper_linear_costs("torch_bmm", torch.device("cpu"), [hyper])
    faster = min(costs, key=lambda way: costs[way][0])
    assert (GENERATE if expected == GENERATE else "fused") == faster


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
    for way, forward in (("fused", fused), (GENERATE, generate)):
        measured, predicted = _peak_cpu_bytes(lambda: step(forward)), costs[way][1]
        assert abs(predicted / measured - 1) < 0.1, f"{way}: predicted {predicted / 2**20:.2f} MiB, " \
                                                   f"measured {measured / 2**20:.2f} MiB"


def test_auto_rule_ties_go_to_the_smaller_memory(monkeypatch):
    """Where the predicted times are within _HYPER_TIME_TIE, the way with the smaller predicted peak wins."""
    cpu, hyper = torch.device("cpu"), HyperShape(1024, 1, 64, 64, 64)
    costs = {"fused": (1.0, 10.0), GENERATE: (1.05, 5.0)}
    monkeypatch.setattr(_dispatch, "hyper_linear_costs", lambda *a: costs)
    assert _dispatch.choose_hyper_linear(cpu, torch.float32, [hyper]) == GENERATE
    costs["fused"] = (1.0, 4.0)
    assert _dispatch.choose_hyper_linear(cpu, torch.float32, [hyper]) == "torch_bmm"
    costs[GENERATE] = (1.2, 1.0)  # out of the tie: time decides
    costs["fused"] = (1.0, 10.0)
    assert _dispatch.choose_hyper_linear(cpu, torch.float32, [hyper]) == "torch_bmm"


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
        assert _dispatch.choose_hyper_linear(cuda, dtype, [one]) == "triton"
        assert _dispatch.choose_hyper_linear(cuda, dtype, [many]) == GENERATE
    # float64 has no Triton kernels: the torch backend's model, even on CUDA
    assert _dispatch.choose_hyper_linear(cuda, torch.float64, [HyperShape(1024, 1, 64, 256, 16, itemsize=8)]) \
        == "torch_bmm"


def test_auto_rule_needs_the_shape_and_named_backends_skip_it():
    common = dict(op="hyper_linear", device=torch.device("cpu"), dtype=torch.float32, batch=64, n=1, k=16, m=16)
    with pytest.raises(TypeError, match="needs hyper="):
        resolve_backend("auto", **common)
    assert resolve_backend("torch", **{**common, "n": 1000}) == "torch_bmm"


def test_auto_passes_the_shape_to_the_rule(monkeypatch):
    """hyper_linear hands the rule K, both biases, the itemsize and whether a backward (and x's gradient) is
    needed."""
    seen = []
    real = _dispatch.choose_hyper_linear
    monkeypatch.setattr(_dispatch, "choose_hyper_linear", lambda d, t, layers, impl=None: seen.extend(layers) or
                        real(d, t, layers, impl))
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
    run_case(case, "auto", "cpu")


# -- HyperLinear ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_hyper_linear_module(bias):
    layer = hk.nn.HyperLinear(8, 3, 4, bias=bias, activation="relu")
    target = nn.Linear(3, 4, bias=bias)
    assert layer.head.weight.shape == (4 * 3 + 4 * bias, 8)
    assert layer.layout == hk.ParamLayout.from_module(target)
    x, h = torch.randn(5, 7, 3), torch.randn(5, 8)
    params = layer.generate(h)
    assert params.shape == (5, layer.num_params)
    batched = hk.nn.BatchedLinear(3, 4, bias=bias, activation="relu")
    torch.testing.assert_close(layer(x, h), batched(x, params))
    # Row b of generate(h) is parameters_to_vector of the nn.Linear it stands for.
    torch.nn.utils.vector_to_parameters(params[2].detach(), target.parameters())
    torch.testing.assert_close(layer(x, h)[2], torch.relu(target(x[2])))
    assert torch.equal(parameters_to_vector(target.parameters()), params[2].detach())
    assert "cond_features=8, in_features=3, out_features=4" in repr(layer)


def test_hyper_linear_module_initialisation_matches_nn_linear_variance():
    layer = hk.nn.HyperLinear(64, 32, 32)
    theta = layer.generate(torch.randn(4096, 64))
    default_var = 1 / (3 * 32)  # nn.Linear(32, 32)'s default: uniform in +-1/sqrt(32)
    assert abs(theta[:, : 32 * 32].var().item() / default_var - 1) < 0.1
    assert abs(theta[:, 32 * 32 :].var().item() / default_var - 0.5) < 0.1  # biases: half, like HyperNetwork
    assert torch.equal(layer.head.bias, torch.zeros_like(layer.head.bias))


# -- bad inputs --------------------------------------------------------------------------------------------

X, H = torch.randn(4, 5, 3), torch.randn(4, 6)
G, GB = torch.randn(2 * 3 + 2, 6), torch.randn(2 * 3 + 2)


@pytest.mark.parametrize(
    "args, kwargs, exc, pattern",
    [
        ((torch.randn(4), H, G), {}, ValueError, r"x: expected shape \(B, in\) or \(B, N, in\), got 1-D"),
        ((X, torch.randn(4, 6, 1), G), {}, ValueError, r"h: expected shape \(B, K\), got 3-D shape \(4, 6, 1\)"),
        ((X, torch.randn(3, 6), G), {}, ValueError, r"h: expected batch size \(dim 0\) 4 \(x.shape\[0\]\), got 3"),
        ((X, H, torch.randn(9, 6)), {}, ValueError,
         r"head_weight: expected rows \(dim 0\) 8 \(out\*in \+ out = 2\*3 \+ 2, in = x.shape\[-1\], bias=True\), got 9"),
        ((X, H, G), {"bias": False}, ValueError, r"head_weight: expected rows \(dim 0\) 6 \(out\*in = 2\*3.*bias=False\)"),
        ((X, H, torch.randn(8, 5)), {}, ValueError, r"head_weight: expected columns \(dim 1\) 6 \(K = h.shape\[1\]\), got 5"),
        ((X, H, G.unsqueeze(0)), {}, ValueError, r"head_weight: expected shape \(out\*in \+ out\*bias, K\), got 3-D"),
        ((X, H, G, torch.randn(7)), {}, ValueError, r"head_bias: expected shape \(8,\) \(the rows of head_weight\), got \(7,\)"),
        ((X, H, G, GB.double()), {}, TypeError, r"head_bias: expected dtype torch.float32 \(the dtype of x\), got torch.float64"),
        ((X, H.half(), G), {}, TypeError, r"h: expected dtype torch.float32 \(the dtype of x\), got torch.float16"),
        ((X, H, G.to("meta")), {}, ValueError, r"head_weight: expected device cpu \(the device of x\), got meta"),
        ((X, H.long(), G), {}, TypeError, r"h: expected a floating dtype .* got torch.int64"),
        ((X, H, G.numpy()), {}, TypeError, r"head_weight: expected a Tensor .* got ndarray"),
        ((X, H, G), {"out_features": 0}, ValueError, r"out_features: expected a positive int, got 0"),
        ((X, H, G), {"out_features": 2.0}, TypeError, r"out_features: expected a positive int, got float 2.0"),
        ((X, H, G), {"bias": 1}, TypeError, r"bias: expected a bool .* got 1"),
        ((X, H, G), {"activation": "swish"}, ValueError, r"activation: expected None or one of"),
        ((X, H, G), {"backend": "tpu"}, ValueError, r"backend: expected one of"),
        ((X, H, G), {"w0": "30"}, TypeError, r"w0: expected a finite float"),
    ],
)
def test_bad_input(args, kwargs, exc, pattern):
    kwargs = {"out_features": 2, **kwargs}
    with pytest.raises(exc, match=pattern):
        hk.hyper_linear(*args, **kwargs)


def test_backend_without_hyper_linear_says_which_do():
    reasons = hk.available_backends()
    if reasons.get("cuda") is not None or hk._dispatch.implements("cuda", "hyper_linear"):
        pytest.skip("needs the cuda backend available and without hyper_linear")
    with pytest.raises(ValueError, match=r"backend='cuda' does not implement hyper_linear; available backends that do"):
        hk.hyper_linear(X.cuda(), H.cuda(), G.cuda(), out_features=2, backend="cuda")


def test_float64_on_triton_is_a_clear_error():
    if TRITON_REASON is not None:
        pytest.skip(f"backend triton unavailable: {TRITON_REASON}")
    with pytest.raises(ValueError, match=r"backend='triton' cannot run hyper_linear here: float64"):
        hk.hyper_linear(X.double().to(TRITON_DEVICE), H.double().to(TRITON_DEVICE), G.double().to(TRITON_DEVICE),
                        out_features=2, backend="triton")


# -- Triton backend specifics (interpreter on CPU) -----------------------------------------------------------


def _triton_module():
    from hyperkernels.backends.triton import hyper_linear

    return hyper_linear


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("n", [1, 4])
def test_triton_half_precision(dtype, n):
    run_case(((3, n, 9, 17, 5), "gelu", dtype, True, True), "triton", TRITON_DEVICE)


@needs_triton
def test_triton_split_dg_reduction(monkeypatch):
    """The dG kernel split over slices of the rows (float32 partial sums added after) gives the same gradients.
    On a GPU it splits by itself when the output has few tiles; here it is told to."""
    monkeypatch.setattr(_triton_module(), "_dg_splits", lambda *args: 3)
    run_case(((3, 100, 5, 4, 6), "relu", torch.float32, True, True), "triton", TRITON_DEVICE)  # 300 rows: 128+128+44


@needs_triton
def test_triton_int64_offsets(monkeypatch):
    """The INDEX64 variants (a head spanning 2^31 elements) compute the same as the int32 ones: forced by
    lowering the threshold."""
    monkeypatch.setattr(_triton_module(), "_INT32_MAX", 8)
    run_case(((3, 2, 5, 4, 6), "tanh", torch.float32, True, True), "triton", TRITON_DEVICE)


@needs_triton
def test_triton_expanded_grad_and_shared_h():
    """y.sum().backward() hands the backward an all-stride-0 gradient; h expanded from one row has batch stride 0."""
    x, h0, head_weight0 = torch.randn(4, 3, 5), torch.randn(1, 6), torch.randn(4 * 5 + 4, 6) / 5
    grads = []
    for backend, device in (("triton", TRITON_DEVICE), ("torch_bmm", "cpu")):
        h, head_weight = h0.to(device).requires_grad_(), head_weight0.to(device).requires_grad_()
        y = hk.hyper_linear(x.to(device), h.expand(4, 6), head_weight, out_features=4, activation="sigmoid",
                            backend=backend)
        grads.append([g.cpu() for g in torch.autograd.grad(y.sum(), (h, head_weight))])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("r, c, pq", [(16384, 256, 32768), (16384, 128, 256), (3, 5, 7), (100000, 16, 1)])
@pytest.mark.parametrize("elem", [2, 4])
def test_triton_prune_keeps_fitting_configs(r, c, pq, elem):
    """The GPU config lists, pruned for a few problem sizes (pure Python: runs on any machine)."""
    if TRITON_REASON is not None and "not installed" in TRITON_REASON:
        pytest.skip(TRITON_REASON)
    from hyperkernels.backends.triton import linear

    hl = _triton_module()

    class _Like:
        def element_size(self):
            return elem

    for roles in (("BLOCK_R", "BLOCK_C", "BLOCK_J"), ("BLOCK_C", "BLOCK_J", "BLOCK_R")):
        dims = {"BLOCK_R": "R", "BLOCK_C": "C", "BLOCK_J": "PQ"}
        prune = linear._gemm_prune(*roles, dims, "g_ptr")
        kept = prune(hl._configs(*roles, interpret=False), {"R": r, "C": c, "PQ": pq, "g_ptr": _Like()})
        assert 1 <= len(kept) <= len(hl._TILES)
        for cfg in kept:
            kw = cfg.kwargs
            assert cfg.num_stages * (kw[roles[0]] + kw[roles[1]]) * kw[roles[2]] * elem <= linear._SMEM_BUDGET


# -- GPU, real sizes -----------------------------------------------------------------------------------------


def _gpu_problem(b, n, i, o, k, dtype):
    torch.manual_seed(0)
    x = torch.randn(b, n, i, device="cuda", dtype=dtype)
    h = torch.randn(b, k, device="cuda", dtype=dtype, requires_grad=True)
    head_weight = (torch.randn(o * i + o, k, device="cuda") / (i * k) ** 0.5).to(dtype).requires_grad_()
    head_bias = (torch.randn(o * i + o, device="cuda") / i**0.5).to(dtype).requires_grad_()
    return x, h, head_weight, head_bias


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_gpu_issue_shape_matches_generate(dtype):
    """The issue's shape, B = 16384, K = 128, 256x256, N = 1: triton against generate-then-bmm in float64 on a
    slice of samples (the float64 generate of all 16384 would need 4.3 GB x 2)."""
    b, n, i, o, k = 16384, 1, 256, 256, 128
    x, h, head_weight, head_bias = _gpu_problem(b, n, i, o, k, dtype)
    y = hk.hyper_linear(x, h, head_weight, head_bias, out_features=o, activation="relu", backend="triton")
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (h, head_weight, head_bias), dy)
    idx = slice(b - 512, b)  # the last samples: the largest offsets
    refs = [t.detach().double().requires_grad_() for t in (x[idx], h[idx], head_weight, head_bias)]
    y_ref = torch_hyper.reference_forward(*refs, o, True, hk.activations.get_activation("relu"), 30.0)
    assert_close(y[idx], y_ref, FORWARD_RTOL[dtype], "forward")
    ref_grads = torch.autograd.grad(y_ref, refs[1:], dy[idx].double())
    assert_close(grads[0][idx], ref_grads[0], GRAD_RTOL[dtype], "grad of h")
    # head gradients sum over all samples: compare against the float64 torch backend on all of them
    full = [t.detach().double().requires_grad_() for t in (x, h, head_weight, head_bias)]
    y64 = hk.hyper_linear(*full, out_features=o, activation="relu", backend="torch")
    g64 = torch.autograd.grad(y64, full[2:], dy.double())
    assert_close(grads[1], g64[0], GRAD_RTOL[dtype], "grad of head_weight")
    assert_close(grads[2], g64[1], GRAD_RTOL[dtype], "grad of head_bias")


@needs_gpu
def test_gpu_peak_memory_against_generate():
    """At the issue's shape the fused forward + backward allocates under a tenth of generate-then-bmm's peak."""
    b, n, i, o, k = 16384, 1, 256, 256, 128
    x, h, head_weight, head_bias = _gpu_problem(b, n, i, o, k, torch.bfloat16)

    def peak(fn):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        y = fn()
        torch.autograd.grad(y, (h, head_weight, head_bias), torch.ones_like(y))
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    fused = peak(lambda: hk.hyper_linear(x, h, head_weight, head_bias, out_features=o, backend="triton"))
    generated = peak(lambda: hk.batched_linear(x, *torch_hyper.generate(h, head_weight, head_bias, o, i, True)))
    assert fused * 10 < generated, (fused, generated)


@needs_gpu
@pytest.mark.parametrize("n", [1, 3])
def test_gpu_batch_of_2_20_does_not_overflow_the_grid(n):
    b, i, o, k = 2**20, 16, 16, 8
    x, h, head_weight, head_bias = _gpu_problem(b, n, i, o, k, torch.float32)
    y = hk.hyper_linear(x, h, head_weight, head_bias, out_features=o, activation="silu", backend="triton")
    idx = slice(b - 64, b)
    refs = [t.detach().double() for t in (x[idx], h[idx], head_weight, head_bias)]
    y_ref = torch_hyper.reference_forward(*refs, o, True, hk.activations.get_activation("silu"), 30.0)
    assert_close(y[idx], y_ref, FORWARD_RTOL[torch.float32], "forward")


def _mlp_target_layers(sizes, batch, n, cond, mlp_op):
    """A target MLP's generated layers as HyperNetwork hands them to the rule (x of the first needs no gradient)."""
    return [HyperShape(batch, n, i, o, cond, True, True, 4, True, j > 0, mlp_op)
            for j, (i, o) in enumerate(zip(sizes[:-1], sizes[1:]))]


# (sizes, B, N, K, what fused=None should pick): measured in bench/results/cpu_hyper_crossover.md, table 3.
WHOLE_TARGETS = [
    ([16, 64, 64, 16], 256, 1, 128, GENERATE),   # bench/cases_training.py's "MLP N=1" row: fused was 1.8x slower
    ([16, 64, 64, 16], 1024, 1, 128, GENERATE),
    ([2, 100, 5], 4096, 1, 100, GENERATE),
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
    assert as_op[GENERATE][0] < per_layer[GENERATE][0]
    assert _dispatch.choose_hyper_linear(cpu, torch.float32, _mlp_target_layers(sizes, b, n, k, True)) == expected
    if sizes == [16, 64, 64, 16] and b == 256:
        assert _dispatch.choose_hyper_linear(cpu, torch.float32, _mlp_target_layers(sizes, b, n, k, False)) \
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
    predicted = _dispatch.hyper_linear_costs("torch_bmm", torch.device("cpu"), shapes)[GENERATE][1]
    measured = _peak_cpu_bytes(step)
    assert abs(predicted / measured - 1) < 0.2, f"predicted {predicted / 2**20:.2f} MiB, measured " \
                                                f"{measured / 2**20:.2f} MiB"
