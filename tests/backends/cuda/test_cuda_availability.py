"""The cuda backend's availability: whether it can run here and why not, what it supports, which GPU
architectures a build runs on, and how the registry makes it (CI, no GPU needed)."""
from __future__ import annotations

import importlib
import types

import pytest
import torch

import hyperkernels as hk
from cuda_emulator import extension
from hyperkernels._dispatch import available_backends, get_backend
from hyperkernels.backends import cuda as cuda_backend

HAS_GPU = torch.cuda.is_available()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.skipif(HAS_GPU, reason="a GPU is present: the backend's availability is exercised by the GPU tests")
def test_unavailable_here_and_the_reason_names_the_cause():
    reason = available_backends()["cuda"]
    assert reason is not None
    try:
        ext = importlib.import_module("hyperkernels._cuda")
    except ImportError:
        assert "not built" in reason and "pip install" in reason, reason
        return
    assert ext.device_count() == 0
    assert ext.driver_error() in reason, reason  # e.g. cudaErrorInsufficientDriver (error 35): ...
    if torch.version.cuda is None:
        assert "no CUDA support" in reason and torch.__version__ in reason, reason


def test_reason_when_the_extension_is_not_built():
    def fail():
        raise ImportError("No module named 'hyperkernels._cuda'")

    reason = cuda_backend.probe(fail)
    assert "not built" in reason and "No module named" in reason
    assert "pip install -e ." in reason and "HYPERKERNELS_CUDA_ARCH" in reason and "CUDA_HOME" in reason


def test_reason_when_the_extension_is_stale():
    ext = extension()
    old = types.SimpleNamespace(**{k: getattr(ext, k) for k in dir(ext) if not k.startswith("_")})
    del old.linear_backward_workspace_size
    assert "lacks ['linear_backward_workspace_size']" in cuda_backend.probe(lambda: old)
    before_structs = types.SimpleNamespace(**{k: getattr(ext, k) for k in dir(ext) if not k.startswith("_")})
    del before_structs.LinearBackwardArgs  # a build from before the argument structs
    assert "lacks ['LinearBackwardArgs']" in cuda_backend.probe(lambda: before_structs)
    shuffled = types.SimpleNamespace(**{k: getattr(ext, k) for k in dir(ext) if not k.startswith("_")})
    shuffled.ACTIVATIONS = ("none", "gelu", "relu", "silu", "tanh", "sigmoid", "sine")
    assert "activation codes" in cuda_backend.probe(lambda: shuffled)


def test_check_support_rejects_float64_and_non_cuda_tensors():
    backend = get_backend("cuda")
    assert "float64" in backend.check_support(torch.device("cuda", 0), torch.float64)
    assert "backend='torch'" in backend.check_support(torch.device("cuda", 0), torch.float64)
    assert "CUDA device" in backend.check_support(torch.device("cpu"), torch.float32)
    assert "int32" in backend.check_support(torch.device("cuda", 0), torch.int32)
    if backend.unavailable_reason() is not None:  # no GPU: nothing else to ask of the device
        for dtype in DTYPES:
            assert backend.check_support(torch.device("cuda", 0), dtype) is None


@pytest.mark.parametrize("entry, capability, runs", [
    ("80", (8, 0), True), ("80", (8, 6), True), ("80", (9, 0), True), ("80-real", (9, 0), False),
    ("80-virtual", (8, 0), True), ("90", (8, 9), False), ("90", (10, 0), True), ("90-real", (10, 0), False),
    ("90a", (9, 0), True), ("90a", (10, 0), False), ("100f", (10, 3), True), ("100f", (12, 0), False),
    ("120", (12, 1), True), ("native", (9, 0), None), ("all-major", (9, 0), None),
], ids=lambda v: f"cc{v[0]}.{v[1]}" if isinstance(v, tuple) else str(v))
def test_architecture_compatibility(entry, capability, runs):
    assert cuda_backend.arch_runs_on(entry, capability) is runs


@pytest.mark.skipif(HAS_GPU, reason="a GPU is present: the op runs there")
def test_batched_linear_with_backend_cuda_raises_unavailable_here():
    x, w = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    with pytest.raises(hk.BackendUnavailableError, match=r"backend='cuda' is not available: .+"):
        hk.batched_linear(x, w, backend="cuda")
    with pytest.raises(hk.BackendUnavailableError, match="backend='cuda'"):
        hk.batched_conv1x1(torch.randn(2, 4, 3, 3), w, backend="cuda")


def test_make_backend_takes_the_registrys_none_and_nothing_else():
    assert isinstance(cuda_backend.make_backend(None), cuda_backend.CudaBackend)
    assert isinstance(get_backend("cuda"), cuda_backend.CudaBackend)  # the registry's own call
    with pytest.raises(ValueError, match=r"^variant: the cuda backend has one formulation .* got 'bmm'"):
        cuda_backend.make_backend("bmm")
