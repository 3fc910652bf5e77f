"""hk.nn.HyperNetwork: generate / forward against vmap(functional_call), what is trained, bad input and
construction, torch.compile(fullgraph=True) of a whole training step."""
import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, vmap

import hyperkernels as hk
from conftest import hypernetwork_target


def test_forward_is_the_target_run_on_the_generated_params():
    template = hypernetwork_target()
    hnet = hk.nn.HyperNetwork(template, cond_features=5, hidden=(16, 16))
    cond, x = torch.randn(4, 5), torch.randn(4, 9, 2)
    flat = hnet.generate(cond)
    assert flat.shape == (4, hnet.num_params) == (4, hnet.layout.numel)
    assert hnet.layout == hk.ParamLayout.from_module(template)
    y = hnet(cond, x)
    ref = vmap(lambda p, xb: functional_call(template, p, (xb,)))(hnet.layout.unflatten(flat), x)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(hnet.generate(cond), hnet.head(hnet.trunk(cond)))


def test_template_is_not_trained_and_shared_params_are():
    template = hypernetwork_target()
    before = copy.deepcopy(template.state_dict())
    hnet = hk.nn.HyperNetwork(template, cond_features=5, hidden=(16,), shared=("4.bias",))
    names = [n for n, _ in hnet.named_parameters()]
    assert names == ["target.shared.4_bias", "trunk.0.weight", "trunk.0.bias", "head.weight", "head.bias"]
    assert not any(p is q for p in hnet.parameters() for q in template.parameters())
    assert hnet.num_params == sum(p.numel() for p in template.parameters()) - 3
    opt = torch.optim.SGD(hnet.parameters(), lr=0.1)
    shared_before = hnet.target.shared_parameters()["4.bias"].detach().clone()
    for _ in range(2):
        opt.zero_grad()
        hnet(torch.randn(4, 5), torch.randn(4, 2)).square().mean().backward()
        opt.step()
    for k, v in template.state_dict().items():
        assert torch.equal(v, before[k]), f"template parameter {k} changed"
    assert not torch.equal(hnet.target.shared_parameters()["4.bias"], shared_before)


def test_accepts_a_batched_target_and_float64():
    target = hk.nn.batched(hypernetwork_target(), shared=("0.weight",))
    hnet = hk.nn.HyperNetwork(target, 3, hidden=()).double()
    assert hnet.target is target and isinstance(hnet.trunk, nn.Identity)
    y = hnet(torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64))
    assert y.shape == (2, 3) and y.dtype == torch.float64
    with pytest.raises(ValueError, match="give shared= to batched"):
        hk.nn.HyperNetwork(target, 3, shared=("0.bias",))


# -- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "call, exc, pattern",
    [
        (lambda h: h(torch.randn(4, 6), torch.randn(4, 2)), ValueError, r"cond: expected shape \(B, 5\) .* got shape \(4, 6\)"),
        (lambda h: h(torch.randn(5), torch.randn(4, 2)), ValueError, r"cond: expected shape \(B, 5\)"),
        (lambda h: h(torch.randn(4, 5).double(), torch.randn(4, 2)), TypeError, r"cond: expected dtype torch.float32"),
        (lambda h: h(torch.randn(4, 5).to("meta"), torch.randn(4, 2)), ValueError, r"cond: expected device cpu"),
        (lambda h: h("cond", torch.randn(4, 2)), TypeError, r"cond: expected a Tensor"),
        (lambda h: h(torch.randn(4, 5), torch.randn(3, 2)), ValueError, r"x: expected batch size \(dim 0\) 4"),
        (lambda h: h(torch.randn(4, 5), torch.randn(4, 7, 3)), ValueError, r"x: expected in_features \(last dim\) 2"),
        (lambda h: h(torch.randn(4, 5), torch.randn(4, 2).double()), TypeError, r"x: expected dtype torch.float32"),
        (lambda h: h.generate(torch.randn(4, 4)), ValueError, r"cond: expected shape \(B, 5\)"),
    ],
)
def test_bad_input_is_refused_before_anything_runs(call, exc, pattern):
    hnet = hk.nn.HyperNetwork(hypernetwork_target(), 5, hidden=(8,))
    calls = []
    hnet.trunk.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(exc, match=pattern):
        call(hnet)
    assert not calls, "the hypernetwork ran before the error"


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        ({"cond_features": 0}, ValueError, r"cond_features: expected a positive int"),
        ({"cond_features": 4, "hidden": (8, 0)}, ValueError, r"hidden: expected a sequence of positive ints"),
        ({"cond_features": 4, "activation": "swish"}, ValueError, r"activation: expected one of"),
        ({"cond_features": 4, "activation": 3}, TypeError, r"activation: expected a string or a callable"),
        ({"cond_features": 4, "init": "xavier"}, ValueError, r"init: expected 'hyperfan' or 'default'"),
        ({"cond_features": 4, "shared": ("0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias")},
         ValueError, r"no per-sample parameters left"),
    ],
)
def test_bad_construction(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        hk.nn.HyperNetwork(hypernetwork_target(), **kwargs)


def test_bad_target():
    """What batched() refuses, HyperNetwork refuses with batched()'s message."""
    with pytest.raises(ValueError, match=r"layer 1 \(LazyLinear\) is a lazy module"):
        hk.nn.HyperNetwork(nn.Sequential(nn.Linear(2, 4), nn.LazyLinear(4)), 3)


def test_activation_factory():
    hnet = hk.nn.HyperNetwork(hypernetwork_target(), 4, hidden=(8,), activation=lambda: nn.LeakyReLU(0.1))
    assert isinstance(hnet.trunk[1], nn.LeakyReLU)


# -- torch.compile of a whole training step --------------------------------------------------------

def test_torch_compile_whole_training_step_fullgraph():
    """Forward, backward and an optimizer step in one graph (fullgraph=True: any graph break raises), with a
    shared parameter too; the compiled steps match eager ones.

    torch.optim's step() breaks graphs on purpose (pytorch#104053), so the step here is a foreach SGD update;
    torch.autograd.grad inside the graph needs torch._dynamo.config.trace_autograd_ops."""
    torch.manual_seed(0)
    template = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    eager = hk.nn.HyperNetwork(template, 4, hidden=(16,), shared=("4.bias",))
    compiled_net = copy.deepcopy(eager)

    def make_step(hnet):
        params = list(hnet.parameters())

        def step(cond, x, y):
            loss = (hnet(cond, x) - y).square().mean()
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                torch._foreach_add_(params, grads, alpha=-0.05)
            return loss.detach()
        return step

    data = [(torch.randn(5, 4), torch.randn(5, 7, 2), torch.randn(5, 7, 3))] * 3  # one batch, fitted
    eager_step = make_step(eager)
    eager_losses = [eager_step(*d) for d in data]
    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled_step = torch.compile(make_step(compiled_net), fullgraph=True)
        compiled_losses = [compiled_step(*d) for d in data]
    torch.testing.assert_close(torch.stack(compiled_losses), torch.stack(eager_losses), rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(compiled_net.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert compiled_losses[-1] < compiled_losses[0]
