"""hk.nn.HyperNetwork: generate / forward against vmap(functional_call), what is trained, the hyperfan init
contract measured, bad input, torch.compile(fullgraph=True) of a whole training step, the fused decision, the
user's own hypernetwork (hypernet=) and bind()."""
import copy
import math
import sys

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


def test_hyperfan_init_generates_a_norms_default_values():
    """Parameters that are not weights of a linear layer or conv start at their template's mean and variance:
    a LayerNorm's weight at exactly 1 and its bias at 0 for every condition (variance 0), through head.bias."""
    template = nn.Sequential(nn.Linear(3, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    hnet = hk.nn.HyperNetwork(template, 4, hidden=(16,))
    with torch.no_grad():
        views = hnet.layout.unflatten(hnet.generate(torch.randn(64, 4)))
    torch.testing.assert_close(views["1.weight"], torch.ones(64, 8))
    torch.testing.assert_close(views["1.bias"], torch.zeros(64, 8))
    assert 1 / 18 < views["0.weight"].var().item() < 2 / 9  # 1 / (3 fan_in) within a factor 2


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
    """What batched() refuses, HyperNetwork refuses with batched()'s message."""
    with pytest.raises(ValueError, match=r"layer 1 \(LazyLinear\) is a lazy module"):
        hk.nn.HyperNetwork(nn.Sequential(nn.Linear(2, 4), nn.LazyLinear(4)), 3)


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
    for answer in (_dispatch.GENERATE, "torch_bmm"):
        monkeypatch.setattr(_dispatch, "choose_hyper_linear", lambda d, t, layers, impl=None: seen.append(layers)
                            or answer)
        monkeypatch.setattr(hk.nn.hypernetwork, "choose_hyper_linear", _dispatch.choose_hyper_linear)
        calls = _path_taken(hnet, torch.randn(4, 5), torch.randn(4, 7, 3), monkeypatch)
        assert calls == (["generate"] if answer == _dispatch.GENERATE else ["fused"])
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
def test_fused_none_on_the_issue_model_generates(batch, monkeypatch):
    """The issue's model (target 2-100-5, a 100-wide hidden layer, one point per sample): the fused head forms
    (B, 100*100) products for the second layer where generating writes (B, 505) weights; the default must not
    take it on CPU."""
    target = nn.Sequential(nn.Linear(2, 100), nn.ReLU(), nn.Linear(100, 5))
    hnet = hk.nn.HyperNetwork(target, 3, hidden=(100,))
    from hyperkernels import _dispatch

    layers = hnet._hyper_layers(torch.randn(batch, 2))
    assert _dispatch.choose_hyper_linear(torch.device("cpu"), torch.float32, layers) == _dispatch.GENERATE
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


# -- the user's own hypernetwork (hypernet=) -------------------------------------------------------------------

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
    hnet = hk.nn.HyperNetwork(target_mlp(), 5, hidden=(8,))
    bound = hnet.bind(torch.randn(4, 5))
    with pytest.raises(ValueError, match=r"x: expected batch size \(dim 0\) 4"):
        bound(torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"cond: expected shape \(B, 5\)"):
        hnet.bind(torch.randn(4, 6))


class _Wrong(nn.Module):
    def __init__(self, out):
        super().__init__()
        self.out = out
        self.lin = nn.Linear(5, 1)

    def forward(self, cond):
        return self.out(cond)


_P = sum(p.numel() for p in target_mlp().parameters())


@pytest.mark.parametrize(
    "make_out, exc, pattern",
    [
        (lambda c: torch.randn(4, _P + 1), ValueError,
         rf"hypernet output \(_Wrong\): expected a \(4, {_P}\) tensor \(B = cond.shape\[0\], P = the target's "
         rf"per-sample parameters\) or a dict .* got a tensor of shape \(4, {_P + 1}\)"),
        (lambda c: torch.randn(3, _P), ValueError,
         rf"expected a \(4, {_P}\) tensor .* got a tensor of shape \(3, {_P}\)"),
        (lambda c: torch.randn(4, _P).double(), TypeError,
         r"hypernet output \(_Wrong\): expected dtype torch.float32 \(the dtype of x\), got torch.float64"),
        (lambda c: torch.zeros(4, _P, dtype=torch.long), TypeError, r"expected a floating dtype, got torch.int64"),
        (lambda c: [torch.randn(4, _P)], TypeError, r"hypernet output \(_Wrong\): expected .* got list"),
        (lambda c: {"0.weight": torch.randn(4, 32, 2)}, ValueError,
         r"dict keys do not match the target's per-sample parameters: missing \['0.bias', '2.weight'"),
        (lambda c: {**{k: torch.randn(4, *v.shape) for k, v in target_mlp().state_dict().items()},
                    "0.weight": torch.randn(4, 2, 32)}, ValueError,
         r"hypernet output \(_Wrong\)\['0.weight'\]: expected shape \(4, 32, 2\) \(B = cond.shape\[0\]\), "
         r"got \(4, 2, 32\)"),
    ],
)
def test_their_hypernet_output_is_checked(make_out, exc, pattern):
    hnet = hk.nn.HyperNetwork(target_mlp(), hypernet=_Wrong(make_out))
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
        hk.nn.HyperNetwork(target_mlp(), **kwargs)


def test_their_hypernet_cond_and_init_errors():
    with pytest.raises(ValueError, match=r"cond_features: expected a positive int \(required unless hypernet= is "
                                         r"given\), got None"):
        hk.nn.HyperNetwork(target_mlp())
    hnet = hk.nn.HyperNetwork(target_mlp(), 5, hypernet=nn.Linear(5, _P))
    with pytest.raises(ValueError, match=r"cond: expected shape \(B, 5\) \(cond_features=5\), got shape \(4, 6\)"):
        hnet(torch.randn(4, 6), torch.randn(4, 2))
    with pytest.raises(ValueError, match=r"x: expected batch size \(dim 0\) 4 \(the batch of cond\), got 3"):
        hnet(torch.randn(4, 5), torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"reset_head_hyperfan: only for the MLP that HyperNetwork builds"):
        hnet.reset_head_hyperfan()
    hooked = nn.Sequential(nn.Linear(5, _P))
    hooked[0].register_forward_hook(lambda *a: None)
    hnet = hk.nn.HyperNetwork(target_mlp(), hypernet=hooked)
    assert hnet.head is None and "forward hooks" in repr(hnet)


def test_their_hypernet_any_cond():
    """Without cond_features the condition is whatever the module takes, e.g. indices into an embedding."""
    table = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, _P))
    hnet = hk.nn.HyperNetwork(target_mlp(), hypernet=table)
    idx = torch.tensor([3, 1, 4])
    x = torch.randn(3, 2)
    y = hnet(idx, x)
    torch.testing.assert_close(y, hk.nn.batched(target_mlp())(x, table(idx)))
