"""hk.nn.batched's bad input: modules it refuses (naming the layer and what to write instead), modules it once refused
and now runs per sample, and bad forward input (params, x, shared parameters, convs)."""
import pytest
import torch
from torch import nn

import hyperkernels as hk


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
