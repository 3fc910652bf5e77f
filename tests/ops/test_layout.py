"""ParamLayout: naming and flattening identical to parameters_to_vector, zero-copy views, strict sizes."""
import pytest
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector

from hyperkernels import ParamLayout


def _mlp():
    return nn.Sequential(nn.Linear(3, 7), nn.ReLU(), nn.Linear(7, 5, bias=False), nn.Tanh(), nn.Linear(5, 2))


def test_from_module_matches_parameters_to_vector():
    net = _mlp()
    layout = ParamLayout.from_module(net)
    assert layout.names == list(net.state_dict())
    assert layout.numel == sum(p.numel() for p in net.parameters())
    flat = torch.stack([parameters_to_vector(_mlp().parameters()) for _ in range(4)])
    views = layout.unflatten(flat)
    for b in range(4):
        row = flat[b]
        start = 0
        for name, p in net.named_parameters():
            torch.testing.assert_close(views[name][b], row[start : start + p.numel()].view_as(p), rtol=0, atol=0)
            start += p.numel()


def test_unflatten_returns_views_without_copy():
    layout = ParamLayout.from_module(_mlp())
    flat = torch.randn(3, layout.numel)
    views = layout.unflatten(flat)
    for name, v in views.items():
        assert v.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
        assert v.shape == (3, *layout.shapes[name])
    views["2.weight"][1, 2, 3] = 123.0
    assert flat[1, layout.offset("2.weight") + 2 * 7 + 3] == 123.0


def test_unflatten_of_a_strided_flat_tensor_is_still_a_view():
    layout = ParamLayout.from_shapes({"w": (2, 3), "b": (2,)})
    big = torch.randn(8, layout.numel).t().contiguous().t()  # column-major (B, P)
    views = layout.unflatten(big)
    assert views["w"].untyped_storage().data_ptr() == big.untyped_storage().data_ptr()
    torch.testing.assert_close(views["w"], big[:, :6].reshape(8, 2, 3))


def test_flatten_inverts_unflatten():
    layout = ParamLayout.from_module(_mlp())
    flat = torch.randn(5, layout.numel)
    torch.testing.assert_close(layout.flatten(layout.unflatten(flat)), flat, rtol=0, atol=0)


def test_flatten_of_stack_module_state():
    nets = [_mlp() for _ in range(3)]
    stacked, _ = torch.func.stack_module_state(nets)
    layout = ParamLayout.from_module(nets[0])
    expected = torch.stack([parameters_to_vector(n.parameters()) for n in nets])
    torch.testing.assert_close(layout.flatten(stacked), expected, rtol=0, atol=0)


@pytest.mark.parametrize("p_delta", [-1, 1])
def test_wrong_flat_size_is_an_error_naming_the_expected_size(p_delta):
    layout = ParamLayout.from_module(_mlp())
    with pytest.raises(ValueError, match=rf"params: expected .*\(B, {layout.numel}\).*got shape \(2, {layout.numel + p_delta}\)"):
        layout.unflatten(torch.randn(2, layout.numel + p_delta))


def test_flat_must_be_2d_and_floating():
    layout = ParamLayout.from_shapes({"w": (2, 2)})
    with pytest.raises(ValueError, match="params: expected .*got shape \\(4,\\)"):
        layout.unflatten(torch.randn(4))
    with pytest.raises(TypeError, match="floating"):
        layout.unflatten(torch.ones(1, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="expected a Tensor"):
        layout.unflatten([[1.0] * 4])


def test_dict_with_missing_or_extra_keys_names_them():
    layout = ParamLayout.from_shapes({"0.weight": (2, 3), "0.bias": (2,)})
    with pytest.raises(ValueError, match=r"missing \['0.bias'\], unexpected \['1.bias'\]"):
        layout.flatten({"0.weight": torch.randn(4, 2, 3), "1.bias": torch.randn(4, 2)})
    with pytest.raises(ValueError, match=r"params\['0.bias'\]: expected shape \(B, 2\), got \(4, 3\)"):
        layout.flatten({"0.weight": torch.randn(4, 2, 3), "0.bias": torch.randn(4, 3)})
    with pytest.raises(ValueError, match="batch size 5 differs from 4"):
        layout.flatten({"0.weight": torch.randn(4, 2, 3), "0.bias": torch.randn(5, 2)})


def test_linear_layers():
    layers = ParamLayout.from_module(_mlp()).linear_layers()
    assert [(l.weight, l.bias, l.out_features, l.in_features) for l in layers] == [
        ("0.weight", "0.bias", 7, 3), ("2.weight", None, 5, 7), ("4.weight", "4.bias", 2, 5)
    ]
    assert ParamLayout.from_module(nn.Linear(3, 2)).linear_layers()[0].bias == "bias"
    with pytest.raises(ValueError, match="'0.scale' has shape"):
        ParamLayout.from_shapes({"0.scale": (3,)}).linear_layers()


def test_module_without_parameters_is_an_error():
    with pytest.raises(ValueError, match="has no parameters"):
        ParamLayout.from_module(nn.ReLU())
    with pytest.raises(TypeError, match="nn.Module"):
        ParamLayout.from_module("not a module")


def test_equality_and_repr():
    a = ParamLayout.from_module(nn.Linear(3, 2))
    b = ParamLayout.from_shapes({"weight": (2, 3), "bias": (2,)})
    assert a == b and hash(a) == hash(b)
    assert "numel=8" in repr(a)
