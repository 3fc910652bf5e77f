"""The plan compiler of ``batched()``: how each part of a module runs per sample.

An ``nn.Sequential`` (nested ones too) is read leaf by leaf, in order:

* ``nn.Linear`` and 1x1 convs (stride 1, no padding, groups 1) whose parameters are plain are **kernel layers**
  (:class:`Layer`); a maximal run of per-sample ``nn.Linear`` layers with one activation between them (any one
  after the last) becomes one :class:`FusedRun` (one ``batched_mlp`` op where the backend has it).
* Activations of the kernels' table (``nn.ReLU`` ... ``Sine``) fuse into the kernel layer before them.
* Other parameter-free elementwise layers (``LeakyReLU``, ``ELU``, ``Softplus``, ``Dropout``...) are
  :class:`Elementwise`: applied to the whole batch, which is the same as applying them per sample.
* Everything else (norms, KxK / strided / grouped convs, pooling, ``Flatten``, learnable activations, modules with
  their own forward...) runs per sample through ``torch.func.vmap`` (:class:`PerSample`, ``_per_sample.py``); a run
  of such leaves, with the elementwise layers between them, is one vmap call.

Any other module (one with its own ``forward``, an RNN cell...) is one :class:`PerSample` step: its own forward
per sample, its linear layers on the kernels.

Parameters are named canonically: by their first name in ``module.named_parameters()`` (a tensor registered
under several names, i.e. tied weights, is one parameter, as for ``parameters_to_vector`` and
``stack_module_state``).
"""
from __future__ import annotations

import copy
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
from torch import nn

from ..activations import DEFAULT_SINE_W0
from ..layout import MLPSpec, ParamLayout
from ._per_sample import is_kernel_conv
from .activations import Sine

__all__ = ["Layer", "Activation", "Elementwise", "FusedRun", "PerSample", "private_copy", "compile_steps",
           "whole_module_step", "fuse_runs", "Chunk", "chunks", "CONV_TYPES"]

CONV_TYPES = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
# Activation modules and the name of their entry in the one activation table (hyperkernels/activations.py).
_TABLE_ACTIVATIONS = {nn.ReLU: "relu", nn.GELU: "gelu", nn.SiLU: "silu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid",
                      nn.Identity: "none", Sine: "sine"}
# Parameter-free layers that act on each element alone: on the whole batch they compute what they compute per
# sample (Dropout too: one independent draw per element, exactly what vmap(randomness="different") draws).
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
                nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.LogSigmoid, nn.Tanh, nn.Softplus, nn.Softsign,
                nn.Softshrink, nn.Hardshrink, nn.Tanhshrink, nn.Threshold, nn.Identity, nn.Dropout, nn.AlphaDropout,
                Sine)


# -- the steps --------------------------------------------------------------------------------------

@dataclass
class Layer:
    """One ``nn.Linear`` or 1x1 conv on the kernels, with the activation fused after it."""

    index: str              # where it sits in the module, e.g. "2" (or "1.0" in a nested Sequential)
    type_name: str
    conv_dims: int          # 0 for nn.Linear, else the number of spatial dims of the nn.ConvNd
    weight: str             # canonical parameter names
    bias: Optional[str]
    out_features: int
    in_features: int
    activation: str = "none"
    w0: float = DEFAULT_SINE_W0
    shared: frozenset = frozenset()  # which of weight / bias every sample shares

    @property
    def names(self) -> list[str]:
        return [self.weight] + ([self.bias] if self.bias else [])

    def describe(self) -> str:
        return f"layer {self.index} ({self.type_name})"


@dataclass
class Activation:
    """An activation of the table that could not be fused into a kernel layer before it."""

    index: str
    activation: str
    w0: float


@dataclass
class Elementwise:
    """A parameter-free elementwise layer, applied to the whole batch."""

    index: str
    module: nn.Module


@dataclass
class FusedRun:
    """Consecutive per-sample ``nn.Linear`` layers: one fused ``batched_mlp`` op, or layer by layer."""

    layers: list
    start: int = 0          # where its parameters start in the flat row, and how many there are
    length: int = 0
    spec: Optional[MLPSpec] = None
    activation: str = "none"
    output_activation: str = "none"
    w0: float = DEFAULT_SINE_W0
    names: list = field(default_factory=list)


@dataclass
class PerSample:
    """Leaves (or a whole module) run per sample by ``vmap(functional_call(module, ...))``."""

    indices: list           # the leaves' indices, or [] for the whole module
    module: nn.Module       # what functional_call runs: the module itself or an nn.Sequential of the leaves
    params: list            # (name in module, canonical name), one per distinct parameter
    buffers: list           # (name in module, canonical buffer name)
    type_names: list = field(default_factory=list)     # the leaves' classes, as the user wrote them
    kernel_layers: list = field(default_factory=list)  # names (in module) of the layers on the kernels
    kernel_kinds: frozenset = frozenset()              # their kinds: "linear", "conv"

    def describe(self) -> str:
        if not self.indices:
            return "the module"
        kinds = ", ".join(f"{i} ({t})" for i, t in zip(self.indices, self.type_names))
        return f"layers {kinds}"


# -- the private copy ----------------------------------------------------------------------------------

def private_copy(module: nn.Module):
    """A copy of ``module`` for batched() to run and modify (kernel classes, ``inplace=False``), never the user's.
    Its parameters and buffers are shape-only placeholders (meta tensors, no memory): every call hands all of them
    to functional_call, so their values are never read. Tensors registered under several names stay one.

    Returns (copy, canonical: id(placeholder parameter) -> its first name in ``module.named_parameters()``,
    buffer_names: the same for buffers, the original parameters and buffers by those names)."""
    params = OrderedDict(module.named_parameters())
    buffers = OrderedDict((n, b) for n, b in module.named_buffers() if b is not None)
    memo, canonical, buffer_names = {}, {}, {}
    for names, originals, is_param in ((canonical, params, True), (buffer_names, buffers, False)):
        for name, t in originals.items():
            placeholder = torch.empty(t.shape, dtype=t.dtype, device="meta")
            if is_param:
                placeholder = nn.Parameter(placeholder, requires_grad=t.requires_grad)
            memo[id(t)] = placeholder
            names[id(placeholder)] = name
    module_copy = copy.deepcopy(module, memo)
    for m in module_copy.modules():
        # an in-place activation could overwrite an input that the step before saved for its backward
        if isinstance(getattr(m, "inplace", None), bool):
            m.inplace = False
    return module_copy, canonical, buffer_names, params, buffers


# -- reading an nn.Sequential -----------------------------------------------------------------------

def plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def walk(module: nn.Module, prefix: str = "") -> Iterable[tuple[str, nn.Module]]:
    """(index, leaf) for the leaves of a (nested) plain nn.Sequential, in order."""
    for name, child in module._modules.items():  # not named_children(), which hides a module used twice
        if child is None:
            continue
        if plain_sequential(child) and not _has_hooks(child):
            yield from walk(child, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", child


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None))


def _is_exactly(m: nn.Module, base: type) -> bool:
    """``m`` is a ``base``, and a subclass of it computes the same (it keeps base.forward)."""
    return isinstance(m, base) and type(m).forward is base.forward


def kernel_layer(index: str, m: nn.Module, canonical: dict) -> Optional[Layer]:
    """The kernel layer ``m`` is, or None if it must run per sample."""
    conv_dims = next((d for t, d in CONV_TYPES.items() if _is_exactly(m, t)), 0)
    if not (_is_exactly(m, nn.Linear) or conv_dims) or _has_hooks(m):
        return None
    if conv_dims and not is_kernel_conv(m):
        return None
    if nn.utils.parametrize.is_parametrized(m) or set(n for n, p in m._parameters.items() if p is not None) - {
            "weight", "bias"} or m._buffers:
        return None
    weight = m._parameters.get("weight")
    if weight is None:
        return None
    bias = m._parameters.get("bias")
    return Layer(index, type(m).__name__, conv_dims, canonical[id(weight)],
                 None if bias is None else canonical[id(bias)], int(weight.shape[0]), int(weight.shape[1]))


def table_activation(m: nn.Module) -> Optional[tuple[str, float]]:
    """(table name, w0) of an activation module the kernels fuse, None if it is not one."""
    if _has_hooks(m):
        return None
    for t, name in _TABLE_ACTIVATIONS.items():
        if _is_exactly(m, t):
            if isinstance(m, nn.GELU) and m.approximate != "none":
                return None  # the kernels compute the exact erf form; the tanh form runs as an elementwise layer
            return name, (m.w0 if isinstance(m, Sine) else DEFAULT_SINE_W0)
    return None


def elementwise(m: nn.Module) -> bool:
    return (any(_is_exactly(m, t) for t in _ELEMENTWISE) and not _has_hooks(m)
            and not any(True for _ in m.parameters()) and not any(True for _ in m.buffers()))


def compile_steps(leaves: list, canonical: dict, buffer_names: dict) -> list:
    """Steps in order: Layer, Activation, Elementwise and PerSample (not yet grouped into fused runs)."""
    kinds = []  # (index, leaf, Layer | (act) | "elementwise" | "per-sample")
    for index, leaf in leaves:
        layer = kernel_layer(index, leaf, canonical)
        if layer is not None:
            kinds.append((index, leaf, layer))
        elif table_activation(leaf) is not None:
            kinds.append((index, leaf, table_activation(leaf)))
        elif elementwise(leaf):
            kinds.append((index, leaf, "elementwise"))
        else:
            kinds.append((index, leaf, "per-sample"))
    per_sample_at = [i for i, k in enumerate(kinds) if k[2] == "per-sample"]
    steps: list = []
    i = 0
    while i < len(kinds):
        index, leaf, kind = kinds[i]
        if kind == "per-sample":
            # One vmap call for this leaf and every later one up to the last per-sample leaf before the next kernel
            # layer: the elementwise layers between them cost less inside that call than a second call.
            end = i
            for j in per_sample_at:
                if j > i and not any(isinstance(k[2], Layer) for k in kinds[i:j]):
                    end = j
            group = kinds[i:end + 1]
            steps.append(_per_sample_step([(g[0], g[1]) for g in group], canonical, buffer_names))
            i = end + 1
            continue
        if isinstance(kind, Layer):
            steps.append(kind)
        elif isinstance(kind, tuple):
            if kind[0] != "none":
                last = steps[-1] if steps else None
                if isinstance(last, Layer) and last.activation == "none":
                    last.activation, last.w0 = kind
                else:
                    steps.append(Activation(index, *kind))
        else:
            steps.append(Elementwise(index, leaf))
        i += 1
    return steps


def _per_sample_step(leaves: list, canonical: dict, buffer_names: dict) -> PerSample:
    module = nn.Sequential(*[leaf for _, leaf in leaves])  # keys "0", "1", ...: not registered anywhere
    return whole_module_step(module, canonical, buffer_names, [index for index, _ in leaves])


def whole_module_step(module: nn.Module, canonical: dict, buffer_names: dict, indices=()) -> PerSample:
    params = [(n, canonical[id(p)]) for n, p in module.named_parameters()]
    buffers = [(n, buffer_names[id(b)]) for n, b in module.named_buffers()]
    return PerSample(list(indices), module, params, buffers, [type(m).__name__ for m in module] if indices else [])


# -- fused runs ---------------------------------------------------------------------------------------

def _same_act(a: tuple, b: tuple) -> bool:
    """(name, w0) pairs: the same activation (w0 matters only for "sine")."""
    return a[0] == b[0] and (a[0] != "sine" or a[1] == b[1])


def _extends(run: list, layer: Layer) -> bool:
    """Whether ``layer`` can join ``run``: the run's activations so far all become hidden activations, which the
    fused op needs to be one and the same; the newcomer's becomes the output activation (one w0 for both)."""
    hidden = (run[0].activation, run[0].w0)
    if not all(_same_act((l.activation, l.w0), hidden) for l in run):
        return False
    if layer.in_features != run[-1].out_features:
        return False
    return not (layer.activation == "sine" and hidden[0] == "sine" and layer.w0 != hidden[1])


def fuse_runs(steps: list, layout: ParamLayout) -> list:
    """Maximal runs of per-sample nn.Linear layers whose parameters lie one after another in the flat row (their
    first use) become FusedRun steps."""
    out: list = []
    run: list = []
    used: set = set()

    def flush():
        # One layer alone stays a kernel layer: as a one-layer fused op it would only add the op's dispatch around
        # the same product (slower on CPU), and the split of the flat params already gives it a single gradient
        # write.
        if len(run) > 1:
            out.append(_fused_run(run, layout))
        else:
            out.extend(run)
        run.clear()

    for step in steps:
        fusable = (isinstance(step, Layer) and not step.conv_dims and not step.shared
                   and not used.intersection(step.names))
        if isinstance(step, Layer):
            used.update(step.names)
        elif isinstance(step, PerSample):
            used.update(c for _, c in step.params)
        if fusable and run and _extends(run, step) and _adjacent(run[-1], step, layout):
            run.append(step)
            continue
        flush()
        if fusable:
            run.append(step)
        else:
            out.append(step)
    flush()
    return out


def _adjacent(prev: Layer, layer: Layer, layout: ParamLayout) -> bool:
    end = layout.offset(prev.names[-1]) + math.prod(layout.shapes[prev.names[-1]])
    return layout.offset(layer.weight) == end


def _fused_run(run: list, layout: ParamLayout) -> FusedRun:
    names = [n for layer in run for n in layer.names]
    start = layout.offset(names[0])
    length = sum(math.prod(layout.shapes[n]) for n in names)
    sizes = [run[0].in_features] + [layer.out_features for layer in run]
    w_off = tuple(layout.offset(layer.weight) - start for layer in run)
    b_off = tuple(layout.offset(layer.bias) - start if layer.bias else -1 for layer in run)
    hidden = run[0].activation if len(run) > 1 else "none"
    out = run[-1]
    w0 = out.w0 if out.activation == "sine" else run[0].w0
    return FusedRun(list(run), start, length, MLPSpec(tuple(sizes), w_off, b_off, length), hidden, out.activation,
                    w0, names)


# -- how the flat params split ---------------------------------------------------------------------

@dataclass
class Chunk:
    """A contiguous range of the flat row: one fused run's parameters (``run`` is its step index), or parameters
    handed out one by one (``names``)."""

    start: int
    length: int
    run: Optional[int] = None
    names: list = field(default_factory=list)


def chunks(steps: list, layout: ParamLayout) -> list:
    """The flat row as fused runs and the stretches between them, in order. The forward splits the flat params
    into these with one ``split`` (whose backward writes the ``(B, P)`` gradient once, where a view per parameter
    would each write a zero-filled ``(B, P)`` buffer) and hands each fused run its chunk."""
    runs = sorted(((s.start, s.length, i) for i, s in enumerate(steps) if isinstance(s, FusedRun)))
    out: list = []
    pos = 0
    names = layout.names
    for start, length, i in runs + [(layout.numel, 0, None)]:
        if start > pos:
            inside = [n for n in names if pos <= layout.offset(n) < start]
            out.append(Chunk(pos, start - pos, None, inside))
        if i is not None:
            out.append(Chunk(start, length, i))
        pos = start + length
    return out
