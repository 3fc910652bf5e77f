"""batched_linear and batched_conv1x1: every backend against the float64 loop reference, forward and
every gradient, over odd shapes, both layouts, strided weight views, every activation and dtype; strided
conv inputs read in place; the ops' saved pre-activation and incoming gradients of any layout."""
import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import hyperkernels as hk
from conftest import backend_params, is_slow_path, supports
from reference import FORWARD_RTOL, GRAD_RTOL, assert_close, conv1x1_reference, linear_reference

ACTIVATIONS = [None, "relu", "gelu", "silu", "tanh", "sigmoid", "sine"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# How the per-sample weight is stored: contiguous; a view of a flat (B, P) hypernetwork output at an odd
# offset (so not 16-byte aligned); an expand of one shared weight (batch stride 0); a transposed view.
WEIGHT_KINDS = ["contiguous", "flat_view", "shared", "transposed"]
# How x is stored: contiguous, or a view with a non-unit innermost stride.
X_KINDS = ["contiguous", "strided"]
# x layouts: linear (B, in), linear (B, N, in), and conv1x1 with 1, 2 and 3 spatial dims.
LAYOUTS = ["linear2d", "linear3d", "conv1d", "conv2d", "conv3d"]

# (B, N, in, out): B = 1, N = 1, sizes 1, 3, 17, 33, 100 and non-powers of two.
SHAPES = [
    (1, 1, 1, 1),
    (3, 1, 17, 33),
    (2, 5, 3, 4),
    (17, 3, 33, 17),
    (4, 33, 17, 100),
    (1, 100, 33, 3),
    (5, 17, 100, 1),
    (2, 257, 8, 16),
]
# Interpreted Triton on CPU is ~1000x slower than a GPU: a subset of shapes that still covers
# B = 1, N = 1, size 1, tile-edge masks and odd sizes.
SMALL_SHAPES = [(1, 1, 1, 1), (3, 1, 17, 33), (2, 5, 3, 4), (17, 3, 33, 17)]


def _cases(shapes):
    """Every shape with every layout, and every activation with every dtype, spread over the weight
    and x storage kinds; cycling instead of a full product keeps the count linear."""
    cases = []
    kinds = list(itertools.product(WEIGHT_KINDS, X_KINDS))
    acts = itertools.cycle(ACTIVATIONS)
    for i, (shape, layout) in enumerate(itertools.product(shapes, LAYOUTS)):
        wk, xk = kinds[i % len(kinds)]
        cases.append((shape, layout, next(acts), torch.float32, wk, xk, i % 3 != 2))
    for j, (act, dtype) in enumerate(itertools.product(ACTIVATIONS, DTYPES)):
        wk, xk = kinds[j % len(kinds)]
        cases.append((shapes[min(3, len(shapes) - 1)], LAYOUTS[j % len(LAYOUTS)], act, dtype, wk, xk, True))
    return cases


def _case_id(case):
    (b, n, k, m), layout, act, dtype, wk, xk, bias = case
    return f"B{b}N{n}K{k}M{m}-{layout}-{act}-{str(dtype)[6:]}-w_{wk}-x_{xk}-{'bias' if bias else 'nobias'}"


def _spatial(layout, n):
    """Spatial dims whose product is n for the conv layouts (n itself for 1-D)."""
    if layout == "conv2d":
        return (1, n) if n % 2 else (2, n // 2)
    if layout == "conv3d":
        return (1, 1, n)
    return (n,)


def make_problem(case):
    """Random float64 leaves, and a function deriving (x, weight, bias) views from them, so that the
    backend under test and the reference see exactly the same numbers through the same views."""
    (b, n, k, m), layout, act, dtype, wk, xk, has_bias = case
    conv = layout.startswith("conv")
    leaves = {}
    if wk == "flat_view":
        leaves["flat"] = torch.randn(b, 1 + m * k + m + 2, dtype=torch.float64)
    elif wk == "shared":
        leaves["weight"] = torch.randn(1, m, k, dtype=torch.float64)
    elif wk == "transposed":
        leaves["weight"] = torch.randn(b, k, m, dtype=torch.float64)
    else:
        leaves["weight"] = torch.randn(b, m, k, dtype=torch.float64)
    if wk == "flat_view":
        leaves["flat"][:, 1 : 1 + m * k] /= k**0.5
    else:
        leaves["weight"] /= k**0.5  # keeps pre-activations O(1), where every activation has shape
    if has_bias and wk != "flat_view":
        leaves["bias"] = torch.randn(b, m, dtype=torch.float64)
    if conv:
        spatial = _spatial(layout, n)
        x_shape = (b, k, *spatial)
    else:
        x_shape = (b, k) if layout == "linear2d" else (b, n, k)
    if xk == "strided":
        leaves["x"] = torch.randn(*x_shape[:-1], 2 * x_shape[-1], dtype=torch.float64)
    else:
        leaves["x"] = torch.randn(*x_shape, dtype=torch.float64)

    def derive(t):
        x = t["x"][..., ::2] if xk == "strided" else t["x"]
        if wk == "flat_view":
            weight = t["flat"][:, 1 : 1 + m * k].view(b, m, k)
            bias = t["flat"][:, 1 + m * k : 1 + m * k + m] if has_bias else None
        else:
            weight = {"shared": lambda w: w.expand(b, m, k), "transposed": lambda w: w.transpose(1, 2)}.get(
                wk, lambda w: w
            )(t["weight"])
            bias = t.get("bias")
        if layout in ("conv2d", "conv3d"):
            weight = weight.reshape(b, m, k, *([1] * (x.dim() - 2)))
        return x, weight, bias

    return leaves, derive


def run_case(case, backend, device):
    (b, n, k, m), layout, act, dtype, wk, xk, has_bias = case
    if not supports(backend, device, dtype):
        pytest.skip(f"backend {backend} does not support {dtype} on {device}")
    leaves, derive = make_problem(case)
    low = {name: v.to(dtype).to(device).requires_grad_() for name, v in leaves.items()}
    ref = {name: v.to(dtype).double().requires_grad_() for name, v in leaves.items()}
    w0 = 30.0 if dtype in (torch.float32, torch.float64) else 1.5  # half precision: keep sin's argument exact-ish
    conv = layout.startswith("conv")
    op = hk.batched_conv1x1 if conv else hk.batched_linear
    reference = conv1x1_reference if conv else linear_reference

    y = op(*derive(low), activation=act, w0=w0, backend=backend)
    y_ref = reference(*derive(ref), activation=act, w0=w0)
    assert y.dtype == dtype and y.device.type == device
    assert y.shape == y_ref.shape
    assert y.is_contiguous()
    assert_close(y, y_ref, FORWARD_RTOL[dtype], "forward")

    grad = torch.randn_like(y_ref).to(dtype)
    y.backward(grad.to(device))
    y_ref.backward(grad.double())
    for name in leaves:
        assert_close(low[name].grad, ref[name].grad, GRAD_RTOL[dtype], f"grad of {name}")


@pytest.mark.parametrize("backend_device", backend_params())
@pytest.mark.parametrize("case", _cases(SHAPES), ids=_case_id)
def test_matches_reference(backend_device, case):
    backend, device = backend_device
    if is_slow_path(backend, device) and case[0] not in SMALL_SHAPES:
        pytest.skip("interpreted Triton on CPU: covered by the small shapes")
    run_case(case, backend, device)


@pytest.mark.parametrize("backend_device", backend_params())
def test_shared_weight_gradient_is_the_sum_over_samples(backend_device):
    backend, device = backend_device
    w = torch.randn(1, 4, 3, device=device, requires_grad=True)
    x = torch.randn(5, 2, 3, device=device)
    hk.batched_linear(x, w.expand(5, 4, 3), backend=backend).sum().backward()
    expected = x.sum(dim=(0, 1)).expand(4, 3)
    torch.testing.assert_close(w.grad[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend_device", backend_params())
def test_nan_in_one_sample_stays_in_that_sample(backend_device):
    backend, device = backend_device
    w = torch.randn(4, 5, 3, device=device)
    w[2, 1, 0] = float("nan")
    y = hk.batched_linear(torch.randn(4, 3, 3, device=device), w, torch.randn(4, 5, device=device), backend=backend)
    assert torch.isnan(y[2]).any()
    assert not torch.isnan(y[[0, 1, 3]]).any()


@pytest.mark.parametrize("backend_device", backend_params())
def test_no_grad_forward_keeps_no_preactivation(backend_device):
    backend, device = backend_device
    x, w = torch.randn(3, 4, 5, device=device), torch.randn(3, 6, 5, device=device)
    with torch.no_grad():
        y, preact = hk.ops.batched_linear_op(x, w, None, "gelu", 30.0, False, False, backend)
    assert preact.numel() == 0
    assert_close(y, linear_reference(x.double(), w.double(), None, "gelu"), FORWARD_RTOL[torch.float32])


@pytest.mark.parametrize("backend_device", backend_params())
@pytest.mark.parametrize("activation", ["gelu", "silu", "sine"])
def test_backward_recomputes_a_preactivation_it_was_not_given(backend_device, activation):
    """A forward run without grad mode keeps no pre-activation; a later backward must still be right."""
    backend, device = backend_device
    x = torch.randn(2, 3, 4, dtype=torch.float32, device=device)
    w = torch.randn(2, 5, 4, dtype=torch.float32, device=device) / 2
    y, preact = hk.ops.batched_linear_op(x, w, None, activation, 2.0, False, False, backend)
    assert preact.numel() == 0
    dy = torch.randn_like(y)
    dx, dw, db = hk.ops.batched_linear_backward_op(dy, x, w, None, y, preact, activation, 2.0, False,
                                                   [True, True, False], backend)
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    linear_reference(xr, wr, None, activation, 2.0).backward(dy.double())
    assert_close(dx, xr.grad, GRAD_RTOL[torch.float32], "dx")
    assert_close(dw, wr.grad, GRAD_RTOL[torch.float32], "dweight")


def test_empty_batch_returns_empty():
    x = torch.randn(0, 7, 3, requires_grad=True)
    w = torch.randn(0, 4, 3, requires_grad=True)
    y = hk.batched_linear(x, w, torch.randn(0, 4))
    assert y.shape == (0, 7, 4)
    y.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape
    assert hk.batched_conv1x1(torch.randn(0, 3, 5, 5), torch.randn(0, 2, 3, 1, 1)).shape == (0, 2, 5, 5)


class _CopiesOf(TorchDispatchMode):
    """Records the ops that read the storage of ``base``: the copies among them, and whether anything else did."""

    COPIES = {"aten.clone.default", "aten.copy_.default", "aten._to_copy.default"}
    VIEWS = {"aten.view.default", "aten._unsafe_view.default", "aten.as_strided.default", "aten.expand.default",
             "aten.transpose.int", "aten.t.default", "aten.unsqueeze.default", "aten.squeeze.dim",
             "aten.squeeze.default", "aten.permute.default", "aten.slice.Tensor", "aten.alias.default",
             "aten.detach.default", "aten._reshape_alias.default"}

    def __init__(self, base):
        super().__init__()
        self.storage = base.untyped_storage().data_ptr()
        self.copies, self.reads = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        ours = [t for t in inputs if t.untyped_storage().data_ptr() == self.storage]
        if ours and str(func) in self.COPIES:
            self.copies.append(tuple(ours[0].shape))
        elif ours and str(func) not in self.VIEWS:
            self.reads.append(str(func))
        return func(*args, **kwargs)


# x (2, 3, *spatial) views: whether their spatial dims merge into one stride.
SPATIAL_VIEWS = {
    "1d-strided": (lambda x: x[..., ::2], (2, 3, 10), True),
    "2d-last-dim-strided": (lambda x: x[..., ::2], (2, 3, 4, 6), True),  # strides (6, 2): 6 = 3 * 2, one stride
    "2d-rows-cut": (lambda x: x[..., 1:3, :], (2, 3, 4, 6), True),
    "2d-both-strided": (lambda x: x[..., ::2, ::2], (2, 3, 4, 6), False),  # strides (12, 2): 12 != 3 * 2
    "3d-middle-cut": (lambda x: x[:, :, :, 1:3, :], (2, 3, 2, 4, 5), False),
}


@pytest.mark.parametrize("backend_device", backend_params())
@pytest.mark.parametrize("view", list(SPATIAL_VIEWS))
def test_conv1x1_copies_only_unmergeable_spatial_dims(backend_device, view):
    """An x whose spatial dims merge into one stride is read in place (no op copies any of its storage); one
    whose spatial dims cannot merge is copied once, the view alone (not its base)."""
    backend, device = backend_device
    make_view, shape, mergeable = SPATIAL_VIEWS[view]
    base = torch.randn(shape, device=device)
    x, w = make_view(base), torch.randn(2, 5, 3, device=device)
    recorder = _CopiesOf(base)
    with recorder:
        y = hk.batched_conv1x1(x, w, backend=backend)
    assert_close(y, conv1x1_reference(x.double(), w.double(), None), FORWARD_RTOL[torch.float32])
    if mergeable:
        assert recorder.copies == [] and recorder.reads, (recorder.copies, recorder.reads)
    else:
        assert recorder.copies == [tuple(x.shape)], recorder.copies


@pytest.mark.parametrize("backend_device", backend_params())
@pytest.mark.parametrize("channel_major", [False, True], ids=["linear", "conv1x1"])
def test_gradient_in_another_layout(backend_device, channel_major):
    """The incoming gradient takes the layout of whatever consumed the output, e.g. the transposed
    (B, C, N) view of a points-major result: the public call and the backward op must read it by its strides."""
    backend, device = backend_device
    b, n, k, m = 3, 5, 4, 7
    x = torch.randn((b, k, n) if channel_major else (b, n, k), device=device)
    w = torch.randn(b, m, k, device=device) / 2
    bias = torch.randn(b, m, device=device)
    out_shape = (b, m, n) if channel_major else (b, n, m)
    dy = torch.randn(out_shape[0], out_shape[2], out_shape[1], device=device).transpose(1, 2)
    assert not dy.is_contiguous()
    op = hk.batched_conv1x1 if channel_major else hk.batched_linear
    reference = conv1x1_reference if channel_major else linear_reference
    leaves = [t.requires_grad_() for t in (x, w, bias)]
    refs = [t.detach().double().requires_grad_() for t in leaves]
    op(*leaves, activation="silu", backend=backend).backward(dy)
    reference(*refs, activation="silu").backward(dy.double())
    for name, got, ref in zip(("x", "weight", "bias"), leaves, refs):
        assert_close(got.grad, ref.grad, GRAD_RTOL[torch.float32], f"grad of {name} (public call)")

    with torch.no_grad():
        y, preact = hk.ops.batched_linear_op(x, w, bias, "silu", 30.0, channel_major, True, backend)
    grads = hk.ops.batched_linear_backward_op(dy, x, w, bias, y, preact, "silu", 30.0, channel_major,
                                              [True, True, True], backend)
    for name, got, ref in zip(("x", "weight", "bias"), grads, refs):
        assert_close(got, ref.grad, GRAD_RTOL[torch.float32], f"grad of {name} (backward op)")
