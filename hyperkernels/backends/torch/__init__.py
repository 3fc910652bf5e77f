"""The pure-PyTorch backend: the CPU fallback, and what double backward differentiates."""
from __future__ import annotations

from typing import Optional

import torch

from . import linear as _linear
from . import mlp as _mlp

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class TorchBackend:
    """One formulation ("bmm" or "conv") of the pure-PyTorch backend."""

    def __init__(self, formulation: str):
        self.formulation = formulation
        self.name = f"torch_{formulation}"

    def unavailable_reason(self) -> Optional[str]:
        return None

    def check_support(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        if dtype not in _DTYPES:
            return f"supported dtypes are {list(_DTYPES)}, got {dtype}"
        return None

    def linear_forward(self, x, weight, bias, act, w0, channel_major, save_preact):
        return _linear.linear_forward(x, weight, bias, act, w0, channel_major, save_preact, self.formulation)

    def linear_backward(self, grad_y, x, weight, bias, y, preact, act, w0, channel_major, output_mask):
        return _linear.linear_backward(grad_y, x, weight, bias, y, preact, act, w0, channel_major, output_mask,
                                       self.formulation)

    # MLP: layer by layer with bmm whatever the formulation (the layers are small, and bmm wins on CPU).
    # It keeps every layer's pre-activation for the backward instead of recomputing the forward.
    mlp_keeps_hidden = True

    def mlp_forward(self, x, params, spec, act, out_act, w0, save_hidden):
        return _mlp.mlp_forward(x, params, spec, act, out_act, w0, save_hidden)

    def mlp_backward(self, grad_y, x, params, y, hidden, spec, act, out_act, w0, output_mask):
        return _mlp.mlp_backward(grad_y, x, params, y, hidden, spec, act, out_act, w0, output_mask)


def make_backend(variant: str) -> TorchBackend:
    return TorchBackend(variant)
