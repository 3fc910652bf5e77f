"""HyperNetwork(target, hypernet=module): the user's own hypernetwork kept as is (state_dict, flat or dict output,
its last nn.Linear as the fused head), its output checked on every call, and bad construction."""
import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

import hyperkernels as hk
from conftest import hypernetwork_target


def _their_hypernet(cond_features, hidden, num_params):
    """A hypernetwork as a user writes it: an nn.Sequential ending in an nn.Linear with P outputs."""
    return nn.Sequential(nn.Linear(cond_features, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.GELU(),
                         nn.Linear(hidden, num_params))


class DictHypernet(nn.Module):
    """A hypernetwork returning a dict like target.state_dict(): one head per parameter."""

    def __init__(self, cond_features, template):
        super().__init__()
        self.shapes = {name: tuple(p.shape) for name, p in template.named_parameters()}
        self.trunk = nn.Sequential(nn.Linear(cond_features, 9), nn.SiLU())
        self.heads = nn.ModuleDict({name.replace(".", "_"): nn.Linear(9, math.prod(shape))
                                    for name, shape in self.shapes.items()})

    def forward(self, cond):
        h = self.trunk(cond)
        return {name: self.heads[name.replace(".", "_")](h).view(-1, *shape) for name, shape in self.shapes.items()}


# (B, x's shape after B): B = 1, odd sizes, one point and several per sample.
_USER_CASES = [(1, (3,)), (5, (3,)), (3, (17, 3)), (2, (4, 5, 3))]


@pytest.mark.parametrize("batch, x_shape", _USER_CASES, ids=[f"B{b}-x{s}" for b, s in _USER_CASES])
def test_their_hypernet_loads_unchanged_and_matches_batched(batch, x_shape):
    """hnet.hypernet is the user's module: its state_dict loads unchanged, and every way forward runs (fused
    head, generate, auto) equals batched(target)(x, module(cond)) in value and gradient (float64)."""
    torch.manual_seed(0)
    template = nn.Sequential(nn.Linear(3, 13), nn.Tanh(), nn.Linear(13, 7), nn.ReLU(), nn.Linear(7, 2)).double()
    num_params = sum(p.numel() for p in template.parameters())
    theirs = _their_hypernet(6, 11, num_params).double()
    checkpoint = {k: v.clone() for k, v in _their_hypernet(6, 11, num_params).double().state_dict().items()}
    mine = _their_hypernet(6, 11, num_params).double()
    hnet = hk.nn.HyperNetwork(template, hypernet=mine).double()
    assert hnet.hypernet is mine
    hnet.hypernet.load_state_dict(checkpoint)  # unchanged: the keys are the module's own
    theirs.load_state_dict(checkpoint)
    assert list(hnet.state_dict()) == [f"hypernet.{k}" for k in checkpoint]
    assert [n for n, _ in hnet.named_parameters()] == [f"hypernet.{k}" for k in checkpoint]

    cond = torch.randn(batch, 6, dtype=torch.float64)
    x = torch.randn(batch, *x_shape, dtype=torch.float64)
    dy = torch.randn(batch, *x_shape[:-1], 2, dtype=torch.float64)
    y_ref = hk.nn.batched(template)(x, theirs(cond))
    grads_ref = torch.autograd.grad(y_ref, list(theirs.parameters()), dy)
    # batched() itself against a loop over samples (the float64 oracle)
    views = hnet.layout.unflatten(theirs(cond))
    loop = torch.stack([functional_call(template, {k: v[b] for k, v in views.items()}, (x[b],)) for b in range(batch)])
    torch.testing.assert_close(y_ref, loop)
    for fused in (True, False, None):
        hnet.fused = fused
        y = hnet(cond, x)
        grads = torch.autograd.grad(y, list(hnet.parameters()), dy)
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
        for g, r in zip(grads, grads_ref):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_dict_output_hypernet_matches_batched():
    """A hypernet returning {name: (B, *shape)} (keys like target.state_dict()) runs the target on that dict;
    there is no fused head (fused=None generates) and fused=True says why; bind flattens the dict once."""
    torch.manual_seed(0)
    template = nn.Sequential(nn.Linear(3, 5), nn.Sigmoid(), nn.Linear(5, 4, bias=False)).double()
    theirs = DictHypernet(7, template).double()
    hnet = hk.nn.HyperNetwork(template, hypernet=theirs)
    assert hnet.trunk is None and hnet.head is None
    cond, x = torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 9, 3, dtype=torch.float64)
    y = hnet(cond, x)
    y_ref = hk.nn.batched(template)(x, theirs(cond))
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(y)
    for g, r in zip(torch.autograd.grad(y, list(theirs.parameters()), dy),
                    torch.autograd.grad(y_ref, list(theirs.parameters()), dy)):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    assert isinstance(hnet.generate(cond), dict)
    bound = hnet.bind(cond)
    assert bound.params.shape == (3, hnet.num_params)
    torch.testing.assert_close(bound.params, hnet.layout.flatten(theirs(cond)))
    torch.testing.assert_close(bound(x), y, rtol=1e-12, atol=1e-12)
    hnet.fused = True
    with pytest.raises(ValueError, match=r"fused=True: the head of hypernet \(DictHypernet\) cannot run fused: "
                                         r"DictHypernet is not an nn.Linear or an nn.Sequential ending in one"):
        hnet(cond, x)


@pytest.mark.parametrize("kind", ["sequential", "nested", "bare_linear"])
def test_fused_head_of_their_hypernet_equals_unfused(kind, monkeypatch):
    """The last nn.Linear of their module is the head, the layers before it the trunk: the same objects (no
    copy, not registered twice); the fused path (which never calls the module's forward) equals generating."""
    torch.manual_seed(0)
    template = nn.Sequential(nn.Conv1d(3, 6, 1), nn.ReLU(), nn.Conv1d(6, 2, 1)).double()
    p = hk.nn.batched(template).num_params
    if kind == "sequential":
        theirs = nn.Sequential(nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, p))
        last_of, trunk_of = (lambda m: m[2]), (lambda m: [m[0], m[1]])
    elif kind == "nested":
        theirs = nn.Sequential(nn.Linear(4, 10), nn.Sequential(nn.Tanh(), nn.Linear(10, p)))
        last_of, trunk_of = (lambda m: m[1][1]), (lambda m: [m[0], m[1][0]])
    else:
        theirs = nn.Linear(4, p)
        last_of, trunk_of = (lambda m: m), (lambda m: [])
    theirs = theirs.double()
    hnet = hk.nn.HyperNetwork(template, hypernet=theirs, fused=True)

    def check_parts(h):
        assert h.head is last_of(h.hypernet)
        leaves = [m for m in h.trunk.modules() if not isinstance(m, (nn.Sequential, nn.Identity))]
        assert len(leaves) == len(trunk_of(h.hypernet)) and all(a is b for a, b in zip(leaves, trunk_of(h.hypernet)))

    check_parts(hnet)
    check_parts(copy.deepcopy(hnet))  # a copy's fused head is the copy's own last layer
    assert sum(1 for _ in hnet.parameters()) == sum(1 for _ in theirs.parameters())
    cond, x = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 3, 11, dtype=torch.float64)
    results = []
    for fused in (True, False):
        hnet.fused = fused
        if fused:  # the module's own forward must not run: the head is applied fused
            monkeypatch.setattr(theirs, "forward", lambda *a: pytest.fail("the hypernet module ran"))
        y = hnet(cond, x)
        monkeypatch.undo()
        results.append((y, torch.autograd.grad(y.square().sum(), list(theirs.parameters()))))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    for g, r in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


class _Wrong(nn.Module):
    def __init__(self, out):
        super().__init__()
        self.out = out
        self.lin = nn.Linear(5, 1)

    def forward(self, cond):
        return self.out(cond)


_P = sum(p.numel() for p in hypernetwork_target().parameters())


@pytest.mark.parametrize(
    "make_out, exc, pattern",
    [
        (lambda c: torch.randn(4, _P + 1), ValueError,
         rf"hypernet output \(_Wrong\): expected flat per-sample parameters of shape \(B, {_P}\), got shape "
         rf"\(4, {_P + 1}\)"),
        (lambda c: torch.randn(3, _P), ValueError,
         r"hypernet output \(_Wrong\): expected batch size \(dim 0\) 4, got 3"),
        (lambda c: torch.randn(4, _P).double(), TypeError,
         r"hypernet output \(_Wrong\): expected dtype torch.float32 \(the dtype of x\), got torch.float64"),
        (lambda c: torch.zeros(4, _P, dtype=torch.long), TypeError, r"expected a floating dtype .*got torch.int64"),
        (lambda c: [torch.randn(4, _P)], TypeError, r"hypernet output \(_Wrong\): expected .* got a list"),
        (lambda c: {"0.weight": torch.randn(4, 32, 2)}, ValueError,
         r"hypernet output \(_Wrong\): keys do not match the per-sample parameters: missing \['0.bias', "
         r"'2.weight'"),
        (lambda c: {**{k: torch.randn(4, *v.shape) for k, v in hypernetwork_target().state_dict().items()},
                    "0.weight": torch.randn(4, 2, 32)}, ValueError,
         r"hypernet output \(_Wrong\)\['0.weight'\]: expected shape \(B, 32, 2\), got \(4, 2, 32\)"),
    ],
)
def test_their_hypernet_output_is_checked(make_out, exc, pattern):
    hnet = hk.nn.HyperNetwork(hypernetwork_target(), hypernet=_Wrong(make_out))
    with pytest.raises(exc, match=pattern):
        hnet(torch.randn(4, 5), torch.randn(4, 2))


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        ({"hidden": (8,)}, ValueError, r"hidden: not used with hypernet=, which is used as is"),
        ({"activation": "tanh", "init": "default"}, ValueError, r"activation, init: not used with hypernet="),
        ({"hypernet": lambda c: c}, TypeError, r"hypernet: expected an nn.Module mapping cond \(B, \.\.\.\) to "
                                               rf"\(B, {_P}\) or to a dict like target.state_dict\(\), got function"),
        ({"hypernet": nn.Sequential(nn.ReLU(), nn.Linear(5, 3)), "fused": True}, ValueError,
         r"fused=True: the head of hypernet \(Sequential\) cannot run fused: its output nn.Linear has "
         rf"out_features=3, not P={_P}"),
        ({"hypernet": nn.Linear(5, _P), "cond_features": 0}, ValueError,
         r"cond_features: expected a positive int, got 0"),
    ],
)
def test_their_hypernet_bad_construction(kwargs, exc, pattern):
    kwargs = {"hypernet": nn.Linear(5, _P), **kwargs}
    with pytest.raises(exc, match=pattern):
        hk.nn.HyperNetwork(hypernetwork_target(), **kwargs)


def test_their_hypernet_cond_and_init_errors():
    with pytest.raises(ValueError, match=r"cond_features: expected a positive int \(required unless hypernet= is "
                                         r"given\), got None"):
        hk.nn.HyperNetwork(hypernetwork_target())
    hnet = hk.nn.HyperNetwork(hypernetwork_target(), 5, hypernet=nn.Linear(5, _P))
    with pytest.raises(ValueError, match=r"cond: expected shape \(B, 5\) \(cond_features=5\), got shape \(4, 6\)"):
        hnet(torch.randn(4, 6), torch.randn(4, 2))
    with pytest.raises(ValueError, match=r"x: expected batch size \(dim 0\) 4 \(the batch of cond\), got 3"):
        hnet(torch.randn(4, 5), torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"reset_head_hyperfan: only for the MLP that HyperNetwork builds"):
        hnet.reset_head_hyperfan()
    hooked = nn.Sequential(nn.Linear(5, _P))
    hooked[0].register_forward_hook(lambda *a: None)
    hnet = hk.nn.HyperNetwork(hypernetwork_target(), hypernet=hooked)
    assert hnet.head is None and "forward hooks" in repr(hnet)


def test_their_hypernet_any_cond():
    """Without cond_features the condition is whatever the module takes, e.g. indices into an embedding."""
    table = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, _P))
    hnet = hk.nn.HyperNetwork(hypernetwork_target(), hypernet=table)
    idx = torch.tensor([3, 1, 4])
    x = torch.randn(3, 2)
    y = hnet(idx, x)
    torch.testing.assert_close(y, hk.nn.batched(hypernetwork_target())(x, table(idx)))
