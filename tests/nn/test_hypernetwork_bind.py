"""HyperNetwork.bind(cond): generated once, equal to forward in value and gradient over solver loops, the params cut
into views once, and x checked like forward."""
import sys

import pytest
import torch
from torch import nn

import hyperkernels as hk
from conftest import hypernetwork_target


def test_bind_equals_forward_in_value_and_gradient_over_a_solver_loop():
    """bind(cond) generates once; a 3-step RK4 loop (12 target calls) through it equals calling hnet(cond, .) at
    every evaluation, in value and in the gradients of every hypernetwork parameter and of cond (float64);
    the hypernetwork runs once instead of 12 times."""
    torch.manual_seed(0)
    target = nn.Sequential(nn.Linear(3, 17), nn.Tanh(), nn.Linear(17, 2))
    hnet = hk.nn.HyperNetwork(target, 5, hidden=(19,), shared=("2.bias",)).double()
    runs = []
    hnet.trunk.register_forward_hook(lambda *a: runs.append(1))
    cond = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    z0 = torch.randn(4, 2, dtype=torch.float64)

    def rk4(f, z, steps=3, dt=0.1):
        for step in range(steps):
            t = torch.full((z.shape[0], 1), step * dt, dtype=z.dtype)
            k1 = f(torch.cat([z, t], 1))
            k2 = f(torch.cat([z + dt / 2 * k1, t + dt / 2], 1))
            k3 = f(torch.cat([z + dt / 2 * k2, t + dt / 2], 1))
            k4 = f(torch.cat([z + dt * k3, t + dt], 1))
            z = z + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return z

    wrt = [cond, *hnet.parameters()]
    bound = hnet.bind(cond)
    assert isinstance(bound, hk.nn.BoundTarget) and bound.target is hnet.target
    assert bound.params.shape == (4, hnet.num_params) and bound.batch_size == 4
    torch.testing.assert_close(bound.params, hnet.generate(cond))
    runs.clear()
    z_bound = rk4(bound, z0)
    assert not runs, "the hypernetwork ran again inside the loop"
    grads_bound = torch.autograd.grad(z_bound.square().sum(), wrt)
    z_each = rk4(lambda x: hnet(cond, x), z0)
    assert len(runs) == 12
    grads_each = torch.autograd.grad(z_each.square().sum(), wrt)
    torch.testing.assert_close(z_bound, z_each, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads_bound, grads_each):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def _bind_targets():
    """(name, target, shared, x shape), each target mapping x to its own shape: an MLP at one point per sample
    and at several (odd, non-power-of-two sizes), a 1x1-conv target, and one with a LayerNorm (run per sample as
    a whole on CPU)."""
    return [
        ("mlp N=1", nn.Sequential(nn.Linear(3, 7), nn.Tanh(), nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3)), (),
         (5, 3)),
        ("mlp N=6", nn.Sequential(nn.Linear(3, 9), nn.GELU(), nn.Linear(9, 3)), ("0.bias",), (5, 6, 3)),
        ("conv1x1", nn.Sequential(nn.Conv1d(3, 4, 1), nn.SiLU(), nn.Conv1d(4, 3, 1)), (), (5, 3, 7)),
        ("layernorm", nn.Sequential(nn.Linear(3, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)), (), (5, 3)),
    ]


@pytest.mark.parametrize("case", range(len(_bind_targets())), ids=[c[0] for c in _bind_targets()])
def test_bind_over_many_calls_equals_forward_and_cuts_params_once(case, monkeypatch):
    """Several calls through bind (each on the previous output, as a solver does) equal hnet(cond, .) per call in
    value and in the gradients of cond, x and every parameter (float64). On CPU (the torch backend) the flat
    params are cut into per-layer views once for all calls, and no call runs the fused batched_mlp op."""
    batched_module = sys.modules["hyperkernels.nn.batched"]  # the package's name "batched" is the function

    name, target, shared, x_shape = _bind_targets()[case]
    torch.manual_seed(case)
    hnet = hk.nn.HyperNetwork(target, 4, hidden=(11,), shared=shared).double()
    cond = torch.randn(x_shape[0], 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(x_shape, dtype=torch.float64, requires_grad=True)
    wrt = [cond, x, *hnet.parameters()]

    def loop(f):
        y = x
        for _ in range(4):
            y = x + 0.5 * torch.tanh(f(y))
        return y

    cuts, real_split = [], type(hnet.target).split_params
    monkeypatch.setattr(type(hnet.target), "split_params", lambda self, p: cuts.append(1) or real_split(self, p))
    monkeypatch.setattr(batched_module, "run_fused_mlp", lambda *a: pytest.fail("a bound call ran batched_mlp"))
    bound = hnet.bind(cond)
    y_bound = loop(bound)
    assert len(cuts) == 1, f"{name}: params cut into views {len(cuts)} times for 4 calls"
    grads_bound = torch.autograd.grad(y_bound.square().sum(), wrt)
    monkeypatch.undo()
    for fused in (False, None) + ((True,) if name != "layernorm" else ()):
        hnet.fused = fused
        y_each = loop(lambda v: hnet(cond, v))
        grads_each = torch.autograd.grad(y_each.square().sum(), wrt)
        torch.testing.assert_close(y_bound, y_each, rtol=1e-12, atol=1e-12)
        for g, r in zip(grads_bound, grads_each):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_bind_runs_the_flat_params_where_linear_layers_are_not_the_composition(monkeypatch):
    """Where the backend's linear layers are its own kernels (not PyTorch's composition), each call runs the
    fused MLP as one op on the flat params themselves (the views' buffer, read in place), not layer by layer and
    not on a copy; value and gradient as forward."""
    batched_module = sys.modules["hyperkernels.nn.batched"]
    hnet = hk.nn.HyperNetwork(nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)), 4, hidden=(6,)).double()
    cond = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 3, dtype=torch.float64)
    expected = hnet(cond, x)
    (g_expected,) = torch.autograd.grad(expected.square().sum(), cond)
    seen, real_run = [], batched_module.run_fused_mlp
    monkeypatch.setattr(batched_module, "linear_is_composition", lambda backend, like: False)
    monkeypatch.setattr(batched_module, "run_fused_mlp", lambda h, flat, *a: seen.append(flat) or real_run(h, flat, *a))
    bound = hnet.bind(cond)
    y = bound(x)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(y.square().sum(), cond)[0], g_expected, rtol=1e-12, atol=1e-12)
    assert len(seen) == 1 and seen[0] is bound.params


def test_bind_checks_x_like_forward():
    hnet = hk.nn.HyperNetwork(hypernetwork_target(), 5, hidden=(8,))
    bound = hnet.bind(torch.randn(4, 5))
    with pytest.raises(ValueError, match=r"x: expected batch size \(dim 0\) 4"):
        bound(torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"cond: expected shape \(B, 5\)"):
        hnet.bind(torch.randn(4, 6))
