"""batched_mlp: every backend against a loop over samples of the equivalent nn.Sequential (loaded with
vector_to_parameters), forward, dparams and dx, depths 1-5, widths 1..256; one (B, P) gradient; bad input;
opcheck, torch.func and double backward of the op."""
import itertools

import pytest
import torch
from torch.nn.utils import parameters_to_vector

import hyperkernels as hk
from conftest import backend_params, is_slow_path, ops_making_params_sized_tensors_in_backward, supports
from reference import FORWARD_RTOL, GRAD_RTOL, assert_close, mlp_reference, sequential_for

ACTIVATIONS = ["relu", "gelu", "silu", "tanh", "sigmoid", "sine", None]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# (sizes, B, N): depths 1-5; widths 1, odd, powers of two up to 256; N = 1 and N > 1.
NETS = [
    ([1, 1], 3, 1),
    ([5, 3], 1, 7),
    ([16, 64, 64, 64, 16], 6, 1),
    ([3, 17, 33, 2], 4, 9),
    ([2, 64, 64, 64, 64, 3], 2, 33),
    ([7, 256, 1], 3, 1),
    ([256, 100, 256], 2, 5),
    ([33, 1, 33], 5, 3),
]
SMALL_NETS = [([1, 1], 3, 1), ([5, 3], 1, 7), ([3, 17, 33, 2], 4, 9), ([16, 32, 32, 16], 5, 1)]


def _cases(nets):
    cases = []
    acts = itertools.cycle(ACTIVATIONS)
    for i, (sizes, b, n) in enumerate(nets):
        cases.append((sizes, b, n, next(acts), [None, "tanh", "sigmoid"][i % 3], torch.float32, i % 4 != 3))
    for j, (act, dtype) in enumerate(itertools.product(ACTIVATIONS, DTYPES)):
        sizes, b, n = nets[2 + j % 2]
        cases.append((sizes, b, n, act, None, dtype, True))
    return cases


def _id(case):
    sizes, b, n, act, out_act, dtype, bias = case
    return f"{'-'.join(map(str, sizes))}-B{b}N{n}-{act}-{out_act}-{str(dtype)[6:]}-{'bias' if bias else 'nobias'}"


def run_case(case, backend, device, params_kind="flat"):
    sizes, b, n, act, out_act, dtype, bias = case
    if not supports(backend, device, dtype):
        pytest.skip(f"backend {backend} does not support {dtype} on {device}")
    if not hk._dispatch.implements(backend, "batched_mlp"):
        pytest.skip(f"backend {backend} has no batched_mlp")
    w0 = 30.0 if dtype in (torch.float32, torch.float64) else 1.5
    net = sequential_for(sizes, act, out_act, w0, bias)
    layout = hk.ParamLayout.from_module(net)
    rows = []
    # Each sample a freshly initialised net, so activations stay in range at any depth; SIREN-style for
    # sine (weights / w0), so that w0 * z is O(1) and rounding is not amplified w0-fold per layer.
    scale = 1.0 / w0 if "sine" in (act, out_act) else 1.0
    for _ in range(b):
        for p in net.parameters():
            p.data = torch.randn_like(p) * scale / max(1, p.shape[-1]) ** 0.5
        rows.append(parameters_to_vector(net.parameters()))
    flat = torch.stack(rows).detach().to(dtype).to(device).requires_grad_()
    x = torch.randn(b, n, sizes[0], dtype=torch.float64).to(dtype).to(device)
    if n == 1:
        x = x[:, 0].detach()
    x.requires_grad_()
    params = flat if params_kind == "flat" else layout.unflatten(flat)
    y = hk.batched_mlp(x, params, layout, activation=act, output_activation=out_act, w0=w0, backend=backend)
    grad_y = torch.randn(y.shape, dtype=torch.float64).to(dtype)
    y.backward(grad_y.to(device))
    y_ref, dx_ref, dflat_ref = mlp_reference(net, x.detach().cpu(), flat.detach().cpu(), grad_y)
    assert y.shape == y_ref.shape and y.dtype == dtype and y.is_contiguous()
    assert_close(y, y_ref, FORWARD_RTOL[dtype] * len(sizes), "forward")
    assert_close(x.grad, dx_ref, GRAD_RTOL[dtype] * len(sizes), "dx")
    assert_close(flat.grad, dflat_ref, GRAD_RTOL[dtype] * len(sizes), "dparams")


@pytest.mark.parametrize("backend_device", backend_params())
@pytest.mark.parametrize("case", _cases(NETS), ids=_id)
def test_matches_sequential_loop(backend_device, case):
    backend, device = backend_device
    if is_slow_path(backend, device) and (case[0], case[1], case[2]) not in SMALL_NETS:
        pytest.skip("interpreted Triton on CPU: covered by the small nets")
    run_case(case, backend, device)


@pytest.mark.parametrize("backend_device", backend_params())
@pytest.mark.parametrize("case", _cases(SMALL_NETS)[:4], ids=_id)
def test_small_nets(backend_device, case):
    run_case(case, *backend_device)


@pytest.mark.parametrize("backend_device", backend_params())
def test_dict_params_match_flat(backend_device):
    run_case(([3, 17, 33, 2], 4, 9, "gelu", None, torch.float32, True), *backend_device, params_kind="dict")


def test_dparams_is_one_tensor_without_per_layer_buffers():
    """The backward writes one (B, P) gradient: no zero-filled (B, P) buffer per layer view. The same layers run
    one by one on views of the flat tensor make one such buffer per view, which shows that the count sees them."""
    sizes = [4, 8, 8, 2]
    layout = hk.ParamLayout.from_module(sequential_for(sizes, "relu", None))
    flat = torch.randn(3, layout.numel, requires_grad=True)
    x = torch.randn(3, 5, 4)
    fused = hk.batched_mlp(x, flat, layout)
    assert len(ops_making_params_sized_tensors_in_backward(fused, flat)) == 1

    views = layout.unflatten(flat)
    h = x
    for j in range(len(sizes) - 1):
        h = hk.batched_linear(h, views[f"{2 * j}.weight"], views[f"{2 * j}.bias"],
                              activation="relu" if j < len(sizes) - 2 else None)
    torch.testing.assert_close(h, fused)
    assert len(ops_making_params_sized_tensors_in_backward(h, flat)) > len(views)


def test_functorch_transforms_run_the_reference():
    layout = hk.ParamLayout.from_module(sequential_for([3, 8, 2], "tanh", None))
    x, flat = torch.randn(4, 3), torch.randn(4, layout.numel)
    loss = lambda p: hk.batched_mlp(x, p, layout, activation="tanh").square().sum()  # noqa: E731
    g = torch.func.grad(loss)(flat)
    flat_ = flat.clone().requires_grad_()
    loss(flat_).backward()
    torch.testing.assert_close(g, flat_.grad)


@pytest.mark.parametrize(
    "call, exc, pattern",
    [
        (lambda l, x, p: hk.batched_mlp(x, p, "layout"), TypeError, r"layout: expected a hyperkernels.ParamLayout"),
        (lambda l, x, p: hk.batched_mlp(x, p[:, 1:], l), ValueError, r"params: expected .* \(B, 59\) .* got shape \(4, 58\)"),
        (lambda l, x, p: hk.batched_mlp(x[..., :2], p, l), ValueError, r"x: expected in_features \(last dim\) 3"),
        (lambda l, x, p: hk.batched_mlp(x[:3], p, l), ValueError, r"params: expected batch size \(dim 0\) 3"),
        (lambda l, x, p: hk.batched_mlp(x.double(), p, l), TypeError, r"params: expected dtype torch.float64"),
        (lambda l, x, p: hk.batched_mlp(x, p, l, output_activation="soft"), ValueError, r"activation: expected"),
        (lambda l, x, p: hk.batched_mlp(x, {"0.weight": p}, l), ValueError, r"missing \['0.bias', '2.weight', '2.bias'\]"),
        (lambda l, x, p: hk.batched_mlp(x, p, hk.ParamLayout.from_shapes({"0.weight": (8, 3), "1.weight": (2, 7)})),
         ValueError, r"'1.weight' takes 7 inputs but '0.weight' gives 8 outputs"),
    ],
)
def test_bad_input(call, exc, pattern):
    layout = hk.ParamLayout.from_module(sequential_for([3, 8, 3], "relu", None).float())
    with pytest.raises(exc, match=pattern):
        call(layout, torch.randn(4, 5, 3), torch.randn(4, layout.numel))


def test_opcheck():
    layout = hk.ParamLayout.from_module(sequential_for([3, 8, 2], "relu", None))
    spec = layout.mlp_spec()
    x = torch.randn(2, 5, 3, requires_grad=True)
    flat = torch.randn(2, layout.numel, requires_grad=True)
    for save in (True, False):
        args = (x, flat, spec.sizes, spec.weight_offsets, spec.bias_offsets, "gelu", "tanh", 2.0, save, "torch_bmm")
        torch.library.opcheck(hk.ops.batched_mlp_op, args)
        y, saved = hk.ops.batched_mlp_op(*args)
        saved = [t.detach() for t in saved]
        bargs = (torch.randn_like(y), x, flat, y.detach(), saved, *args[2:8], [True, True], "torch_bmm")
        torch.library.opcheck(hk.ops.batched_mlp_backward_op, bargs)


def test_gradgradcheck():
    layout = hk.ParamLayout.from_module(sequential_for([3, 4, 2], "silu", "sigmoid"))
    x = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    flat = torch.randn(2, layout.numel, dtype=torch.float64, requires_grad=True)
    # squared: the first backward's grad_y then depends on the inputs too
    fn = lambda x, p: hk.batched_mlp(x, p, layout, activation="silu", output_activation="sigmoid").square()  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, flat))
    assert torch.autograd.gradgradcheck(fn, (x, flat))
