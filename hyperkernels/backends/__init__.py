"""Backends: the code that computes each op, behind one interface.

A backend is an object with a ``name`` and, for each op it implements, a forward and a backward
function. The op layer (``hyperkernels/ops``) calls them; it never looks inside.

Conventions every backend keeps:

* Per-sample linear, ``linear_forward(x, weight, bias, act, w0, channel_major, save_preact)``:
  ``x`` is ``(B, N, in)`` (``channel_major=False``, token-major) or ``(B, in, S)`` (``channel_major=True``,
  the 1x1 conv layout), with any strides; ``weight (B, out, in)`` and ``bias (B, out)`` or None, any strides
  (batch stride 0 for a weight shared by every sample). Returns ``(y, preact)``: ``y`` contiguous
  ``(B, N, out)`` or ``(B, out, S)``; ``preact`` the pre-activation in the same layout when ``save_preact``,
  else an empty tensor. ``act`` is an :class:`~hyperkernels.activations.Activation`.
* ``linear_backward(grad_y, x, weight, bias, y, preact, act, w0, channel_major, output_mask)`` returns
  ``(dx, dweight, dbias)``, each contiguous (``dx`` in ``x``'s layout) or None where ``output_mask``
  says it is not needed. ``preact`` may be empty: a backend recomputes it when the activation's
  derivative needs it.
* Per-sample MLP (optional: a backend without ``mlp_forward`` does not run ``batched_mlp``),
  ``mlp_forward(x, params, spec, act, out_act, w0, save_layers) -> (y, saved)``: ``x (B, N, in)`` any
  strides, ``params (B, P)`` any strides (batch stride 0 for shared params), ``spec`` an
  :class:`~hyperkernels.layout.MLPSpec` saying where each layer's weight and bias sit in a row; ``y``
  contiguous ``(B, N, out)``. ``saved``: ``[]`` unless ``save_layers``, else one tensor per layer as
  ``MLPSpec.saved_kinds`` says (every backend honours ``save_layers``: the op's fake promises it). The
  op layer sets it only when a gradient will be needed and the backend's
  ``mlp_saves_layers(single_point)`` says saving beats recomputing for this regime.
  ``mlp_backward(grad_y, x, params, y, saved, spec, act, out_act, w0, output_mask) -> (dx, dparams)``,
  ``dparams`` one contiguous ``(B, P)`` tensor; ``saved`` may be ``[]`` (recompute).
* Hyper-fused linear (optional), ``hyper_linear_forward(x, h, head_weight, head_bias, out_features, bias, act,
  w0, save_preact) -> (y, preact)``: ``x (B, N, in)`` any strides, ``h (B, K)``, the hypernetwork head
  ``head_weight (out*in + out*bias, K)`` and ``head_bias`` or None; ``y`` contiguous ``(B, N, out)``; the
  per-sample weights are never materialised. ``hyper_linear_backward(grad_y, x, h, head_weight, head_bias, y,
  preact, out_features, bias, act, w0, output_mask) -> (dx, dh, dhead_weight, dhead_bias)``.
"""
from __future__ import annotations

from typing import Optional, Protocol

import torch
from torch import Tensor

from ..activations import Activation


class Backend(Protocol):
    name: str

    def unavailable_reason(self) -> Optional[str]:
        """None when usable in this process, else why not and how to get it."""

    def check_support(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        """None when tensors of this device and dtype are supported, else why not."""

    def linear_forward(
        self, x: Tensor, weight: Tensor, bias: Optional[Tensor], act: Activation, w0: float,
        channel_major: bool, save_preact: bool,
    ) -> tuple[Tensor, Tensor]: ...

    def linear_backward(
        self, grad_y: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], y: Tensor, preact: Tensor,
        act: Activation, w0: float, channel_major: bool, output_mask: tuple[bool, bool, bool],
    ) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]: ...

    # Optional members, read with hasattr by the registry (``_dispatch.implements``): ``mlp_forward``,
    # ``mlp_backward`` and ``mlp_saves_layers(single_point) -> bool`` (whether the forward should save each
    # layer's values for the backward, or the backward recompute them), with ``mlp_max_width: int`` (the widest
    # layer its fused MLP takes; "auto" sends wider nets to torch); ``hyper_linear_forward`` and
    # ``hyper_linear_backward``. Their signatures are in this module's docstring.
