"""Backend registry, availability, and the rules of ``backend="auto"`` — all in one place."""
from __future__ import annotations

import importlib
from functools import lru_cache
from typing import Optional

import torch

from .backends import Backend

__all__ = ["BackendUnavailableError", "available_backends", "get_backend", "resolve_backend", "BACKEND_NAMES"]


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot run in this process (not built, not installed, no device)."""


# Concrete implementations, by the name the ops receive, and where each lives.
# "torch_bmm" and "torch_conv" are the two formulations of the pure-PyTorch backend.
_IMPLEMENTATIONS = {
    "torch_bmm": ("hyperkernels.backends.torch", "bmm"),
    "torch_conv": ("hyperkernels.backends.torch", "conv"),
    "triton": ("hyperkernels.backends.triton", None),
    "cuda": ("hyperkernels.backends.cuda", None),
}

# The backend method that implements each op: a backend without it does not run that op.
_OP_METHODS = {"batched_linear": "linear_forward", "batched_conv1x1": "linear_forward",
               "batched_mlp": "mlp_forward", "hyper_linear": "hyper_linear_forward"}

# Names a user may pass as ``backend=``.
BACKEND_NAMES = ("auto", "torch", *_IMPLEMENTATIONS)


@lru_cache(maxsize=None)
def get_backend(name: str) -> Backend:
    """The backend object of a concrete implementation name (not "auto" / "torch")."""
    if name not in _IMPLEMENTATIONS:
        raise ValueError(f"backend: expected one of {list(_IMPLEMENTATIONS)}, got {name!r}")
    module_name, variant = _IMPLEMENTATIONS[name]
    return importlib.import_module(module_name).make_backend(variant)


# The availability and support checks below run eagerly under torch.compile and are kept as constants:
# traced, get_backend's import_module would break the graph.
@torch.compiler.assume_constant_result
def _unavailable_reason(name: str) -> Optional[str]:
    try:
        backend = get_backend(name)
    except ImportError as exc:  # the backend's own dependency is missing
        return f"importing it failed: {exc}"
    return backend.unavailable_reason()


def available_backends() -> dict[str, Optional[str]]:
    """``{name: None if usable else the reason it is not}`` for every concrete backend."""
    return {name: _unavailable_reason(name) for name in _IMPLEMENTATIONS}


# -- the "auto" rules ----------------------------------------------------------------------------

# The pure-PyTorch formulation: bmm. Measured on this project's 2-core CPU (bench/torch_formulations.py,
# table in bench/results/cpu_torch_formulations.md), bmm is faster than grouped Conv1d (groups = B) for
# forward+backward on every shape tried, in both layouts, by 1.1x to 4x; grouped conv only wins some
# channel-major forward passes at N >= 1024, and not consistently. "torch_conv" stays selectable by name.
_TORCH_FORMULATION = "torch_bmm"
_TORCH_IMPLEMENTATIONS = ("torch_bmm", "torch_conv")

# With the torch backend, an op runs as its plain PyTorch composition under autograd where the custom op would
# only add its dispatch overhead (~15 us forward, ~70 us backward per call, measured on this CPU) and hide the
# composition from inductor: per-sample linear and conv1x1 always. The fused MLP's op earns its place by
# writing one (B, P) gradient where autograd writes a zero-filled (B, P) buffer per layer view; that matters
# while few points share each sample's weights. MLP [16,64,64,64,16], forward+backward, op / composition ms
# (2-core CPU): N=1 B=1024 27 / 134, N=4 B=512 7.3 / 31, N=16 B=256 5.6 / 8.9, N=64 B=128 6.8 / 7.7,
# N=256 B=32 4.9 / 4.6, N=1024 B=8 4.5 / 4.0.
_TORCH_MLP_COMPOSITION_MIN_N = 128


# Triton on CUDA for the dtypes it has kernels for: one fused launch (bias and activation in the epilogue,
# strided weights read in place) against bmm's separate matmul, bias and activation passes. float64 has no
# tensor-core path there, and on CPU Triton is only the interpreter, a test tool: both stay on torch.
# (Expected from the design, not yet measured on a GPU.)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _triton_usable() -> bool:
    return _unavailable_reason("triton") is None


@torch.compiler.assume_constant_result
def _support_reason(name: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    return get_backend(name).check_support(device, dtype)


@torch.compiler.assume_constant_result
def implements(name: str, op: str) -> bool:
    return hasattr(get_backend(name), _OP_METHODS[op])


def runs_as_composition(impl: str, op: str, n: int) -> bool:
    """Whether the op runs as its pure-PyTorch composition under autograd rather than as the custom op: under
    torch.func transforms always (they reject custom ops whose autograd comes from register_autograd,
    pytorch/pytorch#170834, open in torch 2.13), and for the torch backend where the op buys nothing."""
    if torch._C._are_functorch_transforms_active():
        return True
    if impl not in _TORCH_IMPLEMENTATIONS or op == "hyper_linear":
        return False
    return op != "batched_mlp" or n >= _TORCH_MLP_COMPOSITION_MIN_N


@torch.compiler.assume_constant_result
def mlp_keeps_hidden(name: str, single_point: bool) -> bool:
    """Whether the backend's MLP forward should keep per-layer values for its backward (see Backend)."""
    return get_backend(name).mlp_keeps_hidden(single_point)


# The fused MLP kernels take widths up to backends/triton/mlp.py's MAX_WIDTH (a number here, since this module must
# not import triton; tests/test_triton_mlp.py checks that they agree). Wider nets stay on torch.
_TRITON_MLP_MAX_WIDTH = 256


def _auto(*, op, device, dtype, batch, n, k, m, channel_major, widths=()) -> str:
    if op == "hyper_linear":
        return _auto_hyper_linear(device=device, dtype=dtype, n=n)
    if device.type == "cuda" and dtype in _TRITON_DTYPES and _triton_usable() and implements("triton", op):
        if op != "batched_mlp" or max(k, m, *widths) <= _TRITON_MLP_MAX_WIDTH:
            return "triton"
    return _TORCH_FORMULATION


# -- hyper_linear: fused, or generate-then-apply ------------------------------------------------------
# "auto" for hyper_linear may also answer GENERATE: materialise the per-sample weights with one GEMM
# (F.linear(h, head_weight, head_bias)) and run batched_linear on them ("auto" again). The fused op costs N
# times the FLOPs of generating the weights, for N points per sample, and saves writing and reading
# B*out*in weights (and the memory to hold them): it wins for few points per sample. One rule: fused while
# N <= a bound per device kind.
GENERATE = "generate"

# CPU, the torch backend (bench/hyper_crossover.py; 2 shared cores, float32, relu, forward+backward with the
# gradients of h and the head; B, in=out, K from (512, 64, 16) to (32, 256, 128)): at N = 1 fused / generate
# is 0.46-1.17 (a tie on average, at a fraction of the memory); at N = 2 it is 0.74-2.1 and at N = 4 0.9-5.8,
# growing with N. Fused only for N = 1.
_HYPER_FUSED_MAX_N_CPU = 1
# GPU, the Triton kernels: expected by design, NOT MEASURED (no GPU in the session that wrote it). The fused
# GEMM takes ~N * 2*B*out*in*K / peak; generating takes 2*B*out*in*K / peak plus a round trip of B*out*in
# weights (written once, read once: 2 * itemsize bytes each) through memory; so fused wins while
# (N - 1) * K < itemsize * peak / bandwidth, ~600 for bfloat16 on an H100 (~990 TFLOP/s over ~3.3 TB/s): N <= 5 at
# K = 128. Kept as one bound on N until bench/hyper_crossover.py --device cuda measures it.
_HYPER_FUSED_MAX_N_GPU = 4


def _auto_hyper_linear(*, device, dtype, n) -> str:
    if device.type == "cuda" and dtype in _TRITON_DTYPES and _triton_usable() and implements("triton", "hyper_linear"):
        return "triton" if n <= _HYPER_FUSED_MAX_N_GPU else GENERATE
    return _TORCH_FORMULATION if n <= _HYPER_FUSED_MAX_N_CPU else GENERATE


def resolve_backend(
    requested: str, *, op: str, device: torch.device, dtype: torch.dtype, batch: int, n: int, k: int, m: int,
    channel_major: bool = False, widths: tuple = (),
) -> str:
    """Turn the user's ``backend=`` into a concrete implementation name, or raise a clear error. ``widths``: every
    layer width of a batched_mlp (in, hidden..., out)."""
    if not isinstance(requested, str):
        raise TypeError(f"backend: expected a string, one of {list(BACKEND_NAMES)}, got {type(requested).__name__}")
    if requested not in BACKEND_NAMES:
        raise ValueError(f"backend: expected one of {list(BACKEND_NAMES)}, got {requested!r}")
    if batch == 0 or n == 0 or k == 0 or m == 0:
        return "torch_bmm"  # empty problems: bmm handles every empty size and keeps autograd intact
    if requested == "auto":
        return _auto(op=op, device=device, dtype=dtype, batch=batch, n=n, k=k, m=m, channel_major=channel_major,
                     widths=tuple(widths))
    name = _TORCH_FORMULATION if requested == "torch" else requested
    reason = _unavailable_reason(name)
    if reason is not None:
        raise BackendUnavailableError(f"backend={requested!r} is not available: {reason}")
    if not implements(name, op):
        doing = [b for b in _IMPLEMENTATIONS if _unavailable_reason(b) is None and implements(b, op)]
        raise ValueError(f"backend={requested!r} does not implement {op}; available backends that do: {doing}")
    reason = _support_reason(name, device, dtype)
    if reason is not None:
        raise ValueError(f"backend={requested!r} cannot run {op} here: {reason}")
    return name
