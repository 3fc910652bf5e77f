"""The one validation path: shapes, dtypes and devices in, clear errors out, before any kernel runs.

Every message names the argument, what was expected and what was given.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Names a user may pass as ``backend=``: "auto", "torch" (its bmm formulation), and the concrete implementations
# that ``_dispatch`` registers (a test checks that the two lists agree).
BACKEND_NAMES = ("auto", "torch", "torch_bmm", "torch_conv", "triton", "cuda")


def check_tensor(name: str, t: object, shape_hint: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a Tensor of shape {shape_hint}, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype (one of {list(FLOAT_DTYPES)}), got {t.dtype}")
    return t


def check_ndim(name: str, t: Tensor, allowed: Sequence[int], shape_hint: str) -> None:
    if t.dim() not in allowed:
        raise ValueError(f"{name}: expected shape {shape_hint}, got {t.dim()}-D shape {tuple(t.shape)}")


def check_same_dtype_device(named: Sequence[tuple[str, Optional[Tensor]]]) -> None:
    """All given tensors share the first one's dtype and device."""
    present = [(n, t) for n, t in named if t is not None]
    first_name, first = present[0]
    for name, t in present[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{name}: expected dtype {first.dtype} (the dtype of {first_name}), got {t.dtype}")
        if t.device != first.device:
            raise ValueError(f"{name}: expected device {first.device} (the device of {first_name}), got {t.device}")


def check_size(name: str, dim_desc: str, got: int, expected: int, expected_from: str) -> None:
    if got != expected:
        raise ValueError(f"{name}: expected {dim_desc} {expected} ({expected_from}), got {got}")


def check_backend(backend: object) -> str:
    """``backend`` if it is a name a user may pass as ``backend=``, else a clear error."""
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a string, one of {list(BACKEND_NAMES)}, got {type(backend).__name__}")
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend: expected one of {list(BACKEND_NAMES)}, got {backend!r}")
    return backend


def check_w0(w0: object) -> float:
    if isinstance(w0, bool) or not isinstance(w0, (int, float)) or not math.isfinite(w0):
        raise TypeError(f"w0: expected a finite float, got {w0!r}")
    return float(w0)


def check_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    """x (B, in) or (B, N, in), weight (B, out, in), bias (B, out) or None."""
    check_tensor("x", x, "(B, in) or (B, N, in)")
    check_tensor("weight", weight, "(B, out, in)")
    check_ndim("x", x, (2, 3), "(B, in) or (B, N, in)")
    check_ndim("weight", weight, (3,), "(B, out, in)")
    _check_weight_bias(x, weight, bias, x.shape[-1], "in_features", "x.shape[-1]")


def check_conv1x1(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    """x (B, C_in, *spatial) with 1-3 spatial dims, weight (B, C_out, C_in[, 1, ...]), bias (B, C_out)."""
    check_tensor("x", x, "(B, C_in, *spatial)")
    check_tensor("weight", weight, "(B, C_out, C_in)")
    check_ndim("x", x, (3, 4, 5), "(B, C_in, *spatial) with 1, 2 or 3 spatial dims")
    check_ndim("weight", weight, (3, 4, 5, 6), "(B, C_out, C_in) with optional trailing 1-sized kernel dims")
    if any(s != 1 for s in weight.shape[3:]):
        raise ValueError(
            f"weight: a 1x1 convolution's kernel dims must all be 1, got weight of shape {tuple(weight.shape)}"
        )
    _check_weight_bias(x, weight, bias, x.shape[1], "in_channels", "x.shape[1]")


def _check_weight_bias(x, weight, bias, in_size, in_desc, in_from):
    batch = x.shape[0]
    check_size("weight", "batch size (dim 0)", weight.shape[0], batch, "x.shape[0]")
    check_size("weight", f"{in_desc} (dim 2)", weight.shape[2], in_size, in_from)
    if bias is not None:
        check_tensor("bias", bias, "(B, out)")
        if bias.dim() != 2 or bias.shape[0] != batch or bias.shape[1] != weight.shape[1]:
            raise ValueError(
                f"bias: expected shape ({batch}, {weight.shape[1]}) (batch of x, out of weight), "
                f"got {tuple(bias.shape)}"
            )
    check_same_dtype_device([("x", x), ("weight", weight), ("bias", bias)])


def check_mlp(x: Tensor, params: Tensor, in_features: int) -> None:
    """x (B, in) or (B, N, in) against flat params (B, P) (already checked against the layout)."""
    check_tensor("x", x, "(B, in) or (B, N, in)")
    check_ndim("x", x, (2, 3), "(B, in) or (B, N, in)")
    check_tensor("params", params, "(B, P)")
    check_size("x", "in_features (last dim)", x.shape[-1], in_features, "the layout's first layer")
    check_size("params", "batch size (dim 0)", params.shape[0], x.shape[0], "x.shape[0]")
    check_same_dtype_device([("x", x), ("params", params)])


def check_hyper_linear(x: Tensor, h: Tensor, head_weight: Tensor, head_bias: Optional[Tensor], out_features: object,
                       bias: object) -> None:
    """x (B, in) or (B, N, in), h (B, K), head_weight (out*in + out*bias, K), head_bias (same rows,) or None."""
    check_tensor("x", x, "(B, in) or (B, N, in)")
    check_ndim("x", x, (2, 3), "(B, in) or (B, N, in)")
    check_tensor("h", h, "(B, K)")
    check_ndim("h", h, (2,), "(B, K)")
    check_tensor("head_weight", head_weight, "(out*in + out*bias, K)")
    check_ndim("head_weight", head_weight, (2,), "(out*in + out*bias, K)")
    if isinstance(out_features, bool) or not isinstance(out_features, int):
        raise TypeError(f"out_features: expected a positive int, got {type(out_features).__name__} {out_features!r}")
    if out_features < 1:
        raise ValueError(f"out_features: expected a positive int, got {out_features}")
    if not isinstance(bias, bool):
        raise TypeError(f"bias: expected a bool (whether the generated layer has a bias), got {bias!r}")
    in_features = x.shape[-1]
    rows = out_features * in_features + (out_features if bias else 0)
    if bias:
        rows_from = f"out*in + out = {out_features}*{in_features} + {out_features}, in = x.shape[-1], bias=True"
    else:
        rows_from = f"out*in = {out_features}*{in_features}, in = x.shape[-1], bias=False"
    check_size("h", "batch size (dim 0)", h.shape[0], x.shape[0], "x.shape[0]")
    check_size("head_weight", "rows (dim 0)", head_weight.shape[0], rows, rows_from)
    check_size("head_weight", "columns (dim 1)", head_weight.shape[1], h.shape[1], "K = h.shape[1]")
    if head_bias is not None:
        check_tensor("head_bias", head_bias, "(out*in + out*bias,)")
        if head_bias.dim() != 1 or head_bias.shape[0] != rows:
            raise ValueError(f"head_bias: expected shape ({rows},) (the rows of head_weight), "
                             f"got {tuple(head_bias.shape)}")
    check_same_dtype_device([("x", x), ("h", h), ("head_weight", head_weight), ("head_bias", head_bias)])
