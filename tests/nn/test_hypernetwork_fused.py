"""HyperNetwork(fused=...): the head run through hyper_linear changes nothing but how forward runs, never
materialises the target's weights, and fused=None follows one cost-model decision over the target's layers."""
import pytest
import torch
from torch import nn

import hyperkernels as hk


_FUSED_TARGETS = {
    "mlp": (lambda: nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 16, bias=False), nn.GELU(),
                                  nn.Linear(16, 2)), (4, 7, 3)),
    "single_point": (lambda: nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)), (4, 3)),
    "conv": (lambda: nn.Sequential(nn.Conv2d(3, 8, 1), nn.SiLU(), nn.Conv2d(8, 4, 1)), (4, 3, 5, 6)),
}


@pytest.mark.parametrize("shared", [(), ("2.weight",)], ids=["all_generated", "shared_weight"])
@pytest.mark.parametrize("target_name", list(_FUSED_TARGETS))
def test_fused_changes_nothing_but_how_forward_runs(target_name, shared):
    make, x_shape = _FUSED_TARGETS[target_name]
    torch.manual_seed(0)
    hnet = hk.nn.HyperNetwork(make(), 5, hidden=(32,), shared=shared).double()
    state = {k: v.clone() for k, v in hnet.state_dict().items()}
    cond = torch.randn(4, 5, dtype=torch.float64)
    x = torch.randn(*x_shape, dtype=torch.float64)
    results = []
    for fused in (False, True, None):
        hnet.fused = fused
        hnet.zero_grad()
        y = hnet(cond, x)
        y.square().sum().backward()
        results.append((y.detach(), [p.grad.clone() for p in hnet.parameters()]))
    for y, grads in results[1:]:
        torch.testing.assert_close(y, results[0][0])
        for g, g_ref in zip(grads, results[0][1]):
            torch.testing.assert_close(g, g_ref)
    assert hnet.state_dict().keys() == state.keys()
    for k, v in hnet.state_dict().items():
        assert torch.equal(v, state[k])


def test_fused_never_materialises_the_target_weights(monkeypatch):
    torch.manual_seed(0)
    hnet = hk.nn.HyperNetwork(nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)), 5, hidden=(16,), fused=True)

    def no_generation(*args, **kwargs):
        raise AssertionError("the head ran as an nn.Linear: the per-sample weights were materialised")

    monkeypatch.setattr(hnet.head, "forward", no_generation)
    hnet(torch.randn(4, 5), torch.randn(4, 9, 3)).sum().backward()
    assert hnet.head.weight.grad is not None
    hnet.fused = False
    with pytest.raises(AssertionError, match="materialised"):
        hnet(torch.randn(4, 5), torch.randn(4, 9, 3))


def _path_taken(hnet, cond, x, monkeypatch):
    """Which way forward ran: "fused" (forward_from_head) or "generate" (the target on generated params)."""
    calls = []
    real_fused, real_forward = type(hnet.target).forward_from_head, type(hnet.target).forward
    monkeypatch.setattr(type(hnet.target), "forward_from_head",
                        lambda self, *a: calls.append("fused") or real_fused(self, *a))
    monkeypatch.setattr(type(hnet.target), "forward",
                        lambda self, *a: calls.append("generate") or real_forward(self, *a))
    with torch.no_grad():
        hnet(cond, x)
    monkeypatch.undo()
    return calls


def test_fused_none_is_one_cost_model_decision_over_the_layers(monkeypatch):
    """fused=None asks the hyper_linear cost model once, with every generated layer of the target (its in, out,
    bias; K; the points per sample; whether x needs a gradient), and follows its answer."""
    from hyperkernels import _dispatch

    hnet = hk.nn.HyperNetwork(nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2, bias=False)), 5, hidden=(16,))
    assert hnet.fused is None
    seen = []
    for generate in (True, False):
        monkeypatch.setattr(hk.ops.hyper_linear, "generate_is_better",
                            lambda d, t, layers, impl=None: seen.append(layers) or generate)
        calls = _path_taken(hnet, torch.randn(4, 5), torch.randn(4, 7, 3), monkeypatch)
        assert calls == (["generate"] if generate else ["fused"])
    # At 7 points per sample the torch backend runs the two layers as one batched_mlp op (mlp_op).
    shape = dict(itemsize=4, grad=False, mlp_op=True)
    assert seen[0] == [_dispatch.HyperShape(4, 7, 3, 8, 16, True, True, x_grad=False, **shape),
                       _dispatch.HyperShape(4, 7, 8, 2, 16, False, True, x_grad=False, **shape)]
    hnet.train()
    x = torch.randn(4, 7, 3)
    assert hnet._hyper_layers(x)[1] == _dispatch.HyperShape(4, 7, 8, 2, 16, False, True, 4, True, True, True)
    # From _TORCH_MLP_COMPOSITION_MIN_N points on, the layers run one by one as PyTorch's composition.
    many = _dispatch._TORCH_MLP_COMPOSITION_MIN_N
    assert [s.mlp_op for s in hnet._hyper_layers(torch.randn(4, many, 3))] == [False, False]
    assert [s.mlp_op for s in hnet._hyper_layers(torch.randn(4, many - 1, 3))] == [True, True]
    # A target with a per-sample step (here a LayerNorm) runs whole under vmap on CPU: no batched_mlp op.
    normed = hk.nn.HyperNetwork(nn.Sequential(nn.Linear(3, 6), nn.LayerNorm(6), nn.Linear(6, 6), nn.ReLU(),
                                              nn.Linear(6, 3)), 5, hidden=(16,))
    assert [s.mlp_op for s in normed._hyper_layers(torch.randn(4, 3))] == [False, False, False]


@pytest.mark.parametrize("batch", [512, 4096])
def test_fused_none_on_a_2_100_5_target_generates(batch, monkeypatch):
    """A 2-100-5 target (a 100-wide hidden layer, one point per sample): the fused head forms
    (B, 100*100) products for the second layer where generating writes (B, 505) weights; the default must not
    take it on CPU."""
    target = nn.Sequential(nn.Linear(2, 100), nn.ReLU(), nn.Linear(100, 5))
    hnet = hk.nn.HyperNetwork(target, 3, hidden=(100,))
    from hyperkernels import _dispatch

    layers = hnet._hyper_layers(torch.randn(batch, 2))
    assert _dispatch.generate_is_better(torch.device("cpu"), torch.float32, layers)
    assert _path_taken(hnet, torch.randn(8, 3), torch.randn(8, 2), monkeypatch) == ["generate"]


def test_fused_none_takes_the_fused_head_where_it_wins(monkeypatch):
    """Wide target layers generated from a narrow hidden state at one point per sample: writing the weights would
    cost out*in per sample against in*K products; the default fuses."""
    target = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256))
    hnet = hk.nn.HyperNetwork(target, 4, hidden=(8,))
    assert _path_taken(hnet, torch.randn(64, 4), torch.randn(64, 64), monkeypatch) == ["fused"]


def test_fused_must_be_a_bool_or_none():
    hnet = hk.nn.HyperNetwork(nn.Linear(3, 2), 5, hidden=(4,))
    hnet.fused = "yes"
    with pytest.raises(TypeError, match="fused: expected True, False or None, got 'yes'"):
        hnet(torch.randn(2, 5), torch.randn(2, 3))
