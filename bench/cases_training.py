"""End-to-end benchmark cases: one training step of a hypernetwork and its per-sample target MLP.

The same ``HyperNetwork`` (condition -> flat ``(B, P)`` params), the same data, in the same run, with the target
written two ways:

* ``vmap(functional_call)``: the usual way, ``vmap(lambda p, x: functional_call(template, p, (x,)))`` over the
  layout's views of the generated params (the baseline);
* ``hyperkernels[backend]``: ``hk.nn.batched(template)(x, params)``, the fused MLP where the backend has it.

What the runner's columns mean here: "fwd" is the forward pass to the loss (hypernetwork, target, MSE);
"fwd+bwd" is a whole training step: forward, backward to the hypernetwork's parameters, and an Adam step. The
runner takes gradients with ``torch.autograd.grad``, so the optimizer step runs from gradient hooks on the
hypernetwork's parameters, once all of them have their gradient (the same step for every method). The
learning rate is tiny so that the thousands of timed steps (with the runner's random output gradient) leave the
weights where they started.
"""
from __future__ import annotations

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
    """A hypernetwork ``cond_features -> hidden -> P`` generating a target MLP ``sizes`` run on ``n`` points per
    sample."""

    name: str
    batch: int
    n: int
    sizes: list
    dtype: torch.dtype
    cond_features: int = 16
    hidden: tuple = (128, 128)
    activation: Optional[str] = "relu"

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
        per_sample = 2 * self.num_params + self.n * (self.sizes[0] + 2 * self.sizes[-1])
        return float(itemsize * (hyper_weights + self.batch * per_sample))

    def build(self, device: torch.device, backends: list) -> Problem:
        torch.manual_seed(0)
        template = self.template().to(device=device, dtype=self.dtype)
        hnet = hk.nn.HyperNetwork(template, self.cond_features, hidden=self.hidden).to(device=device, dtype=self.dtype)
        layout = hnet.layout
        cond = torch.randn(self.batch, self.cond_features, device=device, dtype=self.dtype)
        x = torch.rand(self.batch, self.n, self.sizes[0], device=device, dtype=self.dtype)
        y = torch.rand(self.batch, self.n, self.sizes[-1], device=device, dtype=self.dtype)
        params = tuple(hnet.parameters())
        _optimizer_step_after_backward(params, torch.optim.Adam(params, lr=1e-6))

        def loss_of(out):
            return (out - y).square().mean()

        def vmap_functional_call():
            views = layout.unflatten(hnet.generate(cond))
            return loss_of(vmap(lambda p, xb: functional_call(template, p, (xb,)))(views, x))

        methods = {}
        for backend in backends:
            per_sample = hk.nn.batched(template, backend=backend)
            methods[f"hyperkernels[{backend}]"] = (lambda net: lambda: loss_of(net(x, hnet.generate(cond))))(per_sample)
        methods["vmap(functional_call)"] = vmap_functional_call
        return Problem(methods, params, baseline="vmap(functional_call)")


def _optimizer_step_after_backward(params: tuple, opt: torch.optim.Optimizer) -> None:
    """Run ``opt.step()`` from gradient hooks, once every parameter of ``params`` has its gradient in a backward
    pass (``torch.autograd.grad`` fills no ``.grad``; this does, then steps)."""
    pending = {}

    def hook_for(i):
        def hook(grad):
            pending[i] = grad
            if len(pending) == len(params):
                for j, p in enumerate(params):
                    p.grad = pending[j]
                pending.clear()
                opt.step()
            return grad
        return hook

    for i, p in enumerate(params):
        p.register_hook(hook_for(i))


def default_cases(device: torch.device) -> list[TrainingCase]:
    """CPU: a step of some tens of milliseconds. CUDA: neural-field sizes."""
    if device.type == "cuda":
        return [
            TrainingCase("train step field [2,128,128,128,3] B=256 N=1024", 256, 1024, [2, 128, 128, 128, 3],
                         torch.float32, hidden=(256, 256)),
            TrainingCase("train step field [2,64,64,64,3] B=256 N=1024 bf16", 256, 1024, [2, 64, 64, 64, 3],
                         torch.bfloat16, hidden=(256, 256)),
            TrainingCase("train step MLP N=1 [16,64,64,16] B=4096", 4096, 1, [16, 64, 64, 16], torch.float32),
        ]
    return [
        TrainingCase("train step field [2,64,64,64,3] B=16 N=256", 16, 256, [2, 64, 64, 64, 3], torch.float32),
        TrainingCase("train step MLP N=1 [16,64,64,16] B=256", 256, 1, [16, 64, 64, 16], torch.float32),
    ]
