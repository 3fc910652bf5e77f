"""Benchmark cases of hyper_linear: a target layer run straight from the hypernetwork's last hidden state.

Every method computes the same thing, ``y = act(W[b] x[b] + c[b])`` with ``[W, c] = F.linear(h, G, g)``, and its
forward+backward takes the gradients of the head (``G``, ``g``) and of ``h``, as training a hypernetwork does.
The baseline is generate-then-bmm: materialise the ``(B, out*in + out)`` parameters, then one ``baddbmm``.
The GPU target (N = 1, B = 16384, K = 128, 256x256, bfloat16): hyper_linear faster than the baseline
with >= 10x less peak memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

import hyperkernels as hk
from cases import Problem, _act
from hyperkernels.backends.torch import hyper_linear as torch_hyper


@dataclass
class HyperCase:
    """``B`` samples of ``N`` points; the head maps ``h (B, K)`` to a ``Linear(in_features, out_features)``."""

    name: str
    batch: int
    n: int
    cond: int
    in_features: int
    out_features: int
    dtype: torch.dtype
    activation: Optional[str] = "relu"

    @property
    def rows(self) -> int:
        return self.out_features * self.in_features + self.out_features

    def flops(self) -> float:
        """Generating the weights plus applying them (the fused op does N times the first term instead)."""
        return 2.0 * self.batch * (self.rows * self.cond + self.n * self.out_features * self.in_features)

    def bytes_moved(self, itemsize: int) -> float:
        """The fused forward's floor: x, h, the head and y, each moved once; no per-sample weights."""
        elems = (self.batch * self.n * (self.in_features + self.out_features) + self.batch * self.cond
                 + self.rows * (self.cond + 1))
        return float(itemsize * elems)

    def build(self, device: torch.device, backends: list) -> Problem:
        return build(self, device, backends)


def default_cases(device: torch.device) -> list[HyperCase]:
    """CUDA: B = 16384 samples at one point, 256 -> 256 from K = 128, and one with many points per sample (where "auto" generates). CPU: smaller
    shapes that run in seconds on 2 cores."""
    if device.type == "cuda":
        return [
            HyperCase("hyper N=1 B=16384 K=128 256x256", 16384, 1, 128, 256, 256, torch.float32),
            HyperCase("hyper N=1 B=16384 K=128 256x256 bf16", 16384, 1, 128, 256, 256, torch.bfloat16),
            HyperCase("hyper N=16 B=4096 K=128 256x256 bf16", 4096, 16, 128, 256, 256, torch.bfloat16),
        ]
    return [
        HyperCase("hyper N=1 B=1024 K=64 128x128", 1024, 1, 64, 128, 128, torch.float32),
        HyperCase("hyper N=8 B=128 K=64 128x128", 128, 8, 64, 128, 128, torch.float32),
    ]


def build(case: HyperCase, device: torch.device, backends: list[str]) -> Problem:
    dtype, o, i, k = case.dtype, case.out_features, case.in_features, case.cond
    x = torch.randn(case.batch, case.n, i, device=device, dtype=dtype)
    h = torch.randn(case.batch, k, device=device, dtype=dtype, requires_grad=True)
    head = nn.Linear(k, case.rows, device=device)  # its default init: theta ~ U(+-1/sqrt(K)) * |h|
    head_weight = (head.weight.detach() / i**0.5).to(dtype).requires_grad_()  # generated W ~ 1/sqrt(in)
    head_bias = torch.zeros(case.rows, device=device, dtype=dtype, requires_grad=True)
    template = nn.Linear(i, o, device=device, dtype=dtype)
    layout = hk.ParamLayout.from_module(template)
    act = _act(case.activation)
    p = Problem({}, (h, head_weight, head_bias), baseline="generate-then-bmm")

    for backend in backends:
        if backend == "torch_conv" or (backend != "auto" and not hk._dispatch.implements(backend, "hyper_linear")):
            continue  # torch_conv runs torch_bmm's hyper_linear; other backends may have none

        def fused(backend=backend):
            return hk.hyper_linear(x, h, head_weight, head_bias, out_features=o, activation=case.activation,
                                   backend=backend)

        p.methods[f"hyper_linear[{backend}]"] = fused

    def generate_then_bmm():
        weight, c = torch_hyper.generate(h, head_weight, head_bias, o, i, True)
        return act(torch.baddbmm(c.unsqueeze(1), x, weight.transpose(1, 2)))

    def generate_then_batched_linear():
        weight, c = torch_hyper.generate(h, head_weight, head_bias, o, i, True)
        return hk.batched_linear(x, weight, c, activation=case.activation)

    def vmap_functional_call():
        params = layout.unflatten(F.linear(h, head_weight, head_bias))
        return act(vmap(lambda prm, xi: functional_call(template, prm, (xi,)))(params, x))

    p.methods.update({"generate-then-bmm": generate_then_bmm,
                      "generate-then-batched_linear[auto]": generate_then_batched_linear,
                      "vmap(functional_call)": vmap_functional_call})
    return p
