"""Whether the autograd graph being built will ask for a backward: ops save what the backward reads only then."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def grad_will_be_needed(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
