"""The Triton backend: fused per-sample linear / 1x1 conv kernels for CUDA GPUs.

On CPU tensors the same kernels run under Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is
first imported); that is how CI tests them, and it is far too slow for anything else.

This module imports triton only when asked whether it is available, so that ``import hyperkernels`` works
where triton is not installed and the reason can be reported instead.
"""
from __future__ import annotations

import os
from functools import lru_cache
from typing import Optional

import torch

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    """Whether the kernels were built for the interpreter: ``linear.py`` records it at import, when
    ``triton.jit`` made the same choice."""
    try:
        from . import linear
    except Exception:  # not importable: _probe says why
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return linear.INTERPRET


@lru_cache(maxsize=None)
def _probe() -> Optional[str]:
    try:
        import triton
    except ImportError as exc:
        return f"triton is not installed ({exc}): pip install triton"
    try:
        from . import linear
    except Exception as exc:  # e.g. a triton version whose API the kernels do not match
        return f"its kernels failed to load with triton {triton.__version__}: {exc!r}"
    if linear.INTERPRET:
        return None
    if not torch.cuda.is_available():
        return ("it needs a CUDA GPU (torch sees none), or TRITON_INTERPRET=1 set before triton is first "
                "imported to run its kernels on CPU tensors for testing")
    return None


class TritonBackend:
    name = "triton"

    def unavailable_reason(self) -> Optional[str]:
        return _probe()

    def check_support(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        if dtype == torch.float64:
            return "float64 is not supported by the Triton kernels (no tensor-core path); use backend='torch'"
        if dtype not in _DTYPES:
            return f"supported dtypes are {list(_DTYPES)}, got {dtype}"
        if device.type == "cuda":
            return None
        if device.type == "cpu":
            if _interpreting():
                return None
            return ("CPU tensors run only under the Triton interpreter (TRITON_INTERPRET=1, for tests); "
                    "use backend='torch' on CPU")
        return f"supported devices are cuda (and cpu under TRITON_INTERPRET=1), got {device.type}"

    def linear_forward(self, x, weight, bias, act, w0, channel_major, save_preact):
        from . import linear

        return linear.linear_forward(x, weight, bias, act, w0, channel_major, save_preact)

    def linear_backward(self, grad_y, x, weight, bias, y, preact, act, w0, channel_major, output_mask):
        from . import linear

        return linear.linear_backward(grad_y, x, weight, bias, y, preact, act, w0, channel_major, output_mask)

    def mlp_keeps_hidden(self, single_point: bool) -> bool:
        """N > 1: the backward recomputes each tile's forward on chip, cheaper than storing B*N*hidden values
        at the widths of neural fields. N = 1: keeping the (small) per-layer values saves a second read of
        every weight (mlp.py's docstring has the numbers)."""
        return single_point

    def mlp_forward(self, x, params, spec, act, out_act, w0, save_hidden):
        from . import mlp

        return mlp.mlp_forward(x, params, spec, act, out_act, w0, save_hidden)

    def mlp_backward(self, grad_y, x, params, y, saved, spec, act, out_act, w0, output_mask):
        from . import mlp

        return mlp.mlp_backward(grad_y, x, params, y, saved, spec, act, out_act, w0, output_mask)

    def hyper_linear_forward(self, x, h, head_weight, head_bias, out_features, bias, act, w0, save_preact):
        from . import hyper_linear

        return hyper_linear.hyper_linear_forward(x, h, head_weight, head_bias, out_features, bias, act, w0,
                                                 save_preact)

    def hyper_linear_backward(self, grad_y, x, h, head_weight, head_bias, y, preact, out_features, bias, act, w0,
                              output_mask):
        from . import hyper_linear

        return hyper_linear.hyper_linear_backward(grad_y, x, h, head_weight, head_bias, y, preact, out_features,
                                                  bias, act, w0, output_mask)


def make_backend(variant: Optional[str] = None) -> TritonBackend:
    return TritonBackend()
