"""hk.nn.HyperNetwork: generate / forward against vmap(functional_call), what is trained, the hyperfan init
contract measured, bad input, and torch.compile(fullgraph=True) of a whole training step."""
import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, vmap

import hyperkernels as hk


def target_mlp():
    return nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))


def test_forward_is_the_target_run_on_the_generated_params():
    template = target_mlp()
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
    template = target_mlp()
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
    target = hk.nn.batched(target_mlp(), shared=("0.weight",))
    hnet = hk.nn.HyperNetwork(target, 3, hidden=()).double()
    assert hnet.target is target and isinstance(hnet.trunk, nn.Identity)
    y = hnet(torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64))
    assert y.shape == (2, 3) and y.dtype == torch.float64
    with pytest.raises(ValueError, match="give shared= to batched"):
        hk.nn.HyperNetwork(target, 3, shared=("0.bias",))


# -- the hyperfan init contract ------------------------------------------------------------------

INIT_TARGETS = {
    "mlp": lambda: nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 3)),
    "conv1x1": lambda: nn.Sequential(nn.Conv2d(5, 48, 1), nn.GELU(), nn.Conv2d(48, 7, 1)),
    "mixed": lambda: nn.Sequential(nn.Linear(7, 16), nn.SiLU(), nn.Conv1d(3, 12, 1), nn.Linear(16, 4, bias=False)),
}


@pytest.mark.parametrize("hidden, activation", [((128, 128), "relu"), ((), "relu"), ((64,), "tanh"),
                                                ((32, 32, 32), "gelu")])
@pytest.mark.parametrize("name", list(INIT_TARGETS))
def test_hyperfan_init_contract(name, hidden, activation):
    """For cond ~ N(0, I), per target layer, the generated weights pooled over samples and elements have the
    variance of the layer's default init (1 / (3 fan_in)) within a factor 2; the biases at most that."""
    template = INIT_TARGETS[name]()
    hnet = hk.nn.HyperNetwork(template, cond_features=16, hidden=hidden, activation=activation)
    with torch.no_grad():
        views = hnet.layout.unflatten(hnet.generate(torch.randn(2048, 16)))
    for mod_name, module in template.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            continue
        fan_in = module.weight[0].numel()
        default = 1.0 / (3 * fan_in)
        # the default init really has this variance (measured on the template itself)
        assert 0.7 < module.weight.detach().var().item() / default < 1.3 or module.weight.numel() < 200
        w = views[f"{mod_name}.weight"].var().item()
        assert default / 2 <= w <= 2 * default, f"{mod_name}.weight: variance {w:.3g}, default {default:.3g}"
        if module.bias is not None:
            b = views[f"{mod_name}.bias"].var().item()
            assert b <= default, f"{mod_name}.bias: variance {b:.3g} > default {default:.3g}"


def test_default_init_keeps_pytorch_init():
    """init="default" is plain nn.Linear init: the generated variance is unrelated to the target's fan-in."""
    template = INIT_TARGETS["mlp"]()
    hnet = hk.nn.HyperNetwork(template, 16, init="default")
    fresh = nn.Linear(128, hnet.num_params)
    assert abs(hnet.head.weight.std().item() - fresh.weight.std().item()) < 0.1 * fresh.weight.std().item()
    with torch.no_grad():
        views = hnet.layout.unflatten(hnet.generate(torch.randn(2048, 16)))
    ratios = [views[f"{i}.weight"].var().item() * 3 * template[i].in_features for i in (0, 2, 4)]
    assert max(ratios) / min(ratios) > 4  # far from the contract: layer 0 is about 30x too small


def test_init_is_reproducible_under_a_seed():
    nets = []
    for _ in range(2):
        torch.manual_seed(1)
        nets.append(hk.nn.HyperNetwork(target_mlp(), 4, hidden=(8,)))
    for p, q in zip(*(n.parameters() for n in nets)):
        assert torch.equal(p, q)


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
    hnet = hk.nn.HyperNetwork(target_mlp(), 5, hidden=(8,))
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
        hk.nn.HyperNetwork(target_mlp(), **kwargs)


def test_bad_target():
    with pytest.raises(ValueError, match=r"layer 1 \(BatchNorm1d\) is not supported"):
        hk.nn.HyperNetwork(nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4)), 3)


def test_activation_factory():
    hnet = hk.nn.HyperNetwork(target_mlp(), 4, hidden=(8,), activation=lambda: nn.LeakyReLU(0.1))
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


# -- fused: the head run through hyper_linear, the target's weights never materialised -------------------------

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


def test_fused_none_follows_the_hyper_linear_rule(monkeypatch):
    hnet = hk.nn.HyperNetwork(nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)), 5, hidden=(16,))
    assert hnet.fused is None
    calls = []
    monkeypatch.setattr(type(hnet.target), "forward_from_head",
                        lambda self, *a: calls.append("fused") or torch.zeros(4, 2))
    hnet(torch.randn(4, 5), torch.randn(4, 3))  # one point per sample: fused on CPU
    hnet(torch.randn(4, 5), torch.randn(4, 64, 3))  # many points: generate-then-apply
    assert calls == ["fused"]


def test_fused_must_be_a_bool_or_none():
    hnet = hk.nn.HyperNetwork(nn.Linear(3, 2), 5, hidden=(4,))
    hnet.fused = "yes"
    with pytest.raises(TypeError, match="fused: expected True, False or None, got 'yes'"):
        hnet(torch.randn(2, 5), torch.randn(2, 3))
