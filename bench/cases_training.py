"""End-to-end benchmark cases: one training step of a hypernetwork and the per-sample target MLP it generates.

Every method trains its own copy of the same hypernetwork, from identical weights, on the same data:

* ``vmap(functional_call)``, the baseline, written the way users write it today: their own hypernetwork
  (an ``nn.Sequential`` ending in a ``Linear`` to the target's P parameters) produces a flat ``(B, P)`` vector,
  cut by hand into views shaped like the target's parameters, run by
  ``vmap(lambda p, x: functional_call(template, p, (x,)))``;
* ``batched[backend]``: the same hypernetwork module, the target run by ``hk.nn.batched(template)`` on its
  flat output;
* ``HyperNetwork()``: ``hk.nn.HyperNetwork`` with its defaults (``fused=None``: the head runs fused into the
  target where hyper_linear's auto rule says so), and with ``fused=False`` (generate, then run the target)
  and, for one point per sample, ``fused=True``.

What the runner's columns mean here: "fwd" is the forward pass to the predictions (compared with the
baseline's before timing, so every row computes the same thing); "fwd+bwd" is a whole training step:
``zero_grad``, forward, MSE loss, ``backward``, and an Adam step, each method on its own copy and optimizer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.func import functional_call, vmap

import hyperkernels as hk
from cases import Problem

_ACT_MODULES = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


@dataclass
class TrainingCase:
    """A hypernetwork ``cond_features -> hidden -> P`` generating a target MLP ``sizes``, run on ``n`` points per
    sample (``n == 1``: ``x`` is ``(B, in)``, one vector per sample; else ``(B, n, in)``)."""

    name: str
    batch: int
    n: int
    sizes: list
    dtype: torch.dtype
    cond_features: int = 16
    hidden: tuple = (128, 128)
    activation: Optional[str] = "relu"
    # Small enough that thousands of timed steps keep the weights near where they started (no overflow,
    # no denormals), large enough that Adam really updates every parameter.
    lr: float = 1e-4

    def template(self) -> nn.Sequential:
        layers = []
        for i, (k, m) in enumerate(zip(self.sizes[:-1], self.sizes[1:])):
            layers.append(nn.Linear(k, m))
            if i < len(self.sizes) - 2:
                layers.append(_ACT_MODULES[self.activation]())
        return nn.Sequential(*layers)

    @property
    def num_params(self) -> int:
        return sum(k * m + m for k, m in zip(self.sizes[:-1], self.sizes[1:]))

    def flops(self) -> float:
        """The forward's multiply-adds, x2: hypernetwork (trunk and head) and target."""
        widths = [self.cond_features, *self.hidden, self.num_params]
        hyper = sum(k * m for k, m in zip(widths[:-1], widths[1:]))
        target = self.n * sum(k * m for k, m in zip(self.sizes[:-1], self.sizes[1:]))
        return 2.0 * self.batch * (hyper + target)

    def bytes_moved(self, itemsize: int) -> float:
        """The forward's floor: the hypernetwork's weights read once, the generated params written and read
        once, the points and the outputs moved once."""
        widths = [self.cond_features, *self.hidden, self.num_params]
        hyper_weights = sum(k * m + m for k, m in zip(widths[:-1], widths[1:]))
        per_sample = 2 * self.num_params + self.n * (self.sizes[0] + self.sizes[-1])
        return float(itemsize * (hyper_weights + self.batch * per_sample))

    def build(self, device: torch.device, backends: list) -> Problem:
        return build(self, device, backends)


def _users_hypernetwork(case: TrainingCase, weights_from: nn.Module) -> nn.Sequential:
    """The hypernetwork a user writes by hand, holding a copy of ``weights_from``'s parameters (a
    ``HyperNetwork`` of the same sizes: trunk then head, the same order of parameters)."""
    layers, width = [], case.cond_features
    for h in case.hidden:
        layers += [nn.Linear(width, h), _ACT_MODULES[case.activation]()]
        width = h
    net = nn.Sequential(*layers, nn.Linear(width, case.num_params))
    net = net.to(device=weights_from.head.weight.device, dtype=weights_from.head.weight.dtype)
    source = list(weights_from.parameters())
    mine = list(net.parameters())
    if [p.shape for p in mine] != [p.shape for p in source]:
        raise AssertionError(f"the hand-written hypernetwork's parameters {[tuple(p.shape) for p in mine]} do not "
                             f"match HyperNetwork's {[tuple(p.shape) for p in source]}")
    with torch.no_grad():
        for p, q in zip(mine, source):
            p.copy_(q)
    return net


def _unflatten_by_hand(template: nn.Module):
    """Cut a flat ``(B, P)`` tensor into ``(B, *shape)`` views of the template's parameters, in
    ``parameters_to_vector`` order: what users write without a ParamLayout."""
    shapes = [(name, p.shape) for name, p in template.named_parameters()]

    def unflatten(flat):
        out, start = {}, 0
        for name, shape in shapes:
            size = math.prod(shape)
            out[name] = flat[:, start:start + size].view(flat.shape[0], *shape)
            start += size
        return out

    return unflatten


def build(case: TrainingCase, device: torch.device, backends: list) -> Problem:
    torch.manual_seed(0)
    template = case.template().to(device=device, dtype=case.dtype)
    # The default HyperNetwork's weights (its "hyperfan" initialisation) are every method's starting point.
    reference = hk.nn.HyperNetwork(template, case.cond_features, hidden=case.hidden,
                                   activation=case.activation).to(device=device, dtype=case.dtype)
    state = reference.state_dict()
    cond = torch.randn(case.batch, case.cond_features, device=device, dtype=case.dtype)
    x_shape = (case.batch, case.sizes[0]) if case.n == 1 else (case.batch, case.n, case.sizes[0])
    x = torch.rand(x_shape, device=device, dtype=case.dtype)
    y = torch.rand(*x_shape[:-1], case.sizes[-1], device=device, dtype=case.dtype)
    methods, steps = {}, {}

    def add(name, model, predict):
        opt = torch.optim.Adam(model.parameters(), lr=case.lr)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = (predict() - y).square().mean()
            loss.backward()
            opt.step()
            return loss.detach()

        methods[name], steps[name] = predict, step

    users = _users_hypernetwork(case, reference)
    unflatten = _unflatten_by_hand(template)
    per_sample_template = vmap(lambda p, xb: functional_call(template, p, (xb,)))
    add("vmap(functional_call)", users, lambda: per_sample_template(unflatten(users(cond)), x))

    for backend in backends:
        own = _users_hypernetwork(case, reference)
        net = hk.nn.batched(template, backend=backend)
        add(f"batched[{backend}]", own, (lambda own, net: lambda: net(x, own(cond)))(own, net))

    for fused in (None, False) + ((True,) if case.n == 1 else ()):
        hnet = hk.nn.HyperNetwork(template, case.cond_features, hidden=case.hidden, activation=case.activation,
                                  fused=fused).to(device=device, dtype=case.dtype)
        hnet.load_state_dict(state)
        add("HyperNetwork()" if fused is None else f"HyperNetwork(fused={fused})", hnet,
            (lambda hnet: lambda: hnet(cond, x))(hnet))
    return Problem(methods, (), baseline="vmap(functional_call)", steps=steps)


# The workload of a widely read vmap + functional_call hypernetwork tutorial: target
# Linear(2, 100) -> ReLU -> Linear(100, 5), one point per sample, a hypernetwork with one 100-wide hidden layer.
_TUTORIAL = dict(n=1, sizes=[2, 100, 5], cond_features=2, hidden=(100,))


def default_cases(device: torch.device) -> list[TrainingCase]:
    """CPU: steps of some to some tens of milliseconds. CUDA: neural-field sizes, and larger batches of the
    tutorial's workload."""
    if device.type == "cuda":
        return [
            TrainingCase("train step [2,100,5] hidden 100 B=4096", 4096, dtype=torch.float32, **_TUTORIAL),
            TrainingCase("train step [2,100,5] hidden 100 B=65536", 65536, dtype=torch.float32, **_TUTORIAL),
            TrainingCase("train step field [2,128,128,128,3] B=256 N=1024", 256, 1024, [2, 128, 128, 128, 3],
                         torch.float32, hidden=(256, 256)),
            TrainingCase("train step field [2,64,64,64,3] B=256 N=1024 bf16", 256, 1024, [2, 64, 64, 64, 3],
                         torch.bfloat16, hidden=(256, 256)),
            TrainingCase("train step MLP N=1 [16,64,64,16] B=4096", 4096, 1, [16, 64, 64, 16], torch.float32),
        ]
    return [
        TrainingCase("train step [2,100,5] hidden 100 B=512", 512, dtype=torch.float32, **_TUTORIAL),
        TrainingCase("train step [2,100,5] hidden 100 B=4096", 4096, dtype=torch.float32, **_TUTORIAL),
        TrainingCase("train step field [2,64,64,64,3] B=16 N=256", 16, 256, [2, 64, 64, 64, 3], torch.float32),
        TrainingCase("train step MLP N=1 [16,64,64,16] B=256", 256, 1, [16, 64, 64, 16], torch.float32),
    ]
