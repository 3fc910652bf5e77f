"""Modules that hold shapes and layouts, never per-sample weights."""
from .conv import BatchedConv1x1
from .linear import BatchedLinear

__all__ = ["BatchedLinear", "BatchedConv1x1"]
