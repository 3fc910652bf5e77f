"""Per-sample linear in pure PyTorch: the bmm and the grouped-Conv1d (groups = B) formulations.

Every function here is built from differentiable PyTorch ops, so this file is also what the other
backends' double backward differentiates (see ``hyperkernels/ops/linear.py``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ...activations import Activation


def _bmm_preact(x: Tensor, weight: Tensor, bias: Optional[Tensor], channel_major: bool) -> Tensor:
    if channel_major:  # (B, M, K) @ (B, K, S) -> (B, M, S)
        if bias is None:
            return torch.bmm(weight, x)
        return torch.baddbmm(bias.unsqueeze(2), weight, x)
    # (B, N, K) @ (B, K, M) -> (B, N, M)
    if bias is None:
        return torch.bmm(x, weight.transpose(1, 2))
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


def _conv_operands(x: Tensor, weight: Tensor, channel_major: bool) -> tuple[Tensor, Tensor]:
    """x as the (1, B*K, S) input and weight as the (B*M, K, 1) filter of a groups=B Conv1d."""
    batch, m, k = weight.shape
    x_cm = x if channel_major else x.transpose(1, 2)
    return x_cm.reshape(1, batch * k, x_cm.shape[2]), weight.reshape(batch * m, k, 1)


def _from_conv_layout(t: Tensor, batch: int, channel_major: bool) -> Tensor:
    """(1, B*M, S) conv output -> the op's contiguous output layout."""
    t = t.view(batch, -1, t.shape[2])
    return t if channel_major else t.transpose(1, 2).contiguous()


def _conv_preact(x: Tensor, weight: Tensor, bias: Optional[Tensor], channel_major: bool) -> Tensor:
    x_conv, w_conv = _conv_operands(x, weight, channel_major)
    b_conv = None if bias is None else bias.reshape(-1)
    z = F.conv1d(x_conv, w_conv, b_conv, groups=weight.shape[0])
    return _from_conv_layout(z, weight.shape[0], channel_major)


def preactivation(x: Tensor, weight: Tensor, bias: Optional[Tensor], channel_major: bool, formulation: str) -> Tensor:
    """z = x W^T + b in the op's output layout."""
    if formulation == "conv":
        return _conv_preact(x, weight, bias, channel_major)
    return _bmm_preact(x, weight, bias, channel_major)


def linear_forward(x, weight, bias, act: Activation, w0: float, channel_major: bool, save_preact: bool, formulation: str):
    z = preactivation(x, weight, bias, channel_major, formulation)
    if act.name == "none":
        return z, z.new_empty(0)
    y = act.forward(z, w0)
    return y, (z if save_preact else z.new_empty(0))


def _bmm_grads(dz, x, weight, channel_major, output_mask):
    need_x, need_w, need_b = output_mask
    if channel_major:  # dz (B, M, S), x (B, K, S)
        dx = torch.bmm(weight.transpose(1, 2), dz) if need_x else None
        dw = torch.bmm(dz, x.transpose(1, 2)) if need_w else None
        db = dz.sum(2) if need_b else None
    else:  # dz (B, N, M), x (B, N, K)
        dx = torch.bmm(dz, weight) if need_x else None
        dw = torch.bmm(dz.transpose(1, 2), x) if need_w else None
        db = dz.sum(1) if need_b else None
    return dx, dw, db


def _conv_grads(dz, x, weight, channel_major, output_mask):
    batch, m, k = weight.shape
    x_conv, w_conv = _conv_operands(x, weight, channel_major)
    dz_conv = (dz if channel_major else dz.transpose(1, 2)).reshape(1, batch * m, -1)
    dx, dw, db = torch.ops.aten.convolution_backward(
        dz_conv, x_conv, w_conv, [batch * m], [1], [0], [1], False, [0], batch, list(output_mask)
    )
    dx = _from_conv_layout(dx, batch, channel_major) if output_mask[0] else None
    dw = dw.view(batch, m, k) if output_mask[1] else None
    db = db.view(batch, m) if output_mask[2] else None
    return dx, dw, db


def linear_backward(grad_y, x, weight, bias, y, preact, act: Activation, w0: float, channel_major: bool,
                    output_mask, formulation: str):
    if act.needs_preactivation and preact.numel() == 0:
        preact = preactivation(x, weight, bias, channel_major, formulation)
    dz = act.grad(grad_y, preact, y, w0)
    if formulation == "conv":
        return _conv_grads(dz, x, weight, channel_major, output_mask)
    return _bmm_grads(dz, x, weight, channel_major, output_mask)
