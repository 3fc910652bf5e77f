"""hyperkernels: fast per-sample neural networks, where every sample of a batch has its own weights."""
from . import nn
from ._dispatch import BACKEND_NAMES, BackendUnavailableError, available_backends
from .activations import ACTIVATIONS
from .functional import batched_conv1x1, batched_linear, batched_mlp, hyper_linear
from .layout import ParamLayout

__version__ = "0.1.0"

__all__ = [
    "batched_linear",
    "batched_conv1x1",
    "batched_mlp",
    "hyper_linear",
    "ParamLayout",
    "available_backends",
    "BackendUnavailableError",
    "BACKEND_NAMES",
    "ACTIVATIONS",
    "nn",
]
