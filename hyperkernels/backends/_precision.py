"""The float32 precision rule every GPU backend follows: TF32 tensor cores exactly when PyTorch's own CUDA
matmuls may use them, so that switching backend never changes how float32 products round."""
from __future__ import annotations

import torch

__all__ = ["tf32_allowed"]


def tf32_allowed() -> bool:
    """Whether float32 GEMMs may use TF32 tensor cores, as ``torch.matmul`` on CUDA would decide.

    ``torch.backends.cuda.matmul.fp32_precision`` (torch >= 2.9) is read first: the legacy ``allow_tf32`` setter
    updates it, while the legacy getter raises once the new API has been used. "none" defers to the global
    ``torch.backends.fp32_precision``."""
    matmul = torch.backends.cuda.matmul
    try:
        precision = matmul.fp32_precision
    except AttributeError:  # torch < 2.9: only the legacy flag exists
        return bool(matmul.allow_tf32)
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "none")
    return precision == "tf32"
