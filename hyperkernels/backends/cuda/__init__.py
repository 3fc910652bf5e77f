"""The CUDA C++ backend: thin wrappers over the pybind11 module ``hyperkernels._cuda`` (``csrc/``).

The module is built at install time where nvcc is found (``setup.py``, ``CMakeLists.txt``); it does not link
libtorch, so the wrappers in ``linear.py`` pass it ``data_ptr()`` values, sizes, strides and torch's current
stream. This file answers whether it can run here (``unavailable_reason``) and on what (``check_support``);
importing it never imports the extension, so ``import hyperkernels`` works where the extension is absent and
the reason can be reported instead.
"""
from __future__ import annotations

import functools
import importlib
import re
from typing import Callable, Optional

import torch

from ...activations import ACTIVATIONS

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# What a build of csrc/ must export for the wrappers in linear.py: a module missing one of these is older than
# this package.
_REQUIRED = (
    "linear_forward", "linear_backward", "linear_backward_workspace_size", "LinearForwardArgs",
    "LinearBackwardArgs", "device_count", "driver_error", "driver_version", "CUDART_VERSION", "CUDA_ARCHS",
    "DTYPE_FLOAT32", "DTYPE_FLOAT16", "DTYPE_BFLOAT16", "ACTIVATIONS",
)

_HOW_TO_BUILD = (
    "it is built at install time when nvcc is found: reinstall from the repository with the CUDA toolkit "
    "present, `pip install -e .` (or `pip install .`); setup.py finds nvcc through CUDACXX, CUDA_HOME or PATH, "
    "builds the architectures in HYPERKERNELS_CUDA_ARCH (default 80;90) and skips the extension when "
    "HYPERKERNELS_NO_CUDA=1"
)


def _import_extension():
    return importlib.import_module("hyperkernels._cuda")


def _version_text(v: int) -> str:
    """13000 -> '13.0' (CUDA's encoding: 1000 * major + 10 * minor)."""
    return f"{v // 1000}.{(v % 1000) // 10}"


def probe(import_extension: Callable[[], object] = _import_extension) -> Optional[str]:
    """None when the backend can run in this process, else every reason it cannot, and how to fix it.
    (Uncached; ``unavailable_reason`` caches it. ``import_extension`` is a seam for tests.)"""
    try:
        ext = import_extension()
    except ImportError as exc:
        return f"the CUDA extension hyperkernels._cuda is not built (importing it failed: {exc}); {_HOW_TO_BUILD}"
    missing = [name for name in _REQUIRED if not hasattr(ext, name)]
    if missing:
        return (f"hyperkernels._cuda ({getattr(ext, '__file__', '?')}) is older than this package: it lacks "
                f"{missing}; rebuild it: {_HOW_TO_BUILD}")
    for act in ACTIVATIONS.values():
        names = tuple(ext.ACTIVATIONS)
        if act.code >= len(names) or names[act.code] != act.name:
            return (f"hyperkernels._cuda's activation codes {names} do not match hyperkernels.activations "
                    f"({act.name!r} is code {act.code}): the extension is stale; rebuild it: {_HOW_TO_BUILD}")
    problems = []
    if ext.device_count() == 0:
        driver = ext.driver_version()
        runtime = _version_text(ext.CUDART_VERSION)
        if driver == 0:
            detail = f"no NVIDIA driver is installed; the extension was built with CUDA runtime {runtime}"
        else:
            detail = f"the driver supports CUDA {_version_text(driver)}, the extension was built with CUDA {runtime}"
        problems.append(f"no usable CUDA device: {ext.driver_error()} ({detail})")
    if torch.version.cuda is None:
        problems.append(f"this torch build ({torch.__version__}) has no CUDA support: install a CUDA build of torch")
    elif not problems and not torch.cuda.is_available():
        problems.append("torch sees no CUDA device (torch.cuda.is_available() is False) although the CUDA "
                        "runtime of hyperkernels._cuda sees one: check CUDA_VISIBLE_DEVICES and torch's CUDA version")
    return "; ".join(problems) or None


_UNSET = object()
_reason = _UNSET


def unavailable_reason() -> Optional[str]:
    """``probe()``, computed once per process (dispatch asks on every call, also during CUDA graph capture)."""
    global _reason
    if _reason is _UNSET:
        _reason = probe()
    return _reason


# -- GPU architectures ------------------------------------------------------------------------------

# One entry of CMAKE_CUDA_ARCHITECTURES as the module reports it in CUDA_ARCHS ("80,90", "90a", "80-real", ...):
# digits (major then one minor digit), an optional arch-specific 'a' / family 'f' suffix, -real / -virtual.
_ARCH = re.compile(r"^(\d+)(\d)([af]?)(?:-(real|virtual))?$")


def arch_runs_on(entry: str, capability: tuple[int, int]) -> Optional[bool]:
    """Whether code built for one CMake architecture entry runs on a GPU of this compute capability;
    None when the entry cannot be judged ("native", "all", ...).

    A plain entry "XY" embeds SASS for sm_XY and PTX for compute_XY. SASS runs on the same major version with
    an equal or newer minor; PTX is compiled by the driver for any newer GPU. Arch-specific builds ("90a") run
    only on exactly that GPU; family builds ("100f") on that major version."""
    m = _ARCH.match(entry.strip())
    if m is None:
        return None
    major, minor, suffix, kind = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
    if suffix == "a":
        return capability == (major, minor)
    sass = kind != "virtual" and capability[0] == major and capability[1] >= minor
    ptx = kind != "real" and suffix == "" and capability >= (major, minor)
    return sass or ptx


@functools.lru_cache(maxsize=None)
def _arch_problem(index: int) -> Optional[str]:
    """Why the built kernels cannot run on CUDA device ``index``, or None."""
    try:
        ext = _import_extension()
        capability = tuple(torch.cuda.get_device_capability(index))
        name = torch.cuda.get_device_name(index)
    except Exception:  # cannot tell: let the launch report it (every launch is checked)
        return None
    if capability < (8, 0):
        return (f"the CUDA kernels need compute capability 8.0 or newer (bfloat16 and TF32 tensor cores); "
                f"cuda:{index} ({name}) is {capability[0]}.{capability[1]}; use backend='triton' or 'torch'")
    entries = [e for e in str(ext.CUDA_ARCHS).replace(";", ",").split(",") if e.strip()]
    verdicts = [arch_runs_on(e, capability) for e in entries]
    if any(v is None or v for v in verdicts):
        return None
    return (f"hyperkernels._cuda was built for CUDA architectures {ext.CUDA_ARCHS}, none of which runs on "
            f"cuda:{index} ({name}, compute capability {capability[0]}.{capability[1]}): rebuild it with "
            f"HYPERKERNELS_CUDA_ARCH={capability[0]}{capability[1]} pip install -e .")


class CudaBackend:
    name = "cuda"

    def unavailable_reason(self) -> Optional[str]:
        return unavailable_reason()

    def check_support(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        if dtype == torch.float64:
            return ("float64 is not supported by the CUDA kernels (they compute in float32); use backend='torch' "
                    "for float64")
        if dtype not in _DTYPES:
            return f"supported dtypes are {list(_DTYPES)}, got {dtype}"
        if device.type != "cuda":
            return (f"the CUDA kernels need tensors on a CUDA device, got device {str(device)!r}; use "
                    f"backend='torch' for {device.type} tensors")
        if unavailable_reason() is None:
            index = device.index if device.index is not None else torch.cuda.current_device()
            return _arch_problem(index)
        return None

    def linear_forward(self, x, weight, bias, act, w0, channel_major, save_preact):
        from . import linear

        return linear.linear_forward(x, weight, bias, act, w0, channel_major, save_preact)

    def linear_backward(self, grad_y, x, weight, bias, y, preact, act, w0, channel_major, output_mask):
        from . import linear

        return linear.linear_backward(grad_y, x, weight, bias, y, preact, act, w0, channel_major, output_mask)


def make_backend(variant: None = None) -> CudaBackend:
    """The backend object. The CUDA kernels have one formulation, so the registry's variant for "cuda" is None
    (``_dispatch._IMPLEMENTATIONS``); any other value is a registry error."""
    if variant is not None:
        raise ValueError(f"variant: the cuda backend has one formulation and takes variant=None, got {variant!r}")
    return CudaBackend()
