"""The Triton backend: fused per-sample linear / 1x1 conv, MLP and hyper-fused linear kernels for CUDA GPUs.

On CPU tensors the same kernels run under Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is
first imported); that is how CI tests them, and it is far too slow for anything else.

This module imports triton only when asked whether it is available, so that ``import hyperkernels`` works
where triton is not installed and the reason can be reported instead.

Files: ``linear.py``, ``mlp.py``, ``hyper_linear.py`` are the entry points of the three ops; the kernels, their
configs and launchers are ``linear_gemv.py`` / ``linear_gemm.py``, ``mlp_gemv.py`` / ``mlp_gemm.py`` (tile tables
in ``mlp_tiles.py``) and ``hyper_linear.py``; every file follows the launch rules of ``_launch.py`` and shares the
jitted helpers of ``_jit.py`` and ``activations.py``.
"""
from __future__ import annotations

import os
from functools import lru_cache
from typing import Optional

import torch

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    """Whether the kernels were built for the interpreter: ``_config`` records it when the kernel modules first
    import triton, when ``triton.jit`` made the same choice (not at this package's import, which may come first)."""
    try:
        from . import linear  # noqa: F401
    except Exception:  # not importable: _probe says why
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    from ._config import INTERPRET

    return INTERPRET


@lru_cache(maxsize=None)
def _probe() -> Optional[str]:
    try:
        import triton
    except ImportError as exc:
        return f"triton is not installed ({exc}): pip install triton"
    try:
        from . import hyper_linear, linear, mlp  # noqa: F401
    except Exception as exc:  # e.g. a triton version whose API the kernels do not match
        return f"its kernels failed to load with triton {triton.__version__}: {exc!r}"
    if _interpreting():
        return None
    if not torch.cuda.is_available():
        return ("it needs a CUDA GPU (torch sees none), or TRITON_INTERPRET=1 set before triton is first "
                "imported to run its kernels on CPU tensors for testing")
    return None


@lru_cache(maxsize=None)
def _torch_backend():
    from ..torch import make_backend as make_torch_backend

    return make_torch_backend("bmm")


def _empty(*tensors: torch.Tensor) -> bool:
    """The backend's one empty-problem rule: an operand without elements runs on the torch backend, whose methods take
    the same arguments. ``_dispatch.resolve_backend`` already sends problems with B, N, in or out = 0 there, but the
    registered ops take the backend by name (``hyperkernels::batched_linear(..., "triton")``) and reach this object
    directly, and a hyper_linear head with K = 0 (``h (B, 0)``) is not empty to the dispatcher. The kernels would
    launch no program for outputs that must still be written: db when in = 0 (the programs of the first K block write
    it, and there are none) and the N > 1 MLP backward's dparams when N = 0 (each program adds its tiles; there are
    none)."""
    return any(t.numel() == 0 for t in tensors)


class TritonBackend:
    name = "triton"
    # The widest layer (in, hidden or out) the fused MLP kernels take: their tile tables (mlp_tiles.py) and the
    # offline resource checks cover padded widths up to 256. A plain number, so that reading it imports no triton.
    mlp_max_width = 256

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

    def _check_widths(self, spec) -> None:
        widest = max(spec.sizes)
        if widest > self.mlp_max_width:
            raise ValueError(
                f"layout: the triton backend's fused MLP takes widths up to {self.mlp_max_width}, got sizes "
                f"{list(spec.sizes)}; use backend='torch' (or 'auto', which picks it) for wider layers"
            )

    def linear_forward(self, x, weight, bias, act, w0, channel_major, save_preact):
        if _empty(x, weight):
            return _torch_backend().linear_forward(x, weight, bias, act, w0, channel_major, save_preact)
        from . import linear

        return linear.linear_forward(x, weight, bias, act, w0, channel_major, save_preact)

    def linear_backward(self, grad_y, x, weight, bias, y, preact, act, w0, channel_major, output_mask):
        if _empty(x, weight):
            need_dx, need_dw, need_db = output_mask  # no bias, no db (as the kernels' path answers)
            return _torch_backend().linear_backward(grad_y, x, weight, bias, y, preact, act, w0, channel_major,
                                                    (need_dx, need_dw, need_db and bias is not None))
        from . import linear

        return linear.linear_backward(grad_y, x, weight, bias, y, preact, act, w0, channel_major, output_mask)

    def mlp_saves_layers(self, single_point: bool) -> bool:
        """N > 1: the backward recomputes each tile's forward on chip, cheaper than storing B*N*hidden values
        at the widths of neural fields. N = 1: keeping the (small) per-layer values saves a second read of
        every weight (mlp.py's docstring has the numbers)."""
        return single_point

    def mlp_forward(self, x, params, spec, act, out_act, w0, save_layers):
        self._check_widths(spec)
        if _empty(x, params):
            return _torch_backend().mlp_forward(x, params, spec, act, out_act, w0, save_layers)
        from . import mlp

        return mlp.mlp_forward(x, params, spec, act, out_act, w0, save_layers)

    def mlp_backward(self, grad_y, x, params, y, saved, spec, act, out_act, w0, output_mask):
        self._check_widths(spec)
        if _empty(x, params):
            return _torch_backend().mlp_backward(grad_y, x, params, y, saved, spec, act, out_act, w0, output_mask)
        from . import mlp

        return mlp.mlp_backward(grad_y, x, params, y, saved, spec, act, out_act, w0, output_mask)

    def hyper_linear_forward(self, x, h, head_weight, head_bias, out_features, bias, act, w0, save_preact):
        if _empty(x, h, head_weight):
            return _torch_backend().hyper_linear_forward(x, h, head_weight, head_bias, out_features, bias, act, w0,
                                                         save_preact)
        from . import hyper_linear

        return hyper_linear.hyper_linear_forward(x, h, head_weight, head_bias, out_features, bias, act, w0,
                                                 save_preact)

    def hyper_linear_backward(self, grad_y, x, h, head_weight, head_bias, y, preact, out_features, bias, act, w0,
                              output_mask):
        if _empty(x, h, head_weight):
            return _torch_backend().hyper_linear_backward(grad_y, x, h, head_weight, head_bias, y, preact,
                                                          out_features, bias, act, w0, output_mask)
        from . import hyper_linear

        return hyper_linear.hyper_linear_backward(grad_y, x, h, head_weight, head_bias, y, preact, out_features,
                                                  bias, act, w0, output_mask)


def make_backend(variant: None = None) -> TritonBackend:
    """The registry's constructor (``_dispatch._IMPLEMENTATIONS``): the Triton backend has one implementation, so the
    registry passes ``variant=None``."""
    if variant is not None:
        raise ValueError(f"variant: the triton backend has no variants (expected None), got {variant!r}")
    return TritonBackend()
