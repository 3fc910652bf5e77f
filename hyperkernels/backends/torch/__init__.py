"""The pure-PyTorch backend: the CPU fallback, and what double backward differentiates."""
from __future__ import annotations

from typing import Optional

import torch

from . import hyper_linear as _hyper_linear
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
    def mlp_saves_layers(self, single_point: bool) -> bool:
        """Always: recomputing the forward would cost as much again as saving it."""
        return True

    def mlp_forward(self, x, params, spec, act, out_act, w0, save_layers):
        return _mlp.mlp_forward(x, params, spec, act, out_act, w0, save_layers)

    def mlp_backward(self, grad_y, x, params, y, saved, spec, act, out_act, w0, output_mask):
        return _mlp.mlp_backward(grad_y, x, params, y, saved, spec, act, out_act, w0, output_mask)

    # Hyper-fused linear: the outer-product GEMMs, chunked over rows (the formulation does not apply).
    def hyper_linear_forward(self, x, h, head_weight, head_bias, out_features, bias, act, w0, save_preact):
        return _hyper_linear.hyper_linear_forward(x, h, head_weight, head_bias, out_features, bias, act, w0,
                                                  save_preact)

    def hyper_linear_backward(self, grad_y, x, h, head_weight, head_bias, y, preact, out_features, bias, act, w0,
                              output_mask):
        return _hyper_linear.hyper_linear_backward(grad_y, x, h, head_weight, head_bias, y, preact, out_features,
                                                   bias, act, w0, output_mask)


def make_backend(variant: str) -> TorchBackend:
    return TorchBackend(variant)
