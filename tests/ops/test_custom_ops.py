"""The batched_linear custom ops: opcheck, gradcheck / gradgradcheck, double backward, torch.compile without graph
breaks, and torch.func transforms (grad, vmap, jacrev) against the float64 reference."""
import pytest
import torch

import hyperkernels as hk
from conftest import assert_compiles_without_graph_break, backend_params
from hyperkernels.ops import batched_linear_backward_op, batched_linear_op
from reference import FORWARD_RTOL, GRAD_RTOL, assert_close, linear_reference


def _flat_views(batch, m, k, dtype, device):
    flat = torch.randn(batch, 1 + m * k + m, dtype=dtype, device=device, requires_grad=True)
    return flat[:, 1 : 1 + m * k].view(batch, m, k), flat[:, 1 + m * k :]


@pytest.mark.parametrize("backend_device", backend_params())
@pytest.mark.parametrize("channel_major", [False, True], ids=["token_major", "channel_major"])
@pytest.mark.parametrize("activation, save_preact", [("none", False), ("relu", False), ("gelu", True), ("sine", False)])
def test_opcheck(backend_device, channel_major, activation, save_preact):
    backend, device = backend_device
    weight, bias = _flat_views(3, 5, 4, torch.float32, device)
    x = torch.randn(3, 4, 7, device=device) if channel_major else torch.randn(3, 7, 4, device=device)
    x.requires_grad_()
    torch.library.opcheck(batched_linear_op, (x, weight, bias, activation, 2.0, channel_major, save_preact, backend))
    y, preact = batched_linear_op(x, weight, bias, activation, 2.0, channel_major, save_preact, backend)
    # y and preact enter the backward op as saved values; its formula differentiates through x, weight, bias.
    args = (torch.randn_like(y), x, weight, bias, y.detach(), preact.detach(), activation, 2.0, channel_major,
            [True, True, True], backend)
    torch.library.opcheck(batched_linear_backward_op, args)


@pytest.mark.parametrize("backend", ["torch_bmm", "torch_conv"])
@pytest.mark.parametrize("activation", ["none", "relu", "gelu", "silu", "tanh", "sigmoid", "sine"])
@pytest.mark.parametrize("path", ["linear", "conv1x1", "op_token_major", "op_channel_major"])
def test_gradcheck_and_gradgradcheck(backend, activation, path):
    """Squared outputs, so that the first backward's grad_y depends on the inputs too. The torch backend runs
    batched_linear / batched_conv1x1 as the plain PyTorch composition: the op itself is checked directly."""
    weight, bias = _flat_views(3, 4, 5, torch.float64, "cpu")
    weight, bias = weight.detach().requires_grad_(), bias.detach().requires_grad_()
    kw = dict(activation=activation, w0=2.0, backend=backend)
    fns = {
        "linear": lambda x, w, b: hk.batched_linear(x, w, b, **kw),
        "conv1x1": lambda x, w, b: hk.batched_conv1x1(x, w, b, **kw),
        "op_token_major": lambda x, w, b: batched_linear_op(x, w, b, activation, 2.0, False, True, backend)[0],
        "op_channel_major": lambda x, w, b: batched_linear_op(x, w, b, activation, 2.0, True, False, backend)[0],
    }
    shapes = {"linear": (3, 2, 5), "conv1x1": (3, 5, 2, 3), "op_token_major": (3, 2, 5), "op_channel_major": (3, 5, 2)}
    x = torch.randn(*shapes[path], dtype=torch.float64, requires_grad=True)
    fn = lambda x, w, b: fns[path](x, w, b).square()  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, weight, bias))
    # The conv formulation's double backward runs a grouped-conv double backward, ~10 ms each in float64 on CPU, and
    # the full second-order jacobian takes ~470 of them (10-40 s a case, 28 cases). Fast mode compares a random
    # projection u^T J v of the same jacobians, which any wrong entry changes, in ~50 of them.
    assert torch.autograd.gradgradcheck(fn, (x, weight, bias), fast_mode=backend == "torch_conv")


@pytest.mark.parametrize("backend_device", backend_params())
def test_double_backward_matches_the_torch_backend(backend_device):
    """Whatever ran the first two passes, the second derivative is the reference's."""
    backend, device = backend_device
    results = []
    for be, dev in ((backend, device), ("torch_bmm", "cpu")):
        torch.manual_seed(1)
        x = torch.randn(2, 3, 4, device=dev, requires_grad=True)
        w = (torch.randn(2, 5, 4, device=dev) / 2).requires_grad_()
        y = hk.batched_linear(x, w, activation="silu", backend=be)
        (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
        (gw,) = torch.autograd.grad(gx.sum(), w)
        results.append(gw.cpu())
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-5)


def _two_layer_mlp(x, w1, b1, w2, b2):
    h = hk.batched_linear(x, w1, b1, activation="relu")
    return hk.batched_linear(h, w2, b2, activation="tanh")


def test_torch_compile_two_layer_mlp_has_no_graph_break():
    args = [torch.randn(4, 3, 5), torch.randn(4, 8, 5), torch.randn(4, 8), torch.randn(4, 2, 8), torch.randn(4, 2)]
    assert_compiles_without_graph_break(_two_layer_mlp, [a.requires_grad_() for a in args])


def test_torch_func_grad():
    x, w, b = torch.randn(3, 2, 4), torch.randn(3, 5, 4), torch.randn(3, 5)
    loss = lambda w: hk.batched_linear(x, w, b, activation="gelu").square().sum()  # noqa: E731
    g = torch.func.grad(loss)(w)
    w_ = w.clone().requires_grad_()
    loss(w_).backward()
    torch.testing.assert_close(g, w_.grad)


def test_torch_func_vmap_and_jacrev():
    """Under torch.func transforms the op runs as its PyTorch composition (pytorch/pytorch#170834): vmap over an
    extra leading dim, and jacrev's full jacobian, against the float64 loop reference (its jacobian by
    torch.autograd.functional, which is not a torch.func transform)."""
    x, w = torch.randn(6, 3, 2, 4), torch.randn(6, 3, 5, 4)
    y = torch.vmap(lambda x, w: hk.batched_linear(x, w, activation="tanh"))(x, w)
    y_ref = torch.stack([linear_reference(x[i].double(), w[i].double(), None, "tanh") for i in range(6)])
    assert_close(y, y_ref, FORWARD_RTOL[torch.float32], "vmap")
    jac = torch.func.jacrev(lambda w: hk.batched_linear(x[0], w, activation="silu"))(w[0])
    jac_ref = torch.autograd.functional.jacobian(lambda w: linear_reference(x[0].double(), w, None, "silu"),
                                                 w[0].double())
    assert jac.shape == jac_ref.shape == (3, 2, 5, 3, 5, 4)
    assert_close(jac, jac_ref, GRAD_RTOL[torch.float32], "jacobian")


def test_double_backward_when_only_some_gradients_were_asked_for():
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 5, 4, dtype=torch.float64)  # no grad: the first backward returns an empty dweight
    fn = lambda x: hk.batched_linear(x, w, activation="tanh")  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (x,))
