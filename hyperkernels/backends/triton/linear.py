r"""Per-sample linear / 1x1 conv in Triton: ``y[b] = act(x[b] @ W[b]^T + bias[b])``, forward and backward.

The backend's entry points: they allocate the outputs, pick the regime and hand the views to its launchers,
``linear_gemv.py`` (``N == 1``, a batched GEMV on CUDA cores) and ``linear_gemm.py`` (``N > 1``, per-sample GEMMs
on tensor cores). Grids and index widths follow ``_launch.py``.

Shapes. Every tensor is handled as a token-major 3-D view through its strides, so one kernel serves both
layouts: ``x (B, N, K)``, ``W (B, M, K)``, ``bias (B, M)``, ``y / preact / grad_y (B, N, M)``,
``dx (B, N, K)``, ``dW (B, M, K)``, ``db (B, M)``. A channel-major tensor ``(B, C, S)`` enters as its
transpose ``(B, S, C)`` (a view, never a copy); the outputs are allocated contiguous in the op's layout and
written through the transposed view.

A weight shared by every sample (batch stride 0) with ``N == 1`` is one GEMM, ``(B, K) @ (K, M)``: the batch is
folded into the rows and the GEMM kernels run on it.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
from torch import Tensor

from ...activations import ACTIVATIONS, Activation
from . import linear_gemm, linear_gemv
from ._launch import device_guard, dot_flags, split_count, split_rows

_ACT_NONE = ACTIVATIONS["none"]


def _token_major(t: Tensor, channel_major: bool) -> Tensor:
    """The (B, tokens, channels) view of a tensor in the op's layout (a transpose for channel-major)."""
    return t.transpose(1, 2) if channel_major else t


def _fold_batch(t: Tensor) -> Tensor:
    """(B, 1, C) -> (1, B, C), a view: with a shared weight, the samples of a GEMV are the rows of one GEMM."""
    return t.as_strided((1, t.shape[0], t.shape[2]), (0, t.stride(0), t.stride(2)))


def _dw_splits(batch: int, m: int, k: int, n: int, device: torch.device) -> int:
    """How many slices of the tokens the dW kernel splits into (one program per 64x64 block of dW per sample is the
    parallelism it has without splitting). Its own name, so that the tests and bench/gpu_smoke.py can force a split
    on CPU by replacing it."""
    return split_count(batch * triton.cdiv(m, 64) * triton.cdiv(k, 64), n, device)


def _launch_forward(xt: Tensor, weight: Tensor, bias: Optional[Tensor], yt: Tensor, zt: Optional[Tensor],
                    act: Activation, w0: float) -> None:
    """Writes act(x W^T + b) into the token-major view ``yt`` (and the pre-activation into ``zt`` if given)."""
    n = xt.shape[1]
    bias_strides = (bias.stride(0), 0, bias.stride(1)) if bias is not None else (0, 0, 0)
    if n == 1 and weight.stride(0) == 0:
        # One shared weight: the B single tokens are the rows of one GEMM; the bias keeps a per-row stride.
        xt, yt = _fold_batch(xt), _fold_batch(yt)
        zt = _fold_batch(zt) if zt is not None else None
        bias_strides = (0, bias_strides[0], bias_strides[2])
        n = xt.shape[1]
    if n == 1:
        linear_gemv.launch_forward(xt, weight, bias, bias_strides, yt, zt, act, w0)
    else:
        linear_gemm.launch_forward(xt, weight, bias, bias_strides, yt, zt, act, w0, dot_flags(xt.dtype))


def linear_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: Activation, w0: float,
                   channel_major: bool, save_preact: bool) -> tuple[Tensor, Tensor]:
    """See ``hyperkernels/backends/__init__.py``: ``(y, preact)``, both contiguous in the op's layout."""
    xt = _token_major(x, channel_major)
    batch, n, _ = xt.shape
    m = weight.shape[1]
    shape = (batch, m, n) if channel_major else (batch, n, m)
    keep = save_preact and act.needs_preactivation
    y = x.new_empty(shape)
    z = x.new_empty(shape) if keep else None
    with device_guard(x):
        _launch_forward(xt, weight, bias, _token_major(y, channel_major),
                        _token_major(z, channel_major) if keep else None, act, w0)
    return y, (z if keep else x.new_empty(0))


def linear_backward(grad_y: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], y: Tensor, preact: Tensor,
                    act: Activation, w0: float, channel_major: bool, output_mask) -> tuple:
    """See ``hyperkernels/backends/__init__.py``: ``(dx, dweight, dbias)``, None where not asked for."""
    need_dx, need_dw, need_db = output_mask
    need_db = need_db and bias is not None
    xt = _token_major(x, channel_major)
    batch, n, k = xt.shape
    m = weight.shape[1]
    gt = _token_major(grad_y, channel_major)
    load_z = act.needs_preactivation
    load_y = not load_z and act.code != _ACT_NONE.code
    dx = x.new_empty(x.shape) if need_dx else None  # contiguous in x's layout
    dw = x.new_empty(weight.shape) if need_dw else None
    db = x.new_empty(weight.shape[:2]) if need_db else None

    with device_guard(x):
        if load_z and preact.numel() == 0:  # the forward kept no pre-activation: recompute it (one GEMM)
            preact = x.new_empty(y.shape)
            _launch_forward(xt, weight, bias, _token_major(preact, channel_major), None, _ACT_NONE, w0)
        yt = _token_major(y, channel_major) if load_y else gt
        zt = _token_major(preact, channel_major) if load_z else gt
        dxt = _token_major(dx, channel_major) if need_dx else None
        flags = dict(ACT=act.code, LOAD_Y=load_y, LOAD_Z=load_z)
        dot = dot_flags(x.dtype)

        if n == 1 and need_dx and weight.stride(0) == 0:
            # Shared weight: dx of all B single tokens is one GEMM (see _launch_forward).
            linear_gemm.launch_dx(_fold_batch(gt), weight, _fold_batch(yt), _fold_batch(zt), _fold_batch(dxt), w0,
                                  flags, dot)
            need_dx = False
        if n == 1:
            if need_dx or need_dw or need_db:
                linear_gemv.launch_backward(gt, xt, weight, yt, zt, dxt if need_dx else None, dw, db, w0, flags)
        else:
            if need_dx:
                linear_gemm.launch_dx(gt, weight, yt, zt, dxt, w0, flags, dot)
            if need_dw or need_db:
                splits, rows_per_split = split_rows(n, _dw_splits(batch, m, k, n, xt.device))
                linear_gemm.launch_dw(gt, xt, yt, zt, dw, db, splits, rows_per_split, w0, flags, dot)
    return dx, dw, db
