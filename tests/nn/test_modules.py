"""The per-sample layer modules BatchedLinear, BatchedConv1x1, BatchedMLP and HyperLinear: explicit weights, flat and
dict params, their layouts, initialisation, bad arguments."""
import pytest
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector

import hyperkernels as hk
from conftest import ops_making_params_sized_tensors_in_backward
from reference import FORWARD_RTOL, GRAD_RTOL, assert_close, conv1x1_reference, linear_reference


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_shape", [(6, 3), (6, 5, 3)], ids=["N1", "N5"])
def test_batched_linear_flat_dict_and_explicit_agree_with_the_reference(bias, x_shape):
    layer = hk.nn.BatchedLinear(3, 4, bias=bias, activation="gelu")
    assert layer.layout == hk.ParamLayout.from_module(nn.Linear(3, 4, bias=bias))
    flat = torch.randn(6, layer.num_params, dtype=torch.float64, requires_grad=True)
    x = torch.randn(*x_shape, dtype=torch.float64)
    views = layer.layout.unflatten(flat)
    ref_flat = flat.detach().clone().requires_grad_()
    ref_views = layer.layout.unflatten(ref_flat)
    y_ref = linear_reference(x, ref_views["weight"], ref_views.get("bias"), "gelu")
    grad = torch.randn_like(y_ref)
    y_ref.backward(grad)
    for args in ((flat,), (views,), (views["weight"], views.get("bias"))):
        flat.grad = None
        y = layer(x, *args)
        assert_close(y, y_ref, FORWARD_RTOL[torch.float64])
        y.backward(grad)
        assert_close(flat.grad, ref_flat.grad, GRAD_RTOL[torch.float64], "dparams")


def test_batched_linear_flat_params_get_one_gradient_tensor():
    """With flat params the layer runs as a one-layer fused MLP on the flat tensor itself: its backward makes one
    (B, P) tensor, the gradient, where running on views of it would add a zero-filled (B, P) buffer per view."""
    layer = hk.nn.BatchedLinear(3, 4)
    flat = torch.randn(2, layer.num_params, requires_grad=True)
    x = torch.randn(2, 5, 3)
    assert len(ops_making_params_sized_tensors_in_backward(layer(x, flat), flat)) == 1
    views = layer.layout.unflatten(flat)
    assert len(ops_making_params_sized_tensors_in_backward(layer(x, views["weight"], views["bias"]), flat)) > 2


def test_batched_linear_matches_a_loop_of_nn_linear():
    nets = [nn.Linear(3, 4) for _ in range(5)]
    flat = torch.stack([parameters_to_vector(n.parameters()) for n in nets]).detach()
    x = torch.randn(5, 7, 3)
    expected = torch.stack([n(x[i]) for i, n in enumerate(nets)])
    torch.testing.assert_close(hk.nn.BatchedLinear(3, 4)(x, flat), expected)


@pytest.mark.parametrize("spatial", [(7,), (3, 4), (2, 3, 2)])
def test_batched_conv1x1_flat_dict_and_explicit(spatial):
    layer = hk.nn.BatchedConv1x1(3, 5, activation="relu")
    flat = torch.randn(4, layer.num_params, dtype=torch.float64)
    x = torch.randn(4, 3, *spatial, dtype=torch.float64)
    views = layer.layout.unflatten(flat)
    y_ref = conv1x1_reference(x, views["weight"], views["bias"], "relu")
    for args in ((flat,), (views,), (views["weight"], views["bias"])):
        assert_close(layer(x, *args), y_ref, FORWARD_RTOL[torch.float64])


def test_repr():
    assert "in_features=3, out_features=4, bias=True, activation='sine', w0=2.0" in repr(
        hk.nn.BatchedLinear(3, 4, activation="sine", w0=2.0))
    assert "in_channels=3, out_channels=5, bias=False" in repr(hk.nn.BatchedConv1x1(3, 5, bias=False))


@pytest.mark.parametrize(
    "call, exc, pattern",
    [
        (lambda l: l(torch.randn(2, 3), torch.randn(2, 4, 3)), ValueError, "built with bias=True: pass bias"),
        (lambda l: l(torch.randn(2, 3), torch.randn(2, 16), torch.randn(2, 4)), ValueError, "inside params"),
        (lambda l: l(torch.randn(2, 3), torch.randn(2, 15)), ValueError, r"\(B, 16\).*got shape \(2, 15\)"),
        (lambda l: l(torch.randn(2, 3), {"weight": torch.randn(2, 4, 3)}), ValueError, r"missing \['bias'\]"),
        (lambda l: l(torch.randn(2, 5), torch.randn(2, 16)), ValueError, r"x: expected in_features \(last dim\) 3"),
    ],
)
def test_bad_arguments(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(hk.nn.BatchedLinear(3, 4))


def test_bias_given_to_a_layer_without_bias():
    with pytest.raises(ValueError, match="built with bias=False"):
        hk.nn.BatchedLinear(3, 4, bias=False)(torch.randn(2, 3), torch.randn(2, 4, 3), torch.randn(2, 4))


def test_batched_mlp_module_layout_is_that_of_the_sequential():
    mlp = hk.nn.BatchedMLP([16, 64, 64, 3])
    net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
    assert mlp.layout == hk.ParamLayout.from_module(net)
    assert mlp.num_params == sum(p.numel() for p in net.parameters())
    flat = parameters_to_vector(net.parameters()).unsqueeze(0).repeat(5, 1)
    x = torch.randn(5, 16)
    torch.testing.assert_close(mlp(x, flat), net(x))
    assert hk.nn.BatchedMLP([4, 2], bias=False).layout.names == ["0.weight"]


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
