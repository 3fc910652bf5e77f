"""The one activation table.

Every backend fuses the same activations. Each entry carries the integer ``code`` that the Triton and
CUDA kernels switch on (``csrc/activations.cuh`` and ``backends/triton/activations.py`` implement the
same codes), the PyTorch forward, and its backward, side by side.

The backward maps ``dL/dy`` to ``dL/dz`` from the pre-activation ``z`` and the output ``y = f(z)``; where
the output alone is enough (``needs_preactivation`` is False) the backward needs no saved ``z``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = ["Activation", "ACTIVATIONS", "get_activation", "DEFAULT_SINE_W0"]

# SIREN's first-layer frequency (Sitzmann et al. 2020); the usual default for sine networks.
DEFAULT_SINE_W0 = 30.0

@dataclass(frozen=True)
class Activation:
    name: str
    code: int
    forward: Callable[[Tensor, float], Tensor]
    # grad(grad_y, z, y, w0) -> dL/dz; z may be None when needs_preactivation is False.
    grad: Callable[[Tensor, Optional[Tensor], Tensor, float], Tensor]
    needs_preactivation: bool


_aten = torch.ops.aten

# The grads use PyTorch's own fused backward kernels where there is one (one pass instead of computing
# the derivative and multiplying); all are differentiable.
_TABLE = [
    Activation("none", 0, lambda z, w0: z, lambda g, z, y, w0: g, False),
    Activation("relu", 1, lambda z, w0: torch.relu(z), lambda g, z, y, w0: _aten.threshold_backward(g, y, 0), False),
    Activation("gelu", 2, lambda z, w0: torch.nn.functional.gelu(z), lambda g, z, y, w0: _aten.gelu_backward(g, z),
               True),
    Activation("silu", 3, lambda z, w0: torch.nn.functional.silu(z), lambda g, z, y, w0: _aten.silu_backward(g, z),
               True),
    Activation("tanh", 4, lambda z, w0: torch.tanh(z), lambda g, z, y, w0: _aten.tanh_backward(g, y), False),
    Activation("sigmoid", 5, lambda z, w0: torch.sigmoid(z), lambda g, z, y, w0: _aten.sigmoid_backward(g, y), False),
    Activation("sine", 6, lambda z, w0: torch.sin(w0 * z), lambda g, z, y, w0: g * (w0 * torch.cos(w0 * z)), True),
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
