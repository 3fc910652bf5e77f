"""hk.nn.batched on its kernel layers (nn.Linear, 1x1 convs, the fused activations): every layer kind, activation,
dtype, N, flat and dict params and shared parameters, against vmap(functional_call(module, ...)) on the same
parameters (in float64); the fused-MLP plan; bad input. Everything else that batched() runs per sample through
vmap is in test_batched_models.py."""
import copy
import importlib
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from torch.nn.utils import parameters_to_vector

import hyperkernels as hk
from conftest import INTERPRETED
from reference import FORWARD_RTOL, GRAD_RTOL, assert_close

# the module, not the function hk.nn.batched that shadows it as an attribute of hk.nn
batched_module = importlib.import_module("hyperkernels.nn.batched")
plan_module = importlib.import_module("hyperkernels.nn._plan")

ACT_MODULES = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
               "identity": nn.Identity, "sine": lambda: hk.nn.Sine(30.0)}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def mlp(act, out_act, sizes=(3, 17, 33, 2), bias=True):
    layers = []
    for i, (k, m) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(k, m, bias=bias), ACT_MODULES[act if i < len(sizes) - 2 else out_act]()]
    return nn.Sequential(*layers)


# name -> (module factory, one sample's input shape, shared names)
MODULES = {
    "linear": (lambda: nn.Linear(5, 3), (5,), ()),
    "linear-nobias": (lambda: nn.Linear(5, 3, bias=False), (5,), ()),
    "mlp": (lambda: mlp("relu", "identity"), (3,), ()),
    "mlp-nobias": (lambda: mlp("tanh", "sigmoid", bias=False), (3,), ()),
    "conv1d": (lambda: nn.Conv1d(4, 6, 1), (4, 7), ()),
    "conv2d-seq": (lambda: nn.Sequential(nn.Conv2d(4, 8, 1), nn.SiLU(), nn.Conv2d(8, 3, (1, 1), bias=False)),
                   (4, 3, 5), ()),
    "conv3d": (lambda: nn.Conv3d(3, 5, 1, padding="valid"), (3, 2, 3, 2), ()),
    "conv2d-batched-input": (lambda: nn.Sequential(nn.Conv2d(4, 6, 1), nn.GELU()), (2, 4, 3, 3), ()),
    "conv-then-linear": (lambda: nn.Sequential(nn.Conv1d(4, 8, 1), nn.ReLU(), nn.Linear(6, 5)), (4, 6), ()),
    "standalone-activations": (lambda: nn.Sequential(nn.Tanh(), nn.Linear(3, 4), nn.ReLU(), nn.Sigmoid(),
                                                     nn.Identity(), nn.Linear(4, 2)), (3,), ()),
    "nested": (lambda: nn.Sequential(nn.Sequential(nn.Linear(3, 8), nn.GELU()),
                                     nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 2))), (3,), ()),
    "mixed-activations": (lambda: nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(),
                                                nn.Linear(8, 8), nn.SiLU(), nn.Linear(8, 8), nn.SiLU(),
                                                nn.Linear(8, 2)), (3,), ()),
    "siren-two-w0": (lambda: nn.Sequential(nn.Linear(2, 16), hk.nn.Sine(30.0), nn.Linear(16, 16), hk.nn.Sine(1.0),
                                           nn.Linear(16, 3)), (2,), ()),
    "shared-middle-weight": (lambda: mlp("relu", "identity", (3, 8, 8, 8, 2)), (3,), ("2.weight",)),
    "shared-first-bias": (lambda: mlp("gelu", "tanh"), (3,), ("0.bias",)),
    "shared-last-layer": (lambda: mlp("silu", "identity", (3, 8, 8, 2)), (3,), ("4.weight", "4.bias")),
    "shared-conv-weight": (lambda: nn.Sequential(nn.Conv2d(4, 8, 1), nn.ReLU(), nn.Conv2d(8, 3, 1)), (4, 3, 3),
                           ("0.weight",)),
}


def per_sample_params(layout, batch, dtype, scale=1.0):
    """B default-like initialisations: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) per layer, times scale."""
    out = {}
    fan_in = None
    for name, shape in layout.shapes.items():
        if name.endswith("weight"):
            fan_in = math.prod(shape[1:])
        bound = scale / math.sqrt(fan_in or shape[0])
        out[name] = ((torch.rand(batch, *shape, dtype=torch.float64) * 2 - 1) * bound).to(dtype)
    return out


def vmap_reference(module, x, params, shared, grad_y):
    """vmap(functional_call(module)) in float64: y, dx, dparams (dict), dshared (dict)."""
    m = copy.deepcopy(module).double()
    ps = {k: v.detach().double().requires_grad_() for k, v in params.items()}
    sh = {k: v.detach().double().requires_grad_() for k, v in shared.items()}
    xx = x.detach().double().requires_grad_()
    y = vmap(lambda p, xb: functional_call(m, {**p, **sh}, (xb,)))(ps, xx)
    y.backward(grad_y.double())
    return y.detach(), xx.grad, {k: v.grad for k, v in ps.items()}, {k: v.grad for k, v in sh.items()}


def run_case(name, *, dtype=torch.float32, batch=3, n=None, params_kind="flat", backend="auto", module=None):
    factory, in_shape, shared = MODULES[name] if module is None else module
    torch.manual_seed(0)
    template = factory()
    net = hk.nn.batched(template, shared=shared, backend=backend).to(dtype)
    low = dtype in (torch.float16, torch.bfloat16)
    if low and any(isinstance(m, hk.nn.Sine) for m in template.modules()):
        pytest.skip("sin(30 z) in half precision: the error is amplified 30-fold, see test_mlp's w0=1.5 cases")
    sine = any(isinstance(m, hk.nn.Sine) for m in template.modules())
    params = per_sample_params(net.layout, batch, dtype, scale=1 / 30 if sine else 1.0)
    x_shape = (batch, *([] if n is None else [n] if isinstance(n, int) else list(n)), *in_shape)
    x = torch.randn(x_shape, dtype=torch.float64).to(dtype).requires_grad_()
    if params_kind in ("flat", "views"):  # "views": a dict of views of one flat tensor
        flat = net.layout.flatten(params).requires_grad_()
        given = flat if params_kind == "flat" else net.layout.unflatten(flat)
    else:
        given = {k: v.requires_grad_() for k, v in params.items()}
    y = net(x, given)
    grad_y = torch.randn(y.shape, dtype=torch.float64)
    y.backward(grad_y.to(dtype))
    shared_vals = {k: p.detach() for k, p in net.shared_parameters().items()}
    y_ref, dx_ref, dp_ref, dsh_ref = vmap_reference(template, x, params, shared_vals, grad_y)
    depth = sum(isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) for m in template.modules()) + 1
    assert y.shape == y_ref.shape and y.dtype == dtype
    assert_close(y, y_ref, FORWARD_RTOL[dtype] * depth, "forward")
    assert_close(x.grad, dx_ref, GRAD_RTOL[dtype] * depth, "dx")
    flat_grad = params_kind in ("flat", "views")
    dparams = net.layout.unflatten(flat.grad) if flat_grad else {k: v.grad for k, v in given.items()}
    for k in params:
        assert_close(dparams[k], dp_ref[k], GRAD_RTOL[dtype] * depth, f"d{k}")
    for k, p in net.shared_parameters().items():
        assert_close(p.grad, dsh_ref[k], GRAD_RTOL[dtype] * depth, f"d shared {k}")
    return net


@pytest.mark.parametrize("params_kind", ["flat", "dict"])
@pytest.mark.parametrize("name", list(MODULES))
def test_matches_vmap_functional_call(name, params_kind):
    run_case(name, params_kind=params_kind, n=None if "conv" in name else 4)


@pytest.mark.parametrize("n", [None, 1, 5, (2, 3)], ids=["N=1 (B, in)", "N=1 (B, 1, in)", "N=5", "N=(2,3)"])
@pytest.mark.parametrize("name", ["linear", "mlp", "standalone-activations", "shared-middle-weight"])
def test_points_per_sample(name, n):
    run_case(name, n=n)


@pytest.mark.parametrize("out_act", list(ACT_MODULES))
@pytest.mark.parametrize("act", list(ACT_MODULES))
def test_every_activation_pair(act, out_act):
    run_case(None, module=(lambda: mlp(act, out_act), (3,), ()), n=5)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("name", ["linear", "mlp", "conv2d-seq", "mixed-activations", "shared-middle-weight",
                                  "conv-then-linear"])
def test_dtypes(name, dtype):
    run_case(name, dtype=dtype, n=None if "conv" in name else 5)


@pytest.mark.parametrize("act", ["relu", "gelu", "silu", "tanh", "sigmoid", "identity"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_low_precision_activations(act, dtype):
    run_case(None, module=(lambda: mlp(act, "identity"), (3,), ()), dtype=dtype, n=5)


def test_batch_of_one():
    run_case("mlp", batch=1, n=7)
    run_case("shared-conv-weight", batch=1)


def test_layer_by_layer_path_matches(monkeypatch):
    """A backend without a fused MLP (or where it would be the plain composition) runs the same runs layer by
    layer, with the same result."""
    monkeypatch.setattr(batched_module, "fused_mlp_worth_it", lambda *args: False)
    for name in ["mlp", "mixed-activations", "siren-two-w0", "nested"]:
        for kind in ["flat", "dict"]:
            run_case(name, params_kind=kind, n=3)


@pytest.mark.skipif(not INTERPRETED and not torch.cuda.is_available(), reason="needs Triton (GPU or interpreter)")
def test_triton_backend():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    template = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    ref = hk.nn.batched(template)
    net = hk.nn.batched(template, backend="triton")
    flat = torch.randn(2, net.num_params, device=device) * 0.3
    x = torch.randn(2, 4, 3, device=device)
    expected = ref(x, flat)
    torch.testing.assert_close(net(x, flat), expected, rtol=1e-4, atol=1e-5)
    # dict params: views of the flat tensor run the fused kernel on it in place, separate tensors layer by layer
    for given in (net.layout.unflatten(flat), {k: v.clone() for k, v in net.layout.unflatten(flat).items()}):
        torch.testing.assert_close(net(x, given), expected, rtol=1e-4, atol=1e-5)


# -- dict params: read as given, never concatenated ----------------------------------------------------

@pytest.mark.parametrize("kernels", [False, True], ids=["composition", "kernel-backend"])
@pytest.mark.parametrize("params_kind", ["dict", "views"])
@pytest.mark.parametrize("n", [None, 1, 5], ids=["N=1 (B, in)", "N=1 (B, 1, in)", "N=5"])
@pytest.mark.parametrize("name", ["mlp", "mlp-nobias", "mixed-activations", "siren-two-w0", "nested",
                                  "shared-middle-weight"])
def test_dict_params_match_vmap_float64(name, n, params_kind, kernels, monkeypatch):
    """Separate tensors and views of one flat tensor, where the linear layers are PyTorch's composition and where
    a kernel backend runs the fused MLP op (faked: the torch backend's op, which runs at few points)."""
    if kernels:
        monkeypatch.setattr(batched_module, "linear_is_composition", lambda backend, like: False)
    run_case(name, dtype=torch.float64, n=n, params_kind=params_kind, batch=5)


def _record(monkeypatch, name):
    seen, real = [], getattr(batched_module, name)
    monkeypatch.setattr(batched_module, name, lambda h, *a: seen.append(a) or real(h, *a))
    return seen


def test_dict_params_are_not_copied(monkeypatch):
    """At one point per sample on the torch backend (where flat params run the fused op), dict params run layer
    by layer on the given tensors themselves; with a faked kernel backend, the op reads views of one flat tensor
    in place and other dicts run layer by layer: never a torch.cat of the pieces."""
    net = hk.nn.batched(mlp("tanh", "relu", (3, 7, 5, 2)))
    x = torch.randn(4, 3, dtype=torch.float64)
    assert batched_module.fused_mlp_worth_it(net.backend, x, (3, 7, 5, 2))  # where a dict was concatenated
    params = per_sample_params(net.layout, 4, torch.float64)
    row = net.layout.flatten(params)
    expected = net(x, row)
    layers, ops = _record(monkeypatch, "run_kernel_layer"), _record(monkeypatch, "run_fused_mlp")
    monkeypatch.setattr(torch, "cat", lambda *a, **k: pytest.fail("batched() concatenated the dict params"))
    torch.testing.assert_close(net(x, params), expected, rtol=1e-12, atol=1e-12)
    assert not ops and [(w, b) for w, b, *_ in layers] == [(params[f"{i}.weight"], params[f"{i}.bias"])
                                                           for i in (0, 2, 4)]
    assert all(w is params[f"{i}.weight"] and b is params[f"{i}.bias"] for (w, b, *_), i in zip(layers, (0, 2, 4)))
    monkeypatch.setattr(batched_module, "linear_is_composition", lambda backend, like: False)
    flat = torch.zeros(4, net.num_params + 3, dtype=torch.float64)
    flat[:, 2:-1] = row  # inside a wider buffer: the op gets its range, in place
    views = net.layout.unflatten(flat[:, 2:-1])
    layers.clear()
    torch.testing.assert_close(net(x, views), expected, rtol=1e-12, atol=1e-12)
    assert not layers and len(ops) == 1 and ops[0][0].data_ptr() == views["0.weight"].data_ptr()
    ops.clear()
    torch.testing.assert_close(net(x, params), expected, rtol=1e-12, atol=1e-12)  # separate tensors
    assert not ops and len(layers) == 3


def test_flat_buffer_range_only_for_views_in_the_layout():
    kernels = importlib.import_module("hyperkernels.nn._kernels")
    flat = torch.randn(3, 10, requires_grad=True)
    w, b = flat[:, :8].view(3, 2, 4), flat[:, 8:]
    assert kernels.flat_buffer_range([w, b], [0, 8], 10) is flat
    assert kernels.flat_buffer_range([b, w], [0, 2], 10) is None  # another order
    assert kernels.flat_buffer_range([w, b.clone()], [0, 8], 10) is None  # separate tensors
    assert kernels.flat_buffer_range([w.transpose(1, 2), b], [0, 8], 10) is None  # not row-major
    part = kernels.flat_buffer_range([flat[:, 2:8].view(3, 2, 3), flat[:, 8:9]], [0, 6], 7)
    assert part.shape == (3, 7) and torch.equal(part, flat[:, 2:9]) and part.data_ptr() == flat[:, 2:].data_ptr()
    base = torch.randn(3, 10)  # views that need a gradient of their own are not a range of their buffer
    assert kernels.flat_buffer_range([base[:, :8].view(3, 2, 4).requires_grad_(), base[:, 8:]], [0, 8], 10) is None
    with torch.no_grad():
        detached = flat.detach()
        got = kernels.flat_buffer_range([detached[:, :8].view(3, 2, 4), detached[:, 8:]], [0, 8], 10)
    assert got.data_ptr() == flat.data_ptr() and torch.equal(got, flat)


def test_split_params_forward_views_and_fused_mlp_weights():
    """The public surface bind() runs on: views cut once (no copy), forward_views equal to forward, and which
    weights forward runs inside the fused op (at few points per sample on the torch backend; none at many)."""
    net = hk.nn.batched(MODULES["mixed-activations"][0]())
    flat = torch.randn(3, net.num_params, dtype=torch.float64)
    views = net.split_params(flat)
    assert list(views) == net.layout.names
    assert all(v.data_ptr() == flat[:, net.layout.offset(n):].data_ptr() for n, v in views.items())
    x = torch.randn(3, 3, dtype=torch.float64)
    torch.testing.assert_close(net.forward_views(x, views), net(x, flat), rtol=1e-12, atol=1e-12)
    assert net.fused_mlp_weights(x) == {f"{i}.weight" for i in (0, 2, 4, 6, 8)}
    many = batched_module.fused_mlp_worth_it(net.backend, torch.randn(3, 4096, 3), (3, 8, 8))
    assert not many and net.fused_mlp_weights(torch.randn(3, 4096, 3)) == frozenset()
    with pytest.raises(TypeError, match=r"params: expected a dict name -> \(B, \*shape\) tensor, got Tensor"):
        net.forward_views(x, flat)
    with pytest.raises(TypeError, match=r"params: expected a flat \(B, \d+\) tensor, got a dict"):
        net.split_params(dict(views))
    with pytest.raises(ValueError, match=r"params\['0.weight'\]: expected shape \(B, 8, 3\)"):
        net.forward_views(x, {**views, "0.weight": views["0.weight"][:, :2]})


# -- the plan ------------------------------------------------------------------------------------

def _segments(net):
    return [s for s in net._steps if isinstance(s, plan_module.FusedRun)]


def test_whole_row_segment_gets_the_flat_tensor_itself():
    """One segment covering the row: the op's input is the flat tensor (its gradient arrives whole)."""
    net = hk.nn.batched(mlp("relu", "identity"))
    assert len(net._steps) == 1 and isinstance(net._steps[0], plan_module.FusedRun)
    flat = torch.randn(3, net.num_params, requires_grad=True)
    y = net(torch.randn(3, 5, 3), flat)
    assert y.grad_fn.next_functions[1][0].variable is flat


def test_segments_read_narrowed_ranges():
    net = hk.nn.batched(MODULES["mixed-activations"][0]())
    segs = _segments(net)
    # relu/tanh/silu/silu/none: [0, 2] (relu hidden, tanh out), [4, 6, 8] (silu hidden, none out)
    assert [[l.index for l in s.layers] for s in segs] == [["0", "2"], ["4", "6", "8"]]
    assert segs[0].start == 0 and segs[1].start == segs[0].length
    assert segs[1].start + segs[1].length == net.num_params
    assert segs[1].spec.weight_offsets[0] == 0  # rebased to the segment
    assert (segs[0].activation, segs[0].output_activation) == ("relu", "tanh")
    assert (segs[1].activation, segs[1].output_activation) == ("silu", "none")


def test_sine_w0_splits_segments():
    """Layer 0 (sine, w0=30) cannot share a fused op with layers 2 and 4 (w0=1); alone, it is a kernel layer."""
    net = hk.nn.batched(MODULES["siren-two-w0"][0]())
    first, run = net._steps
    assert isinstance(first, plan_module.Layer) and (first.activation, first.w0) == ("sine", 30.0)
    assert [l.index for l in run.layers] == ["2", "4"] and run.w0 == 1.0


def test_shared_layers_run_dense_on_the_parameter_itself(monkeypatch):
    """A layer whose weight every sample shares runs as one dense layer on the parameter itself (never copied B
    times); a shared bias next to a per-sample weight is read with batch stride 0."""
    seen = []
    real = torch.nn.functional.linear

    def spy(x, weight, bias=None):
        seen.append((weight.data_ptr(), tuple(weight.shape), None if bias is None else bias.data_ptr()))
        return real(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    net = hk.nn.batched(mlp("relu", "identity", (3, 8, 8, 8, 2)), shared=("2.weight", "2.bias"))
    assert net.layout.names == ["0.weight", "0.bias", "4.weight", "4.bias", "6.weight", "6.bias"]
    assert [n for n, _ in net.named_parameters()] == ["shared.2_weight", "shared.2_bias"]
    net(torch.randn(4, 3), torch.randn(4, net.num_params))
    shared = net.shared_parameters()
    assert seen == [(shared["2.weight"].data_ptr(), (8, 8), shared["2.bias"].data_ptr())]


def test_layout_is_parameters_to_vector_order():
    template = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Conv1d(8, 4, 1), nn.Tanh(), nn.Linear(5, 2))
    net = hk.nn.batched(template, shared=("2.bias",))
    full = hk.ParamLayout.from_module(template)
    assert net.layout.names == [n for n in full.names if n != "2.bias"]
    assert hk.nn.batched(template).layout == full
    # every sample gets the template's own weights: the template's output, sample by sample
    flat = parameters_to_vector(template.parameters()).detach().unsqueeze(0).expand(3, -1)
    xs = torch.randn(3, 8, 3)
    y = hk.nn.batched(template)(xs, flat)
    torch.testing.assert_close(y, torch.stack([template(xb) for xb in xs]))


def test_ensemble_via_stack_module_state():
    """B independently initialised models run as one batched model, on one shared input (an expand)."""
    models = [nn.Sequential(nn.Linear(4, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 1))
              for _ in range(5)]
    params, buffers = stack_module_state(models)
    assert not buffers
    net = hk.nn.batched(models[0])
    x = torch.randn(7, 4)
    y = net(x.expand(5, 7, 4), params)
    torch.testing.assert_close(y, torch.stack([m(x) for m in models]))
    y.sum().backward()
    assert params["0.weight"].grad.shape == (5, 16, 4)


def test_functorch_transforms_run_the_reference():
    net = hk.nn.batched(mlp("tanh", "identity"))
    x, flat = torch.randn(4, 3), torch.randn(4, net.num_params) * 0.3
    g = torch.func.grad(lambda p: net(x, p).square().sum())(flat)
    flat_ = flat.clone().requires_grad_()
    net(x, flat_).square().sum().backward()
    torch.testing.assert_close(g, flat_.grad)


def test_module_conversions_and_repr():
    net = hk.nn.batched(mlp("relu", "identity"), shared=("0.bias",)).double()
    assert net.shared_parameters()["0.bias"].dtype == torch.float64
    text = repr(net)
    assert "fused batched_mlp" in text and "batched_linear" in text
    assert hk.nn.batched(nn.Linear(2, 3)).layout.names == ["weight", "bias"]


# -- bad input -----------------------------------------------------------------------------------

class LinearWithOwnForward(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def _converted_in_place():
    net = nn.Sequential(nn.Linear(3, 4))
    del net[0].weight
    net[0].weight = torch.zeros(4, 3)  # a plain tensor, as libraries that convert modules in place leave it
    return net


def _hyperlight_like():
    """What HyperLight's hypernetize() leaves: a Linear subclass whose weight became an 'external parameter'."""
    lin = nn.Linear(3, 4)
    del lin.weight
    lin._external_parameters = {"weight": None}
    return nn.Sequential(lin, nn.ReLU(), nn.Linear(4, 2))


class HypnettorchLike(nn.Module):
    """A hypnettorch main network built with no_weights=True: no parameters, only param_shapes."""
    param_shapes = [[4, 3], [4]]


class Overlapping(nn.Module):
    """Two parameters that are views of one tensor."""

    def __init__(self):
        super().__init__()
        base = torch.randn(10)
        self.a = nn.Parameter(base[:6])
        self.b = nn.Parameter(base[4:])

    def forward(self, x):
        return x * self.a.sum() + self.b.sum()


@pytest.mark.parametrize(
    "make, kwargs, pattern",
    [
        (lambda: nn.Sequential(nn.Linear(3, 4), nn.Linear(5, 2)), {}, r"layer 1 \(Linear\) takes 5 inputs but layer 0"),
        (lambda: nn.Conv1d(8, 8, 1, groups=2), {},
         r"layer 0 \(Conv1d\) has groups=2, as has every conv of the module: the grouped-conv \"parallel MLP\".*"
         r"groups=1.*ONE sample's network, e\.g\. nn\.Sequential\(nn\.Linear\(4, 4\)\).*docs/migration\.md"),
        (lambda: nn.Sequential(nn.Conv1d(6, 12, 1, groups=3), nn.ReLU(), nn.Conv1d(12, 3, 1, groups=3)), {},
         r"groups=3.*nn\.Sequential\(nn\.Linear\(2, 4\), nn\.ReLU\(\), nn\.Linear\(4, 1\)\)"),
        (_converted_in_place, {}, r"layer 0 \(Linear\) has no parameter 'weight'.*docs/migration\.md"),
        (_hyperlight_like, {}, r"converted in place by HyperLight's hypernetize\(\): build batched\(\) from the model as it "
                               r"was before"),
        (HypnettorchLike, {}, r"HypnettorchLike has no parameters \(a hypnettorch main network built with "
                              r"no_weights=True: batched\(\) the equivalent nn.Sequential"),
        (lambda: nn.ReLU(), {}, r"ReLU has no parameters"),
        (lambda: nn.Sequential(nn.ReLU()), {}, r"Sequential has no parameters"),
        (Overlapping, {}, r"parameters 'a' and 'b' share memory .* cannot express"),
        (lambda: nn.Linear(3, 4), {"shared": ("weight", "bias")}, r"no per-sample parameters left"),
        (lambda: nn.Linear(3, 4), {"shared": ("0.weight",)}, r"shared: \['0.weight'\] are not parameters.*\['weight', 'bias'\]"),
        (lambda: nn.Linear(3, 4), {"shared": ("weight", "weight")}, r"shared: names repeat"),
        (lambda: nn.Linear(3, 4), {"backend": "fast"}, r"backend: expected one of"),
        (lambda: nn.LazyLinear(4), {}, r"the module \(LazyLinear\) is a lazy module"),
        (lambda: nn.Sequential(nn.Linear(3, 4), nn.LazyLinear(4)), {}, r"layer 1 \(LazyLinear\) is a lazy module"),
    ],
)
def test_bad_modules(make, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        hk.nn.batched(make(), **kwargs)


def test_not_a_module():
    with pytest.raises(TypeError, match=r"module: expected an nn.Module, got function"):
        hk.nn.batched(lambda x: x)


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Linear(3, 4), nn.Conv2d(4, 4, 3)),
    lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Dropout(0.1)),
    lambda: nn.Sequential(nn.Linear(3, 4), nn.GELU(approximate="tanh")),
    lambda: nn.Conv1d(3, 4, 1, stride=2),
    lambda: nn.Conv2d(4, 4, 1, padding=1),
    lambda: nn.Sequential(nn.Conv2d(4, 4, 1, groups=2), nn.Conv2d(4, 4, 3)),
    lambda: nn.Sequential(LinearWithOwnForward(3, 4)),
    lambda: nn.Sequential(torch.nn.utils.parametrizations.weight_norm(nn.Linear(3, 4))),
], ids=["3x3 conv", "Dropout", "GELU tanh", "strided 1x1", "padded 1x1", "grouped conv in a CNN",
        "Linear subclass with its own forward", "weight_norm"])
def test_refused_before_now_run_per_sample(make):
    """What batched() used to refuse runs per sample through vmap: the plan says so."""
    net = hk.nn.batched(make())
    assert "per sample through torch.func.vmap" in repr(net) or "elementwise" in repr(net)


_NET = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))  # P = 32 + 18 = 50


def _dict(batch=4):
    return {k: torch.randn(batch, *v.shape) for k, v in _NET.named_parameters()}


@pytest.mark.parametrize(
    "call, exc, pattern",
    [
        (lambda n, x, p: n(x, p[:, 1:]), ValueError, r"params: expected flat per-sample parameters of shape \(B, 50\), got shape \(4, 49\)"),
        (lambda n, x, p: n(x, p[0]), ValueError, r"got shape \(50,\); for one weight set used by every sample, pass params.expand\(B, -1\)"),
        (lambda n, x, p: n(x, torch.cat([p, p[:, :2]], 1)), ValueError, r"pass params\[:, :50\]"),
        (lambda n, x, p: n(x, p.long()), TypeError, r"params: expected a floating dtype"),
        (lambda n, x, p: n(x, {k: v for k, v in _dict().items() if k != "2.bias"}), ValueError, r"missing \['2.bias'\], unexpected \[\]"),
        (lambda n, x, p: n(x, {**_dict(), "4.weight": p}), ValueError, r"missing \[\], unexpected \['4.weight'\]"),
        (lambda n, x, p: n(x, {**_dict(), "0.weight": torch.randn(4, 8, 2)}), ValueError, r"params\['0.weight'\]: expected shape \(B, 8, 3\), got \(4, 8, 2\)"),
        (lambda n, x, p: n(x, {**_dict(), "0.bias": torch.randn(5, 8)}), ValueError, r"params\['0.bias'\]: batch size 5 differs from 4"),
        (lambda n, x, p: n(x, {**_dict(), "0.bias": torch.randn(4, 8).double()}), TypeError, r"params\['0.bias'\]: expected dtype torch.float32"),
        (lambda n, x, p: n(x[:1], {k: v[0] for k, v in _dict(1).items()}), ValueError, r"the batch dim is missing .* add it with .unsqueeze\(0\)"),
        (lambda n, x, p: n(x, (_dict(), {})), TypeError, r"stack_module_state returns \(params, buffers\): pass its first element"),
        (lambda n, x, p: n(x, [p]), TypeError, r"got a list \(hypnettorch: use ret_format='flattened'\)"),
        (lambda n, x, p: n(x[..., :2], p), ValueError, r"x: expected in_features \(last dim\) 3 \(layer 0 \(Linear\)\), got 2"),
        (lambda n, x, p: n(x[:, 0, 0], p), ValueError, r"x: expected shape \(B, 3\) or \(B, N, 3\), got 1-D"),
        (lambda n, x, p: n(x[:3], p), ValueError, r"x: expected batch size \(dim 0\) 4 \(the batch of params\), got 3"),
        (lambda n, x, p: n(x.double(), p), TypeError, r"x: expected dtype torch.float32 \(the dtype of params\), got torch.float64"),
        (lambda n, x, p: n(x.to("meta"), p), ValueError, r"x: expected device cpu \(the device of params\), got meta"),
        (lambda n, x, p: n(x.int(), p), TypeError, r"x: expected a floating dtype"),
        (lambda n, x, p: n(x, "params"), TypeError, r"params: expected a flat \(B, 50\) tensor or a dict"),
    ],
)
def test_bad_forward_input(call, exc, pattern):
    net = hk.nn.batched(_NET)
    with pytest.raises(exc, match=pattern):
        call(net, torch.randn(4, 5, 3), torch.randn(4, net.num_params))


def test_bad_forward_input_shared_and_conv():
    net = hk.nn.batched(_NET, shared=("2.bias",))
    with pytest.raises(ValueError, match=r"unexpected \['2.bias'\].*\['2.bias'\] are shared .* leave them out"):
        net(torch.randn(4, 3), _dict())
    with pytest.raises(ValueError, match=r"shape \(B, 48\) \(the module's parameters minus the shared \['2.bias'\]\)"):
        net(torch.randn(4, 3), torch.randn(4, 50))
    with pytest.raises(TypeError, match=r"shared parameter '2.bias' is torch.float32 but x and params are torch.float64"):
        net(torch.randn(4, 3).double(), torch.randn(4, 48).double())
    with pytest.raises(ValueError, match=r"shared parameter '2.bias' is on cpu but x and params are on meta"):
        net(torch.randn(4, 3, device="meta"), torch.randn(4, 48, device="meta"))
    conv = hk.nn.batched(nn.Conv2d(4, 6, 1))
    p = torch.randn(2, conv.num_params)
    with pytest.raises(ValueError, match=r"x: expected 4 channels \(in_channels of layer 0 \(Conv2d\)\), got 3"):
        conv(torch.randn(2, 3, 5, 5), p)
    with pytest.raises(ValueError, match=r"x: expected shape \(B, C_in, H, W\) or \(B, N, C_in, ...\)"):
        conv(torch.randn(2, 4, 5), p)
