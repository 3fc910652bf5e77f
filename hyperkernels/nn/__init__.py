"""Modules that hold shapes and layouts, never per-sample weights."""
from .activations import Sine
from .batched import batched
from .conv import BatchedConv1x1
from .hyper_linear import HyperLinear
from .hypernetwork import BoundTarget, HyperNetwork
from .linear import BatchedLinear
from .mlp import BatchedMLP

__all__ = ["BatchedLinear", "BatchedConv1x1", "BatchedMLP", "Sine", "batched", "HyperNetwork", "BoundTarget",
           "HyperLinear"]
