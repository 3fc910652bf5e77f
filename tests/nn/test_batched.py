"""hk.nn.batched on its kernel layers (nn.Linear, 1x1 convs, the fused activations): every layer kind, activation,
dtype, N, flat and dict params and shared parameters, against vmap(functional_call(module, ...)) on the same
parameters (in float64); ensembles and torch.func. How it plans and reads params is in test_batched_plan.py, bad
input in test_batched_errors.py, everything it runs per sample through vmap in test_batched_models.py."""
import copy
import importlib

import pytest
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from torch.nn.utils import parameters_to_vector

import hyperkernels as hk
from conftest import (ACT_MODULES, INTERPRETED, mixed_activations_mlp, per_sample_params, siren_two_w0_mlp)
from conftest import sequential_mlp as mlp
from reference import FORWARD_RTOL, GRAD_RTOL, assert_close

# the module, not the function hk.nn.batched that shadows it as an attribute of hk.nn
batched_module = importlib.import_module("hyperkernels.nn.batched")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

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
    "mixed-activations": (mixed_activations_mlp, (3,), ()),
    "siren-two-w0": (siren_two_w0_mlp, (2,), ()),
    "shared-middle-weight": (lambda: mlp("relu", "identity", (3, 8, 8, 8, 2)), (3,), ("2.weight",)),
    "shared-first-bias": (lambda: mlp("gelu", "tanh"), (3,), ("0.bias",)),
    "shared-last-layer": (lambda: mlp("silu", "identity", (3, 8, 8, 2)), (3,), ("4.weight", "4.bias")),
    "shared-conv-weight": (lambda: nn.Sequential(nn.Conv2d(4, 8, 1), nn.ReLU(), nn.Conv2d(8, 3, 1)), (4, 3, 3),
                           ("0.weight",)),
}


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
