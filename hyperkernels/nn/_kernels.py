"""The kernel steps of a ``batched()`` plan: one linear layer or 1x1 conv, and a run of linear layers as one fused
MLP. Every tensor here has the batch of samples as its dim 0 (the physical tensors, never vmap's wrappers)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..activations import get_activation
from ..functional import linear_from_checked, linear_runs_as_composition, mlp_from_spec, mlp_op_runs

__all__ = ["run_kernel_layer", "run_fused_mlp", "fused_mlp_worth_it", "linear_is_composition", "flat_buffer_range"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _is_shared(t: Optional[Tensor]) -> bool:
    return t is None or t.stride(0) == 0


def _run_dense(h: Tensor, weight: Tensor, bias: Optional[Tensor], conv_dims: int, channel_dim: int) -> Tensor:
    """A layer whose weight every sample shares: one dense layer over all samples' points (the batch folds into
    the points), the per-sample bias (if any) added after. Per-sample kernels on an expand of the weight would
    make B small products where one large one does, and form B weight gradients to sum them: far slower on
    CPU, worst at few points per sample."""
    w = weight[0]
    b_shared = bias is not None and bias.stride(0) == 0
    if conv_dims:
        w = w.reshape(*w.shape[:2], *([1] * conv_dims))
        lead = h.shape[:channel_dim]
        z = _CONV[conv_dims](h.reshape(-1, *h.shape[channel_dim:]), w, bias[0] if b_shared else None)
        z = z.view(*lead, *z.shape[1:])
    else:
        z = F.linear(h, w, bias[0] if b_shared else None)
    if bias is not None and not b_shared:
        trailing = (h.dim() - channel_dim - 1) if conv_dims else 0
        lead = (h.dim() - 2 - trailing) if conv_dims else h.dim() - 2
        z = z + bias.reshape(bias.shape[0], *([1] * lead), bias.shape[1], *([1] * trailing))
    return z


def run_kernel_layer(h: Tensor, weight: Tensor, bias: Optional[Tensor], conv_dims: int, activation: str, w0: float,
                     backend: str) -> Tensor:
    """One per-sample ``nn.Linear`` (``conv_dims`` 0) or 1x1 ``nn.ConvNd`` with its activation fused.

    h: ``(B, *, in)`` for a linear layer; ``(B, C, *spatial)`` or ``(B, N, C, *spatial)`` for a conv.
    weight: ``(B, out, in[, 1, ...])``, bias ``(B, out)`` or None: views of the flat params, or expands (batch
    stride 0) of shared parameters."""
    batch = h.shape[0]
    out_features = weight.shape[1]
    channel_dim = (2 if h.dim() == conv_dims + 3 else 1) if conv_dims else h.dim() - 1
    if conv_dims and h.dim() not in (conv_dims + 2, conv_dims + 3):
        raise ValueError(f"x: a 1x1 conv with {conv_dims} spatial dims takes (C, *spatial) or (N, C, *spatial) per "
                         f"sample, got per-sample shape {tuple(h.shape[1:])}")
    if _is_shared(weight):
        return get_activation(activation).forward(_run_dense(h, weight, bias, conv_dims, channel_dim), w0)
    weight = weight.reshape(batch, out_features, -1)  # (B, out, in[, 1...]) -> (B, out, in): a view
    # The one check left per layer (x and params were checked at the module's entry; dtypes and devices follow
    # from them): the size a step before this one handed it.
    if h.shape[channel_dim] != weight.shape[2]:
        what = "channels" if conv_dims else "in_features (last dim)"
        raise ValueError(f"x: expected {what} {weight.shape[2]} (the layer's weight), got {h.shape[channel_dim]} in "
                         f"shape {tuple(h.shape)}")
    if conv_dims:
        if channel_dim == 1:  # each sample's input is (C, *spatial)
            y = linear_from_checked(h.flatten(2), weight, bias, activation, w0, True, backend)
            return y.view(*y.shape[:2], *h.shape[2:])
        # each sample's input is a batch (N, C, *spatial): channels first, N becomes one more spatial dim
        n, spatial = h.shape[1], h.shape[3:]
        y = linear_from_checked(h.movedim(1, 2).flatten(2), weight, bias, activation, w0, True, backend)
        return y.unflatten(2, (n, *spatial)).movedim(2, 1)
    x3 = h.unsqueeze(1) if h.dim() == 2 else h.reshape(batch, -1, h.shape[-1])
    y = linear_from_checked(x3, weight, bias, activation, w0, False, backend)
    return y.view(*h.shape[:-1], out_features)


def linear_is_composition(backend: str, like: Tensor) -> bool:
    """Whether per-sample linear layers on tensors like ``like`` (dim 0 the batch) run as PyTorch's own
    composition (bmm, bias, activation: the torch backend), which is also what vmap runs for ``F.linear``."""
    return linear_runs_as_composition(backend, like.device, like.dtype)


def fused_mlp_worth_it(backend: str, h: Tensor, sizes: tuple) -> bool:
    """Whether a run of linear layers should be one fused MLP op: the backend has one, and it would not just run
    the plain composition (the torch backend does at many points per sample). Otherwise the layers run one by
    one, each on its own slice of the flat params (one split, one gradient write, where the composition inside
    the op would read them through views that each write a zero-filled (B, P) gradient)."""
    n = math.prod(h.shape[1:-1]) if h.dim() > 2 else 1
    return mlp_op_runs(backend, h.device, h.dtype, n, sizes)


def run_fused_mlp(h: Tensor, flat: Tensor, spec, activation: str, output_activation: str, w0: float,
                  backend: str) -> Tensor:
    """A run of per-sample ``nn.Linear`` layers as one ``batched_mlp`` op: h ``(B, *, in)``, flat ``(B, spec.numel)``
    (read in place; its gradient is written once)."""
    batch = h.shape[0]
    x3 = h if h.dim() == 3 else h.reshape(batch, -1, h.shape[-1])
    y = mlp_from_spec(x3, flat, spec, activation, output_activation, w0, backend)
    return y if h.dim() == 3 else y.reshape(*h.shape[:-1], spec.sizes[-1])


def flat_buffer_range(tensors: Sequence[Tensor], offsets: Sequence[int], length: int) -> Optional[Tensor]:
    """The ``(B, length)`` range of one flat buffer that ``tensors`` (each ``(B, *shape)``) are views of, each
    row-major at ``offsets[i]`` from the first within a row, all with one row stride; None if they are not (e.g.
    separate tensors, or views in another order). Nothing is copied.

    Where a gradient is needed the range is cut from the tensor they are all views of (``_base``), so the
    gradient reaches it (and whatever it came from) as through the views; tensors that need a gradient of
    their own (views of a buffer that needs none) are not a range of it."""
    first = tensors[0]
    batch = first.shape[0]
    row = first.stride(0)
    if batch > 1 and row < length:
        return None  # the samples' ranges would overlap
    base = first._base
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if needs_grad and (base is None or not base.requires_grad):
        return None
    storage = first.untyped_storage().data_ptr()
    for t, offset in zip(tensors, offsets):
        if t.untyped_storage().data_ptr() != storage or (needs_grad and t._base is not base):
            return None
        if t.storage_offset() - first.storage_offset() != offset or (batch > 1 and t.stride(0) != row):
            return None
        expected = 1
        for size, stride in reversed(list(zip(t.shape[1:], t.stride()[1:]))):
            if size != 1 and stride != expected:
                return None
            expected *= size
    last = tensors[-1]
    if offsets[-1] + last[:1].numel() != length:
        return None
    source = base if needs_grad else first
    if (source.dim() == 2 and source.shape[0] == batch and source.stride(1) == 1 and
            (batch == 1 or source.stride(0) == row)):
        start = first.storage_offset() - source.storage_offset()
        if start == 0 and length == source.shape[1]:
            return source  # the whole buffer: its gradient arrives whole, no zero-filled copy around it
        if 0 <= start and start + length <= source.shape[1]:
            return source.narrow(1, start, length)
    return source.as_strided((batch, length), (row, 1), first.storage_offset())
