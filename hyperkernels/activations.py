"""The one activation table.

Every backend fuses the same activations. Each entry carries the integer ``code`` that the Triton and
CUDA kernels switch on (``csrc/activations.cuh`` and ``backends/triton/activations.py`` implement the
same codes), the PyTorch forward, and the derivative, side by side.

The derivative is written in terms of the pre-activation ``z`` and the output ``y = f(z)``; where it
can be had from ``y`` alone (``needs_preactivation`` is False) the backward needs no saved ``z``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = ["Activation", "ACTIVATIONS", "get_activation", "DEFAULT_SINE_W0"]

# SIREN's first-layer frequency (Sitzmann et al. 2020); the usual default for sine networks.
DEFAULT_SINE_W0 = 30.0

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@dataclass(frozen=True)
class Activation:
    name: str
    code: int
    forward: Callable[[Tensor, float], Tensor]
    # derivative(z, y, w0) -> df/dz; z may be None when needs_preactivation is False.
    derivative: Callable[[Optional[Tensor], Tensor, float], Tensor]
    needs_preactivation: bool


def _gelu_derivative(z, y, w0):
    return 0.5 * (1.0 + torch.erf(z * _INV_SQRT2)) + z * torch.exp(-0.5 * z * z) * _INV_SQRT_2PI


def _silu_derivative(z, y, w0):
    s = torch.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


_TABLE = [
    Activation("none", 0, lambda z, w0: z, lambda z, y, w0: torch.ones_like(y), False),
    Activation("relu", 1, lambda z, w0: torch.relu(z), lambda z, y, w0: (y > 0).to(y.dtype), False),
    Activation("gelu", 2, lambda z, w0: torch.nn.functional.gelu(z), _gelu_derivative, True),
    Activation("silu", 3, lambda z, w0: torch.nn.functional.silu(z), _silu_derivative, True),
    Activation("tanh", 4, lambda z, w0: torch.tanh(z), lambda z, y, w0: 1.0 - y * y, False),
    Activation("sigmoid", 5, lambda z, w0: torch.sigmoid(z), lambda z, y, w0: y * (1.0 - y), False),
    Activation("sine", 6, lambda z, w0: torch.sin(w0 * z), lambda z, y, w0: w0 * torch.cos(w0 * z), True),
]

ACTIVATIONS: dict[str, Activation] = {a.name: a for a in _TABLE}


def get_activation(name: Optional[str]) -> Activation:
    """Look an activation up by name; ``None`` means ``"none"``."""
    if name is None:
        return ACTIVATIONS["none"]
    if not isinstance(name, str):
        raise TypeError(
            f"activation: expected None or one of {sorted(ACTIVATIONS)}, got {type(name).__name__} {name!r}"
        )
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"activation: expected None or one of {sorted(ACTIVATIONS)}, got {name!r}") from None
