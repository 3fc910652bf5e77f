"""ParamLayout: where each per-sample parameter lives in a flat ``(B, P)`` tensor.

A hypernetwork emits one flat row of ``P`` numbers per sample. ``ParamLayout`` names the pieces of
that row like a ``state_dict`` ("0.weight", "0.bias", ...), in the order and flattening of
``torch.nn.utils.parameters_to_vector`` of the equivalent module, and hands out zero-copy views.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from .activations import Activation

__all__ = ["ParamLayout", "LinearLayerSpec", "MLPSpec"]


@dataclass(frozen=True)
class LinearLayerSpec:
    """One linear (or 1x1 conv) layer of a layout: its parameter names and sizes."""

    weight: str
    bias: Optional[str]
    out_features: int
    in_features: int


@dataclass(frozen=True)
class MLPSpec:
    """A stack of linear layers as kernels see it: ``sizes = (in, h1, ..., out)`` and, per layer, where its
    weight ``(sizes[l+1], sizes[l])`` (row-major) and bias start in a flat row (-1: no bias)."""

    sizes: tuple
    weight_offsets: tuple
    bias_offsets: tuple
    numel: int

    @property
    def num_layers(self) -> int:
        return len(self.sizes) - 1

    def layer(self, i: int) -> tuple[int, int, int, int]:
        """(out, in, weight offset, bias offset) of layer i."""
        return self.sizes[i + 1], self.sizes[i], self.weight_offsets[i], self.bias_offsets[i]

    def layer_activation(self, i: int, act: Activation, out_act: Activation) -> Activation:
        """Layer i's activation: ``out_act`` after the last layer, ``act`` after every other."""
        return out_act if i == self.num_layers - 1 else act

    def saved_kinds(self, act: Activation, out_act: Activation) -> list[str]:
        """What every backend's MLP forward saves of each layer for the backward, when it saves anything (the
        contract of ``hyperkernels::batched_mlp``, whose fake implementation promises these shapes): the
        pre-activation ``"z"`` where the activation's backward needs it, else the post-activation ``"h"``; of the
        last layer, whose ``"h"`` is the output itself, nothing (``"-"``)."""
        kinds = []
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            kinds.append("z" if self.layer_activation(i, act, out_act).needs_preactivation else ("-" if last else "h"))
        return kinds


class ParamLayout:
    """Ordered names and shapes of the parameters of one sample.

    >>> layout = ParamLayout.from_module(nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1)))
    >>> layout.numel
    41
    >>> params = layout.unflatten(torch.randn(5, 41))   # dict of (5, *shape) views, no copy
    >>> params["0.weight"].shape
    torch.Size([5, 8, 3])
    """

    def __init__(self, shapes: Mapping[str, Sequence[int]]):
        if not isinstance(shapes, Mapping):
            raise TypeError(f"shapes: expected an ordered mapping name -> shape, got {type(shapes).__name__}")
        self._shapes: "OrderedDict[str, tuple[int, ...]]" = OrderedDict()
        self._offsets: dict[str, int] = {}
        offset = 0
        for name, shape in shapes.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"shapes: parameter names must be non-empty strings, got {name!r}")
            shape = tuple(int(s) for s in shape)
            if any(s < 0 for s in shape):
                raise ValueError(f"shapes[{name!r}]: sizes must be non-negative, got {shape}")
            self._shapes[name] = shape
            self._offsets[name] = offset
            offset += math.prod(shape)
        if not self._shapes:
            raise ValueError("shapes: a layout needs at least one parameter, got none")
        self._numel = offset

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Sequence[int]]) -> "ParamLayout":
        """A layout from an ordered mapping ``{"0.weight": (64, 3), "0.bias": (64,), ...}``."""
        return cls(shapes)

    @classmethod
    def from_module(cls, module: nn.Module) -> "ParamLayout":
        """The layout of ``module.named_parameters()``: flattening identical to
        ``torch.nn.utils.parameters_to_vector(module.parameters())``."""
        if not isinstance(module, nn.Module):
            raise TypeError(f"module: expected an nn.Module, got {type(module).__name__}")
        shapes = OrderedDict((name, tuple(p.shape)) for name, p in module.named_parameters())
        if not shapes:
            raise ValueError(
                f"module: {type(module).__name__} has no parameters (was it already converted in place "
                "by another library, or are its weights buffers?)"
            )
        return cls(shapes)

    # -- description --------------------------------------------------------------------------
    @property
    def numel(self) -> int:
        """P: the number of scalars of one sample's parameters."""
        return self._numel

    @property
    def names(self) -> list[str]:
        return list(self._shapes)

    @property
    def shapes(self) -> "OrderedDict[str, tuple[int, ...]]":
        return OrderedDict(self._shapes)

    def offset(self, name: str) -> int:
        """Where ``name`` starts in a flat row."""
        if name not in self._offsets:
            raise KeyError(f"name: {name!r} is not in the layout; its names are {self.names}")
        return self._offsets[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def __contains__(self, name: object) -> bool:
        return name in self._shapes

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ParamLayout) and list(self._shapes.items()) == list(other._shapes.items())

    def __hash__(self) -> int:
        return hash(tuple(self._shapes.items()))

    def __repr__(self) -> str:
        body = ", ".join(f"{n!r}: {s}" for n, s in self._shapes.items())
        return f"ParamLayout({{{body}}}, numel={self._numel})"

    def linear_layers(self) -> list[LinearLayerSpec]:
        """Read the layout as a stack of linear layers ``<prefix>.weight (out, in[, 1...])`` each with an
        optional ``<prefix>.bias (out,)``, in order; anything else is a ValueError."""
        layers: list[LinearLayerSpec] = []
        names = self.names
        i = 0
        while i < len(names):
            name = names[i]
            prefix, _, leaf = name.rpartition(".")
            shape = self._shapes[name]
            if leaf != "weight" or len(shape) < 2 or any(s != 1 for s in shape[2:]):
                raise ValueError(
                    f"layout: expected a stack of linear layers ('<prefix>.weight' of shape (out, in) followed by "
                    f"an optional '<prefix>.bias' of shape (out,)), but parameter {name!r} has shape {shape}"
                )
            out_features, in_features = shape[0], shape[1]
            bias = None
            bias_name = f"{prefix}.bias" if prefix else "bias"
            if i + 1 < len(names) and names[i + 1] == bias_name:
                if self._shapes[bias_name] != (out_features,):
                    raise ValueError(
                        f"layout: {bias_name!r} should have shape ({out_features},) to match {name!r} {shape}, "
                        f"got {self._shapes[bias_name]}"
                    )
                bias = bias_name
                i += 1
            layers.append(LinearLayerSpec(name, bias, out_features, in_features))
            i += 1
        return layers

    def mlp_spec(self) -> MLPSpec:
        """The layout as a chain of linear layers (each layer's in = the previous layer's out)."""
        layers = self.linear_layers()
        sizes = [layers[0].in_features]
        for prev, layer in zip(layers, layers[1:]):
            if layer.in_features != prev.out_features:
                raise ValueError(
                    f"layout: {layer.weight!r} takes {layer.in_features} inputs but {prev.weight!r} gives "
                    f"{prev.out_features} outputs: not a chain of layers"
                )
        sizes += [layer.out_features for layer in layers]
        return MLPSpec(
            tuple(sizes),
            tuple(self._offsets[layer.weight] for layer in layers),
            tuple(self._offsets[layer.bias] if layer.bias else -1 for layer in layers),
            self._numel,
        )

    # -- flat <-> dict ------------------------------------------------------------------------
    def check_flat(self, flat: Tensor, argname: str = "params") -> None:
        """Raise unless ``flat`` is a floating ``(B, numel)`` tensor."""
        if not isinstance(flat, Tensor):
            raise TypeError(f"{argname}: expected a Tensor of shape (B, {self._numel}), got {type(flat).__name__}")
        if flat.dim() != 2 or flat.shape[1] != self._numel:
            raise ValueError(
                f"{argname}: expected flat per-sample parameters of shape (B, {self._numel}) for {self!r}, "
                f"got shape {tuple(flat.shape)}"
            )
        if not flat.is_floating_point():
            raise TypeError(f"{argname}: expected a floating-point tensor, got {flat.dtype}")

    def unflatten(self, flat: Tensor, argname: str = "params") -> "OrderedDict[str, Tensor]":
        """Views ``{name: (B, *shape)}`` into ``flat (B, numel)``; nothing is copied."""
        self.check_flat(flat, argname)
        views: "OrderedDict[str, Tensor]" = OrderedDict()
        for name, shape in self._shapes.items():
            piece = flat.narrow(1, self._offsets[name], math.prod(shape))
            views[name] = piece.unflatten(1, shape) if shape else piece.squeeze(1)
        return views

    def check_dict_keys(self, params: Mapping[str, Tensor], argname: str = "params",
                        held_elsewhere: Sequence[str] = ()) -> None:
        """Raise unless ``params`` is a dict of exactly this layout's names. ``held_elsewhere``: names a caller keeps
        outside the layout (e.g. shared parameters), named in the message when given here by mistake."""
        if not isinstance(params, Mapping):
            raise TypeError(f"{argname}: expected a dict name -> (B, *shape) tensor, got {type(params).__name__}")
        missing = [n for n in self._shapes if n not in params]
        extra = [n for n in params if n not in self._shapes]
        if missing or extra:
            elsewhere = [n for n in extra if n in held_elsewhere]
            note = f"; {elsewhere} are shared (held by the module itself): leave them out" if elsewhere else ""
            raise ValueError(f"{argname}: keys do not match the per-sample parameters: missing {missing}, unexpected "
                             f"{extra} (expected exactly {self.names}){note}")

    def check_dict(self, params: Mapping[str, Tensor], argname: str = "params",
                   held_elsewhere: Sequence[str] = ()) -> int:
        """Raise unless ``params`` holds exactly this layout's names (see :meth:`check_dict_keys`) with shapes
        ``(B, *shape)``; return B."""
        self.check_dict_keys(params, argname, held_elsewhere)
        batch = None
        for name, shape in self._shapes.items():
            t = params[name]
            if not isinstance(t, Tensor):
                raise TypeError(f"{argname}[{name!r}]: expected a Tensor, got {type(t).__name__}")
            if t.dim() != len(shape) + 1 or tuple(t.shape[1:]) != shape:
                raise ValueError(
                    f"{argname}[{name!r}]: expected shape (B, {', '.join(map(str, shape))}), got {tuple(t.shape)}"
                )
            if batch is None:
                batch = t.shape[0]
            elif t.shape[0] != batch:
                raise ValueError(
                    f"{argname}[{name!r}]: batch size {t.shape[0]} differs from {batch} of {self.names[0]!r}"
                )
        return batch

    def flatten(self, params: Mapping[str, Tensor], argname: str = "params") -> Tensor:
        """The flat ``(B, numel)`` tensor of a dict of ``(B, *shape)`` tensors (a copy, by nature)."""
        batch = self.check_dict(params, argname)
        return torch.cat([params[name].reshape(batch, -1) for name in self._shapes], dim=1)
