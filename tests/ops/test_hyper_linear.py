"""hyper_linear: every backend against generate-then-batched_linear in float64 (reference.hyper_linear_reference),
forward and the gradients of x, h, head_weight and head_bias; N = 1 and N > 1, with and without either bias, every
activation and dtype; the op layer (opcheck, gradcheck, double backward, torch.compile, torch.func); bad inputs."""
import itertools

import pytest
import torch

import hyperkernels as hk
from conftest import (TRITON_DEVICE, TRITON_REASON, assert_compiles_without_graph_break, backend_params,
                      is_slow_path, needs_triton, run_hyper_linear_case)
from hyperkernels.backends.torch import hyper_linear as torch_hyper
from hyperkernels.ops import hyper_linear_backward_op, hyper_linear_op
from reference import GRAD_RTOL, assert_close

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


@pytest.mark.parametrize("backend_device", hyper_backend_params())
@pytest.mark.parametrize("case", _cases(SHAPES), ids=_case_id)
def test_matches_generate_then_batched_linear(backend_device, case):
    backend, device = backend_device
    if not hk._dispatch.implements(backend, "hyper_linear"):
        pytest.skip(f"backend {backend} has no hyper_linear")
    if is_slow_path(backend, device) and case[0] not in SMALL_SHAPES:
        pytest.skip("interpreted Triton on CPU: covered by the small shapes")
    run_hyper_linear_case(case, backend, device)


@pytest.mark.parametrize("backend_device", hyper_backend_params())
@pytest.mark.parametrize("layout", ["x2d", "strided"])
def test_two_dim_x_and_strided_views(backend_device, layout):
    """x (B, in) returns (B, out); non-contiguous x, h and a transposed head_weight are read through strides."""
    backend, device = backend_device
    if not hk._dispatch.implements(backend, "hyper_linear"):
        pytest.skip(f"backend {backend} has no hyper_linear")
    case = ((3, 1, 9, 5, 6), "tanh", torch.float32, True, True)
    if layout == "x2d":
        run_hyper_linear_case(case, backend, device, x2d=True)
    else:
        # A transposed copy (differentiable): the same values, read through strides (1, rows) for head_weight,
        # (1, B) for h, and x's innermost stride B*N.
        def transposed_copy(t):
            return t.mT.contiguous().mT if t.dim() == 2 else t.transpose(0, 2).contiguous().transpose(0, 2)

        run_hyper_linear_case(case, backend, device, transform=transposed_copy)


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
