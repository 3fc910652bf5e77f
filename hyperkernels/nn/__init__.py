"""Modules that hold shapes and layouts, never per-sample weights."""
from .activations import Sine
from .conv import BatchedConv1x1
from .linear import BatchedLinear
from .mlp import BatchedMLP

__all__ = ["BatchedLinear", "BatchedConv1x1", "BatchedMLP", "Sine"]
