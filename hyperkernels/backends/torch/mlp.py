"""The per-sample MLP in pure PyTorch, layer by layer with bmm: the CPU fallback and the reference.

What the forward saves for the backward is the op's contract, :meth:`MLPSpec.saved_kinds`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ...activations import Activation
from ...layout import MLPSpec
from . import linear as torch_linear


def layer_params(params: Tensor, spec: MLPSpec, i: int) -> tuple[Tensor, Optional[Tensor]]:
    """Layer i's (weight (B, out, in), bias (B, out) or None): views of the flat ``(B, P)`` params."""
    out_f, in_f, w_off, b_off = spec.layer(i)
    weight = params.narrow(1, w_off, out_f * in_f).unflatten(1, (out_f, in_f))
    bias = params.narrow(1, b_off, out_f) if b_off >= 0 else None
    return weight, bias


def reference_forward(x: Tensor, params: Tensor, spec: MLPSpec, act: Activation, out_act: Activation,
                      w0: float) -> Tensor:
    """y from differentiable PyTorch ops (what double backward differentiates)."""
    h = x
    for i in range(spec.num_layers):
        weight, bias = layer_params(params, spec, i)
        z = torch_linear.preactivation(h, weight, bias, False, "bmm")
        h = spec.layer_activation(i, act, out_act).forward(z, w0)
    return h


def mlp_forward(x, params, spec: MLPSpec, act: Activation, out_act: Activation, w0: float, save_layers: bool):
    kinds = spec.saved_kinds(act, out_act)
    saved = []
    h = x
    for i in range(spec.num_layers):
        weight, bias = layer_params(params, spec, i)
        z = torch_linear.preactivation(h, weight, bias, False, "bmm")
        h = spec.layer_activation(i, act, out_act).forward(z, w0)
        if save_layers:
            saved.append({"z": z, "h": h, "-": h.new_empty(0)}[kinds[i]])
    return h.contiguous(), saved


def mlp_backward(grad_y, x, params, y, saved, spec: MLPSpec, act: Activation, out_act: Activation, w0: float,
                 output_mask):
    need_x, need_params = output_mask
    if not saved:
        saved = mlp_forward(x, params, spec, act, out_act, w0, True)[1]
    kinds = spec.saved_kinds(act, out_act)
    zs = [t if kind == "z" else None for t, kind in zip(saved, kinds)]
    # Each layer's output: kept, recomputed from the kept z, or (last layer) the op's output.
    hs = [spec.layer_activation(i, act, out_act).forward(t, w0) if kind == "z" else t
          for i, (t, kind) in enumerate(zip(saved, kinds))]
    hs[-1] = y
    hs.insert(0, x)  # hs[i] is layer i's input
    # Every entry of the flat row belongs to exactly one layer (MLPSpec tiles [0, P)), so no zero fill.
    dparams = params.new_empty(params.shape[0], spec.numel) if need_params else None
    dz = out_act.grad(grad_y, zs[-1], y, w0)
    dx = None
    for i in reversed(range(spec.num_layers)):
        weight, _ = layer_params(params, spec, i)
        if need_params:
            d_weight, d_bias = layer_params(dparams, spec, i)
            if dz.shape[1] == 1:  # an outer product: written straight into dparams, no temporary
                torch.mul(dz.transpose(1, 2), hs[i], out=d_weight)
            else:
                d_weight.copy_(torch.bmm(dz.transpose(1, 2), hs[i]))
            if d_bias is not None:
                d_bias.copy_(dz.sum(1))
        if i == 0 and not need_x:
            break
        dh = torch.bmm(dz, weight)
        if i == 0:
            dx = dh
        else:
            dz = act.grad(dh, zs[i - 1], hs[i], w0)
    return dx, dparams
