"""A CPU stand-in for the extension ``hyperkernels._cuda``, and the fixtures that run the cuda backend through it.

``KernelEmulator`` has the extension's launch functions and codes. It takes the real argument structs (built by
the wrappers with the real classes, so a missing or misspelt field fails as it would on a GPU), reads and writes
the tensors' memory through the raw pointers, sizes and strides it is given, computes in float64, and asserts the
caller contract of ``csrc/batched_linear.h`` that the real launchers cannot check themselves (outputs disjoint
from inputs, the preact where the derivative needs it, the dz scratch, the workspace's size and alignment).

Used by the test files of this folder as ``from cuda_emulator import ...``; the fixtures are imported into the
test modules that use them.
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib
import os

import pytest
import torch

from hyperkernels.activations import ACTIVATIONS
from hyperkernels.backends.cuda import linear as cuda_linear
from reference import REFERENCE_ACTIVATIONS

REQUIRED = os.environ.get("HYPERKERNELS_REQUIRE_CUDA_BUILD") == "1"
STREAM = 0x5EED  # the stream the emulated launches must be given (cpu_launch_env)

_TORCH_DTYPES = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16}


def extension():
    """The real module; skips where it was not built, fails instead under HYPERKERNELS_REQUIRE_CUDA_BUILD=1
    (CI sets it where nvcc exists, so a broken build cannot pass as a skip)."""
    try:
        return importlib.import_module("hyperkernels._cuda")
    except ImportError as exc:
        if REQUIRED:
            pytest.fail(f"HYPERKERNELS_REQUIRE_CUDA_BUILD=1 but hyperkernels._cuda did not import: {exc}")
        pytest.skip(f"hyperkernels._cuda was not built here (no nvcc at install time?): {exc}")


def fields(args) -> dict:
    """An argument struct as a dict, every field by name."""
    return {name: getattr(args, name) for name in type(args).FIELDS}


def _raw(ptr, sizes, strides, dtype):
    """The tensor at a raw CPU address, through ctypes: shares the memory (writes land in the caller's tensor)."""
    assert all(s >= 0 for s in strides), f"negative stride {strides}"
    if any(s == 0 for s in sizes):
        return torch.empty(sizes, dtype=dtype)
    assert ptr != 0, "null pointer for a non-empty tensor"
    elem = torch.finfo(dtype).bits // 8
    assert ptr % elem == 0, "pointer not aligned to its element size"
    extent = 1 + sum((n - 1) * s for n, s in zip(sizes, strides))
    buf = (ctypes.c_char * (extent * elem)).from_address(ptr)
    return torch.frombuffer(buf, dtype=dtype, count=extent).as_strided(sizes, strides)


def _span(t):
    """[first byte, end) of the memory a view addresses."""
    if t is None or t.numel() == 0:
        return None
    extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return (t.data_ptr(), t.data_ptr() + extent * t.element_size())


def _assert_disjoint(outputs: dict, inputs: dict):
    """The contract: outputs overlap neither each other nor any input."""
    spans = {k: _span(v) for k, v in {**outputs, **inputs}.items()}
    names = list(outputs) + list(inputs)
    for i, a in enumerate(outputs):
        for b in names[i + 1 :]:
            sa, sb = spans[a], spans[b]
            if sa and sb:
                assert sa[1] <= sb[0] or sb[1] <= sa[0], f"output {a} overlaps {b}"


class KernelEmulator:
    """The extension's launch functions on CPU memory (see the module docstring). ``calls`` records every launch
    as ``(kind, fields)``, kind "forward" or "backward"."""

    def __init__(self, real):
        self.real = real
        for name in dir(real):
            if name.isupper() or name in ("ACTIVATIONS", "LinearForwardArgs", "LinearBackwardArgs"):
                setattr(self, name, getattr(real, name))
        self.calls = []

    def linear_backward_workspace_size(self, B, N, M, K, need_dw, need_db):
        return self.real.linear_backward_workspace_size(B=B, N=N, M=M, K=K, need_dw=need_dw, need_db=need_db)

    def _common(self, a, cls):
        assert isinstance(a, cls), f"expected a {cls.__name__}, got {type(a).__name__}"
        assert a.dtype in _TORCH_DTYPES and 0 <= a.act < len(self.ACTIVATIONS)
        assert min(a.B, a.N, a.M, a.K) > 0, "dispatch sends empty problems to the torch backend, never here"
        return _TORCH_DTYPES[a.dtype], self.ACTIVATIONS[a.act]

    def linear_forward(self, a):
        self.calls.append(("forward", fields(a)))
        dt, name = self._common(a, self.LinearForwardArgs)
        X = _raw(a.x, (a.B, a.N, a.K), (a.sxb, a.sxn, a.sxk), dt)
        W = _raw(a.w, (a.B, a.M, a.K), (a.swb, a.swm, a.swk), dt)
        Bi = _raw(a.bias, (a.B, a.M), (a.sbb, a.sbm), dt) if a.bias else None
        Y = _raw(a.y, (a.B, a.N, a.M), (a.syb, a.syn, a.sym), dt)
        Z = _raw(a.preact, (a.B, a.N, a.M), (a.syb, a.syn, a.sym), dt) if a.preact else None
        _assert_disjoint({"y": Y, "preact": Z}, {"x": X, "w": W, "bias": Bi})
        z = torch.einsum("bnk,bmk->bnm", X.double(), W.double())
        if Bi is not None:
            z = z + Bi.double()[:, None, :]
        if Z is not None:
            Z.copy_(z)
        Y.copy_(REFERENCE_ACTIVATIONS[name](z, a.w0))

    def linear_backward(self, a):
        self.calls.append(("backward", fields(a)))
        dt, name = self._common(a, self.LinearBackwardArgs)
        B, N, M, K = a.B, a.N, a.M, a.K
        need_dx, need_dw, need_db = a.dx != 0, a.dw != 0, a.db != 0
        assert need_dx or need_dw or need_db, "a launch that computes nothing"
        if name != "none":
            assert a.saved, f"act {name} needs `saved`"
            assert a.saved_is_preact or not ACTIVATIONS[name].needs_preactivation, f"act {name} needs the preact"
            assert a.dz or not (need_dx or need_dw), "the dz scratch is missing"
        required = self.real.linear_backward_workspace_size(B=B, N=N, M=M, K=K, need_dw=need_dw, need_db=need_db)
        if required:
            assert a.workspace and a.workspace % 16 == 0 and a.workspace_bytes >= required, (
                a.workspace, a.workspace_bytes, required)
        X = _raw(a.x, (B, N, K), (a.sxb, a.sxn, a.sxk), dt)
        W = _raw(a.w, (B, M, K), (a.swb, a.swm, a.swk), dt)
        G = _raw(a.dy, (B, N, M), (a.sdyb, a.sdyn, a.sdym), dt)
        S = _raw(a.saved, (B, N, M), (a.ssb, a.ssn, a.ssm), dt) if a.saved else None
        DZ = _raw(a.dz, (B, N, M), (a.sdzb, a.sdzn, a.sdzm), dt) if a.dz else None
        DX = _raw(a.dx, (B, N, K), (a.sdxb, a.sdxn, a.sdxk), dt) if need_dx else None
        DW = _raw(a.dw, (B, M, K), (a.sdwb, a.sdwm, a.sdwk), dt) if need_dw else None
        DB = _raw(a.db, (B, M), (a.sdbb, a.sdbm), dt) if need_db else None
        WS = _raw(a.workspace, (a.workspace_bytes // 4,), (1,), torch.float32) if a.workspace else None
        _assert_disjoint({"dz": DZ, "dx": DX, "dw": DW, "db": DB, "workspace": WS},
                         {"x": X, "w": W, "dy": G, "saved": S})
        g = G.double()
        if name != "none":
            s = S.double()
            if a.saved_is_preact:  # central difference of the reference activation (a custom op runs without
                f = REFERENCE_ACTIVATIONS[name]  # autograd below it), accurate to ~1e-10 in float64
                deriv = (f(s + 1e-5, a.w0) - f(s - 1e-5, a.w0)) / 2e-5
            else:
                deriv = {"relu": lambda v: (v > 0).double(), "tanh": lambda v: 1 - v * v,
                         "sigmoid": lambda v: v * (1 - v)}[name](s)
            g = g * deriv
        if DZ is not None:
            DZ.copy_(g)
        g_used = DZ.double() if DZ is not None else g  # the GEMMs read dz back in the storage dtype, like the kernels
        if DB is not None:
            DB.copy_(g.sum(1))
        if DX is not None:
            DX.copy_(torch.einsum("bnm,bmk->bnk", g_used, W.double()))
        if DW is not None:
            DW.copy_(torch.einsum("bnm,bnk->bmk", g_used, X.double()))


@pytest.fixture
def cpu_launch_env(monkeypatch):
    """Lets CPU tensors reach the launch: no CUDA-device check, no device switch, a recognisable stream."""
    monkeypatch.setattr(cuda_linear, "_require_cuda", lambda x: None)
    monkeypatch.setattr(cuda_linear, "_launch_env", lambda device: (contextlib.nullcontext(), STREAM))


@pytest.fixture
def emulated(monkeypatch, cpu_launch_env):
    """The cuda backend on CPU tensors, its launches emulated (see KernelEmulator); yields the emulator."""
    emulator = KernelEmulator(extension())
    monkeypatch.setattr(cuda_linear, "_ext", lambda: emulator)
    yield emulator
