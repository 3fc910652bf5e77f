"""HyperNetwork's initialisation: the hyperfan contract measured per target layer, norms' default values, the
plain PyTorch init, reproducibility under a seed."""
import pytest
import torch
from torch import nn

import hyperkernels as hk
from conftest import hypernetwork_target


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
        nets.append(hk.nn.HyperNetwork(hypernetwork_target(), 4, hidden=(8,)))
    for p, q in zip(*(n.parameters() for n in nets)):
        assert torch.equal(p, q)
