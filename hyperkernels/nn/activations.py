from __future__ import annotations

import torch
from torch import Tensor, nn

from .._validate import check_w0
from ..activations import DEFAULT_SINE_W0


class Sine(nn.Module):
    """``sin(w0 * x)``: the SIREN activation (Sitzmann et al., 2020), as a module for ``nn.Sequential``."""

    def __init__(self, w0: float = DEFAULT_SINE_W0):
        super().__init__()
        self.w0 = check_w0(w0)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(self.w0 * x)

    def extra_repr(self) -> str:
        return f"w0={self.w0}"
