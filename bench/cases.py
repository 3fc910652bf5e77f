"""Benchmark cases: embedded default shapes, and every way of computing each of them.

A case module (this one, and any listed in ``run.CASE_MODULES``) has ``default_cases(device)``, returning
objects with ``name``, ``dtype``, ``build(device, backends) -> Problem``, ``bytes_moved(itemsize)`` and
``flops()``. Here, every method of a case reads the same flat ``(B, P)`` "hypernetwork output" through
views, and its forward+backward takes the gradient with respect to that flat tensor, the way users write
it today.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

import hyperkernels as hk

_ACT_MODULES = {None: nn.Identity, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh,
                "sigmoid": nn.Sigmoid}


@dataclass
class Case:
    """A per-sample network: ``sizes = [in, hidden..., out]`` linear layers, ``activation`` between them
    (and after the last one too when it is a single layer), ``n`` points per sample."""

    name: str
    batch: int
    n: int
    sizes: list
    dtype: torch.dtype
    activation: Optional[str] = "relu"
    channel_major: bool = False  # x as (B, C, N): the 1x1 conv layout
    notes: str = ""

    @property
    def single_layer(self) -> bool:
        return len(self.sizes) == 2

    def template(self) -> nn.Sequential:
        layers = []
        for i, (k, m) in enumerate(zip(self.sizes[:-1], self.sizes[1:])):
            layers.append(nn.Linear(k, m))
            if self.single_layer or i < len(self.sizes) - 2:
                layers.append(_ACT_MODULES[self.activation]())
        return nn.Sequential(*layers)

    def build(self, device: torch.device, backends: list) -> "Problem":
        return build(self, device, backends)

    def flops(self) -> float:
        return 2.0 * self.batch * self.n * sum(k * m for k, m in zip(self.sizes[:-1], self.sizes[1:]))

    def bytes_moved(self, itemsize: int) -> float:
        """The forward's floor: every weight, input and output element moved once."""
        params = sum(k * m + m for k, m in zip(self.sizes[:-1], self.sizes[1:]))
        return float(itemsize * self.batch * (params + self.n * (self.sizes[0] + self.sizes[-1])))


def default_cases(device: torch.device) -> list[Case]:
    """CPU: sizes that finish in about a minute on 2 cores. CUDA: the sizes of the GPU targets."""
    if device.type == "cuda":
        return [
            Case("linear N=1 256x256", 16384, 1, [256, 256], torch.float32, "relu"),
            Case("linear N=1 256x256 bf16", 16384, 1, [256, 256], torch.bfloat16, "relu"),
            Case("linear N=1024 128x128 bf16", 256, 1024, [128, 128], torch.bfloat16, "relu"),
            Case("conv1x1 64x64 @64x64 bf16", 64, 4096, [64, 64], torch.bfloat16, "relu", channel_major=True),
            Case("MLP N=1 [16,64,64,64,16]", 16384, 1, [16, 64, 64, 64, 16], torch.float32, "relu"),
            Case("field N=1024 width 64 bf16", 128, 1024, [2, 64, 64, 64, 3], torch.bfloat16, "relu"),
            Case("field N=1024 width 128 bf16", 128, 1024, [2, 128, 128, 128, 3], torch.bfloat16, "relu"),
        ]
    return [
        Case("linear N=1 256x256", 256, 1, [256, 256], torch.float32, "relu"),
        Case("linear N=1024 128x128", 8, 1024, [128, 128], torch.float32, "relu"),
        Case("conv1x1 64x64 @32x32", 8, 1024, [64, 64], torch.float32, "relu", channel_major=True),
        Case("MLP N=1 [16,64,64,64,16]", 1024, 1, [16, 64, 64, 64, 16], torch.float32, "relu"),
        Case("field N=1024 width 64", 4, 1024, [2, 64, 64, 64, 3], torch.float32, "relu"),
    ]


@dataclass
class Problem:
    """What the runner times: ``methods`` (name -> forward callable returning the output the runner compares
    with the baseline's), and for forward+backward either the gradient of their output with respect to
    ``grad_wrt`` or, where ``steps`` is given, ``steps[name]`` (e.g. a whole training step); speedups are
    relative to the ``baseline`` method."""

    methods: dict
    grad_wrt: tuple
    baseline: str = "vmap(functional_call)"
    steps: Optional[dict] = None


def _act(name: Optional[str]) -> Callable:
    return {None: lambda t: t, "relu": torch.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh,
            "sigmoid": torch.sigmoid}[name]


def _layers(case: Case, views: dict, layout: hk.ParamLayout):
    """(weight, bias, activation) per layer, from the layout's views."""
    specs = layout.linear_layers()
    out = []
    for i, spec in enumerate(specs):
        act = case.activation if (case.single_layer or i < len(specs) - 1) else None
        out.append((views[spec.weight], views[spec.bias] if spec.bias else None, act))
    return out


def build(case: Case, device: torch.device, backends: list[str]) -> Problem:
    template = case.template().to(device=device, dtype=case.dtype)
    layout = hk.ParamLayout.from_module(template)
    # A plausible hypernetwork output: each row a freshly initialised copy of the template.
    scale = torch.cat([torch.full((math.prod(s),), 1.0 / math.sqrt(s[-1]) if len(s) == 2 else 0.1)
                       for s in layout.shapes.values()]).to(device)
    flat = (torch.randn(case.batch, layout.numel, device=device) * scale).to(case.dtype).requires_grad_()
    x_shape = (case.batch, case.sizes[0], case.n) if case.channel_major else (case.batch, case.n, case.sizes[0])
    x = torch.randn(x_shape, device=device, dtype=case.dtype)
    p = Problem({}, (flat,))
    cm = case.channel_major

    def hyperkernels_method(backend):
        fused = backend in ("auto", "torch") or hk._dispatch.implements(backend, "batched_mlp")
        if not cm and fused:
            # The flat params straight into the fused MLP (one layer too): one (B, P) gradient.
            out_act = case.activation if case.single_layer else None
            return lambda: hk.batched_mlp(x, flat, layout, activation=case.activation, output_activation=out_act,
                                          backend=backend)
        op = hk.batched_conv1x1 if cm else hk.batched_linear

        def run():
            h = x
            for w, b, act in _layers(case, layout.unflatten(flat), layout):
                h = op(h, w, b, activation=act, backend=backend)
            return h
        return run

    for backend in backends:
        p.methods[f"hyperkernels[{backend}]"] = hyperkernels_method(backend)

    def vmap_functional_call():
        params = layout.unflatten(flat)
        xs = x.transpose(1, 2) if cm else x
        y = vmap(lambda prm, xi: functional_call(template, prm, (xi,)))(params, xs)
        return y.transpose(1, 2) if cm else y

    def bmm():
        h = x
        for w, b, act in _layers(case, layout.unflatten(flat), layout):
            h = torch.baddbmm(b.unsqueeze(2), w, h) if cm else torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
            h = _act(act)(h)
        return h

    def grouped_conv():
        batch = case.batch
        h = x if cm else x.transpose(1, 2)
        h = h.reshape(1, -1, case.n)
        for w, b, act in _layers(case, layout.unflatten(flat), layout):
            h = _act(act)(F.conv1d(h, w.reshape(-1, w.shape[2], 1), b.reshape(-1), groups=batch))
        h = h.view(batch, -1, case.n)
        return h if cm else h.transpose(1, 2)

    def python_loop():
        # unbind, not w[i]: indexing a view B times makes autograd build B zero-filled (B, P) gradients.
        layers = [(w.unbind(0), b.unbind(0), act) for w, b, act in _layers(case, layout.unflatten(flat), layout)]
        outs = []
        for i, xi in enumerate(x.unbind(0)):
            h = xi.t() if cm else xi
            for ws, bs, act in layers:
                h = _act(act)(F.linear(h, ws[i], bs[i]))
            outs.append(h.t() if cm else h)
        return torch.stack(outs)

    p.methods.update({"vmap(functional_call)": vmap_functional_call, "bmm": bmm, "grouped conv": grouped_conv,
                      "python loop": python_loop})
    return p


def forward_backward(problem: Problem, fn: Callable[[], torch.Tensor], grad_out: torch.Tensor):
    """One training-style pass: forward, then the gradient of ``problem.grad_wrt``."""
    def run():
        return torch.autograd.grad(fn(), problem.grad_wrt, grad_out)
    return run
