"""The cuda backend (hyperkernels/backends/cuda over the extension hyperkernels._cuda built from csrc/).

Three groups:

* CI, no GPU: availability and its reasons, support checks, validation before any launch, and the argument
  mapping of the wrappers: against the real extension's signatures and argument checks (every call must get
  past them to the CUDA runtime, which cannot start without a driver), and end to end through a CPU emulator
  of the extension that reads and writes the tensors' memory through the raw pointers, sizes and strides it is
  given and enforces the caller contract of csrc/batched_linear.h.
* GPU: real sizes against float64 references (forward and every gradient, per-dtype tolerances), TF32 on and
  off, the channel-major conv layout, misaligned views, a non-default stream, a second device, CUDA graph
  capture, a batch of 2^20 and problems past 2^31 elements, and compute-sanitizer runs of
  tests/gpu/sanitize_cuda.py. They skip on CPU with the reason "needs a CUDA GPU".
* The generic suites (test_linear.py, test_ops.py) also run the cuda backend wherever it is available.
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib
import inspect
import math
import os
import re
import shutil
import subprocess
import sys
import types

import pytest
import torch

import hyperkernels as hk
from hyperkernels._dispatch import available_backends, get_backend
from hyperkernels.activations import ACTIVATIONS, get_activation
from hyperkernels.backends import cuda as cuda_backend
from hyperkernels.backends.cuda import linear as cuda_linear
from hyperkernels.ops import batched_linear_backward_op, batched_linear_op
from reference import (FORWARD_RTOL, GRAD_RTOL, REFERENCE_ACTIVATIONS, assert_close, conv1x1_reference,
                       linear_reference)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = os.environ.get("HYPERKERNELS_REQUIRE_CUDA_BUILD") == "1"
HAS_GPU = torch.cuda.is_available()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ACTS = list(ACTIVATIONS)


def _extension():
    try:
        return importlib.import_module("hyperkernels._cuda")
    except ImportError as exc:
        if REQUIRED:
            pytest.fail(f"HYPERKERNELS_REQUIRE_CUDA_BUILD=1 but hyperkernels._cuda did not import: {exc}")
        pytest.skip(f"hyperkernels._cuda was not built here (no nvcc at install time?): {exc}")


# ============================================================================================================
# CI: availability and support
# ============================================================================================================

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
    ext = _extension()
    old = types.SimpleNamespace(**{k: getattr(ext, k) for k in dir(ext) if not k.startswith("_")})
    del old.linear_backward_workspace_size
    assert "lacks ['linear_backward_workspace_size']" in cuda_backend.probe(lambda: old)
    shuffled = types.SimpleNamespace(**{k: getattr(ext, k) for k in dir(ext) if not k.startswith("_")})
    shuffled.ACTIVATIONS = ("none", "gelu", "relu", "silu", "tanh", "sigmoid", "sine")
    assert "activation codes" in cuda_backend.probe(lambda: shuffled)


def test_extension_codes_match_the_python_tables():
    ext = _extension()
    for name, act in ACTIVATIONS.items():
        assert ext.ACTIVATIONS[act.code] == name
        assert getattr(ext, f"ACT_{name.upper()}") == act.code
    assert {ext.DTYPE_FLOAT32, ext.DTYPE_FLOAT16, ext.DTYPE_BFLOAT16} == {0, 1, 2}
    assert cuda_linear._dtype_code(ext, torch.bfloat16) == ext.DTYPE_BFLOAT16


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


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"),
                    reason="this torch has only the legacy TF32 flag (fp32_precision came with torch 2.9)")
def test_allow_tf32_follows_both_torch_apis():
    """Read in a fresh process: once the new API is used, torch's legacy getter raises for good."""
    code = (
        "import torch\n"
        "from hyperkernels.backends.cuda.linear import allow_tf32\n"
        "m = torch.backends.cuda.matmul\n"
        "seen = [allow_tf32()]\n"
        "m.allow_tf32 = True; seen.append(allow_tf32())\n"
        "m.allow_tf32 = False; seen.append(allow_tf32())\n"
        "m.fp32_precision = 'tf32'; seen.append(allow_tf32())\n"
        "m.fp32_precision = 'ieee'; seen.append(allow_tf32())\n"
        "print(seen)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[False, True, False, True, False]"


# ============================================================================================================
# CI: validation before any launch
# ============================================================================================================

class _NoLaunch:
    """Stands in for the extension where no launch may happen: any attribute access fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"the wrapper reached the extension ({name}) although the arguments are invalid")


@pytest.fixture
def no_launch(monkeypatch):
    monkeypatch.setattr(cuda_linear, "_ext", lambda: _NoLaunch())


def _args(batch=2, n=3, k=4, m=5, dtype=torch.float32, device="cpu"):
    x = torch.randn(batch, n, k, dtype=dtype, device=device)
    w = torch.randn(batch, m, k, dtype=dtype, device=device)
    b = torch.randn(batch, m, dtype=dtype, device=device)
    return x, w, b


def test_backend_rejects_cpu_tensors_before_any_launch(no_launch):
    backend = get_backend("cuda")
    x, w, b = _args()
    relu = get_activation("relu")
    with pytest.raises(ValueError, match=r"^x: .*CUDA device.*cpu"):
        backend.linear_forward(x, w, b, relu, 1.0, False, False)
    y = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match=r"^x: .*CUDA device"):
        backend.linear_backward(y, x, w, b, y, y.new_empty(0), relu, 1.0, False, (True, True, True))


@pytest.mark.parametrize("bad, error, pattern", [
    ("weight_device", ValueError, r"^weight: expected device cpu \(the device of x\), got meta"),
    ("bias_device", ValueError, r"^bias: expected device cpu \(the device of x\), got meta"),
    ("weight_type", TypeError, r"^weight: expected a Tensor"),
    ("x_ndim", ValueError, r"^x: expected a 3-D tensor"),
    ("weight_shape", ValueError, r"^weight: expected shape \(2, out, 4\)"),
    ("bias_shape", ValueError, r"^bias: expected shape \(2, 5\)"),
])
def test_forward_argument_errors_name_the_argument(no_launch, bad, error, pattern):
    x, w, b = _args()
    if bad == "weight_device":
        w = w.to("meta")
    elif bad == "bias_device":
        b = b.to("meta")
    elif bad == "weight_type":
        w = w.tolist()
    elif bad == "x_ndim":
        x = x[:, 0]
    elif bad == "weight_shape":
        w = w[:, :, :3]
    elif bad == "bias_shape":
        b = b[:, :4]
    with pytest.raises(error, match=pattern):
        get_backend("cuda").linear_forward(x, w, b, get_activation("gelu"), 1.0, False, True)


@pytest.mark.parametrize("bad, error, pattern", [
    ("dtype_float64", TypeError, r"^x: the cuda backend supports dtypes .* got torch.float64 \(float64 runs on backend='torch'\)"),
    ("weight_dtype", TypeError, r"^weight: expected dtype torch.float16 \(the dtype of x\), got torch.float32"),
    ("grad_dtype", TypeError, r"^grad_y: expected dtype torch.float16"),
    ("grad_shape", ValueError, r"^grad_y: expected shape \(2, 3, 5\)"),
    ("grad_device", ValueError, r"^grad_y: expected device cpu"),
    ("preact_shape", ValueError, r"^preact: expected shape \(2, 3, 5\)"),
])
def test_dtype_and_backward_argument_errors(monkeypatch, no_launch, bad, error, pattern):
    """With the CUDA-device check switched off, the checks after it (all before any launch) are reachable on CPU."""
    monkeypatch.setattr(cuda_linear, "_require_cuda", lambda x: None)
    x, w, b = _args(dtype=torch.float64 if bad == "dtype_float64" else torch.float16)
    g = torch.randn(2, 3, 5, dtype=x.dtype)
    preact = g.new_empty(0)
    if bad == "weight_dtype":
        w = w.float()
    elif bad == "grad_dtype":
        g = g.float()
    elif bad == "grad_shape":
        g = g[:, :2]
    elif bad == "grad_device":
        g = g.to("meta")
    elif bad == "preact_shape":
        preact = torch.randn(2, 3, 4, dtype=x.dtype)
    with pytest.raises(error, match=pattern):
        get_backend("cuda").linear_backward(g, x, w, b, g, preact, get_activation("gelu"), 1.0, False,
                                            (True, True, True))


# ============================================================================================================
# CI: the wrappers' calls against the real extension
# ============================================================================================================

def _pybind_parameters(fn) -> list[str]:
    """Parameter names from a pybind11 function's signature line, e.g. 'f(a: int, b: bool) -> None'."""
    head = fn.__doc__.splitlines()[0]
    inside = head[head.index("(") + 1 : head.rindex(")")]
    return [p.split(":")[0].strip() for p in re.split(r",\s*(?=\w+:)", inside)]


@pytest.fixture
def cpu_launch_env(monkeypatch):
    """Lets CPU tensors reach the launch: no CUDA-device check, no device switch, a recognisable stream."""
    monkeypatch.setattr(cuda_linear, "_require_cuda", lambda x: None)
    monkeypatch.setattr(cuda_linear, "_launch_env", lambda device: (contextlib.nullcontext(), 0x5EED))


def _calls_that_reach_the_runtime():
    """(name, thunk) pairs covering every launch the wrappers make: forward with / without preact and bias, the
    channel-major layout, strided and shared views, the shared-weight fold, and backward with every
    activation kind, a workspace (split reductions), and output-mask subsets."""
    lin = cuda_linear
    gelu, relu, none = (get_activation(a) for a in ("gelu", "relu", "none"))

    def fwd(batch, n, k, m, act, cm=False, keep=True, shared=False, bias=True, dtype=torch.float32):
        x = torch.randn(batch, k, n, dtype=dtype) if cm else torch.randn(batch, n, k, dtype=dtype)
        w = torch.randn(1, m, k, dtype=dtype).expand(batch, m, k) if shared else torch.randn(batch, m, k, dtype=dtype)
        b = torch.randn(batch, m, dtype=dtype) if bias else None
        return lambda: lin.linear_forward(x, w, b, act, 2.0, cm, keep)

    def bwd(batch, n, k, m, act, cm=False, mask=(True, True, True), preact=True, shared=False, dtype=torch.float32):
        x = torch.randn(batch, k, n, dtype=dtype) if cm else torch.randn(batch, n, k, dtype=dtype)
        w = torch.randn(1, m, k, dtype=dtype).expand(batch, m, k) if shared else torch.randn(batch, m, k, dtype=dtype)
        shape = (batch, m, n) if cm else (batch, n, m)
        g, y = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
        z = torch.randn(shape, dtype=dtype) if preact else y.new_empty(0)
        return lambda: lin.linear_backward(g, x, w, torch.randn(batch, m, dtype=dtype), y, z, act, 2.0, cm, mask)

    return [
        ("forward_gemv_gelu_keep", fwd(3, 1, 8, 5, gelu)),
        ("forward_gemm_relu", fwd(3, 7, 8, 5, relu, keep=False, dtype=torch.bfloat16)),
        ("forward_channel_major", fwd(2, 9, 4, 6, gelu, cm=True, dtype=torch.float16)),
        ("forward_shared_fold_no_bias", fwd(4, 1, 8, 5, relu, shared=True, bias=False)),
        ("backward_gelu_with_preact", bwd(3, 7, 8, 5, gelu)),
        ("backward_relu_from_y", bwd(3, 7, 8, 5, relu, dtype=torch.bfloat16)),
        ("backward_none", bwd(3, 1, 8, 5, none)),
        ("backward_split_workspace", bwd(1, 300, 40, 40, gelu)),
        ("backward_channel_major_split", bwd(1, 300, 24, 20, relu, cm=True, dtype=torch.float16)),
        ("backward_only_db", bwd(3, 7, 8, 5, gelu, mask=(False, False, True))),
        ("backward_only_dw", bwd(3, 7, 8, 5, relu, mask=(False, True, False))),
        ("backward_shared_fold_dx", bwd(4, 1, 8, 5, relu, mask=(True, False, False), shared=True)),
    ]


_CALLS = _calls_that_reach_the_runtime()


def test_wrapper_keywords_match_the_pybind_signatures():
    ext = _extension()
    for fn_name in ("linear_forward", "linear_backward", "linear_backward_workspace_size"):
        real = _pybind_parameters(getattr(ext, fn_name))
        emulated = list(inspect.signature(getattr(KernelEmulator, fn_name)).parameters)[1:]
        assert emulated == real, fn_name
    source = inspect.getsource(cuda_linear)
    for fn_name in ("linear_forward", "linear_backward", "linear_backward_workspace_size"):
        call = source[source.index(f"ext.{fn_name}(") :]
        call = call[: call.index(")\n") + 1]
        passed = re.findall(r"(\w+)=", call)
        assert passed == _pybind_parameters(getattr(ext, fn_name)), f"ext.{fn_name}: keywords out of order"


@pytest.mark.parametrize("name, call", _CALLS, ids=[c[0] for c in _CALLS])
def test_every_call_gets_past_the_extensions_argument_checks(cpu_launch_env, name, call):
    """CPU pointers go to the real extension: it checks codes, sizes, null pointers, dz and the workspace size
    (ValueError), then asks the CUDA runtime, which cannot start without a driver. Reaching that error proves
    the call matched the pybind signature and the launcher's argument checks."""
    ext = _extension()
    if ext.device_count() > 0:
        pytest.skip("a CUDA device is present: these CPU pointers would really be launched on")
    with pytest.raises(RuntimeError, match=r"CUDA reported an error before linear_(forward|backward) launched"):
        call()


# ============================================================================================================
# CI: the wrappers end to end through a CPU emulator of the extension
# ============================================================================================================

_TORCH_DTYPES = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16}


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
    """A CPU stand-in for hyperkernels._cuda: the same functions and keyword names (checked against the real
    module), computing in float64 through the raw pointers and strides, and asserting the caller contract of
    csrc/batched_linear.h that the real launchers cannot check themselves."""

    def __init__(self, real):
        self.real = real
        for name in dir(real):
            if name.isupper() or name == "ACTIVATIONS":
                setattr(self, name, getattr(real, name))
        self.calls = []

    def linear_backward_workspace_size(self, B, N, M, K, need_dw, need_db):
        return self.real.linear_backward_workspace_size(B=B, N=N, M=M, K=K, need_dw=need_dw, need_db=need_db)

    def _common(self, dtype, act, w0, allow_tf32, B, N, M, K):
        assert dtype in _TORCH_DTYPES and 0 <= act < len(self.ACTIVATIONS)
        assert isinstance(w0, float) and isinstance(allow_tf32, bool)
        assert min(B, N, M, K) > 0, "the wrappers send empty problems to the torch backend"
        return _TORCH_DTYPES[dtype], self.ACTIVATIONS[act]

    def linear_forward(self, dtype, act, w0, allow_tf32, B, N, M, K, x, sxb, sxn, sxk, w, swb, swm, swk, bias,
                       sbb, sbm, y, syb, syn, sym, preact, stream):
        args = dict(locals())
        del args["self"]
        self.calls.append(("forward", args))
        dt, name = self._common(dtype, act, w0, allow_tf32, B, N, M, K)
        X = _raw(x, (B, N, K), (sxb, sxn, sxk), dt)
        W = _raw(w, (B, M, K), (swb, swm, swk), dt)
        Bi = _raw(bias, (B, M), (sbb, sbm), dt) if bias else None
        Y = _raw(y, (B, N, M), (syb, syn, sym), dt)
        Z = _raw(preact, (B, N, M), (syb, syn, sym), dt) if preact else None
        _assert_disjoint({"y": Y, "preact": Z}, {"x": X, "w": W, "bias": Bi})
        z = torch.einsum("bnk,bmk->bnm", X.double(), W.double())
        if Bi is not None:
            z = z + Bi.double()[:, None, :]
        if Z is not None:
            Z.copy_(z)
        Y.copy_(REFERENCE_ACTIVATIONS[name](z, w0))

    def linear_backward(self, dtype, act, w0, allow_tf32, B, N, M, K, x, sxb, sxn, sxk, w, swb, swm, swk, dy, sdyb,
                        sdyn, sdym, saved, ssb, ssn, ssm, saved_is_preact, dz, sdzb, sdzn, sdzm, dx, sdxb, sdxn,
                        sdxk, dw, sdwb, sdwm, sdwk, db, sdbb, sdbm, workspace, workspace_bytes, stream):
        args = dict(locals())
        del args["self"]
        self.calls.append(("backward", args))
        dt, name = self._common(dtype, act, w0, allow_tf32, B, N, M, K)
        need_dx, need_dw, need_db = dx != 0, dw != 0, db != 0
        assert need_dx or need_dw or need_db, "a launch that computes nothing"
        if name != "none":
            assert saved, f"act {name} needs `saved`"
            assert saved_is_preact or not ACTIVATIONS[name].needs_preactivation, f"act {name} needs the preact"
            assert dz or not (need_dx or need_dw), "the dz scratch is missing"
        required = self.real.linear_backward_workspace_size(B=B, N=N, M=M, K=K, need_dw=need_dw, need_db=need_db)
        if required:
            assert workspace and workspace % 16 == 0 and workspace_bytes >= required, (workspace, workspace_bytes, required)
        X = _raw(x, (B, N, K), (sxb, sxn, sxk), dt)
        W = _raw(w, (B, M, K), (swb, swm, swk), dt)
        G = _raw(dy, (B, N, M), (sdyb, sdyn, sdym), dt)
        S = _raw(saved, (B, N, M), (ssb, ssn, ssm), dt) if saved else None
        DZ = _raw(dz, (B, N, M), (sdzb, sdzn, sdzm), dt) if dz else None
        DX = _raw(dx, (B, N, K), (sdxb, sdxn, sdxk), dt) if need_dx else None
        DW = _raw(dw, (B, M, K), (sdwb, sdwm, sdwk), dt) if need_dw else None
        DB = _raw(db, (B, M), (sdbb, sdbm), dt) if need_db else None
        WS = _raw(workspace, (workspace_bytes // 4,), (1,), torch.float32) if workspace else None
        _assert_disjoint({"dz": DZ, "dx": DX, "dw": DW, "db": DB, "workspace": WS},
                         {"x": X, "w": W, "dy": G, "saved": S})
        g = G.double()
        if name != "none":
            s = S.double()
            if saved_is_preact:  # central difference of the reference activation (a custom op runs without
                f = REFERENCE_ACTIVATIONS[name]  # autograd below it), accurate to ~1e-10 in float64
                deriv = (f(s + 1e-5, w0) - f(s - 1e-5, w0)) / 2e-5
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
def emulated(monkeypatch, cpu_launch_env):
    """The cuda backend on CPU tensors, its launches emulated (see KernelEmulator); yields the emulator."""
    emulator = KernelEmulator(_extension())
    monkeypatch.setattr(cuda_linear, "_ext", lambda: emulator)
    yield emulator


def _weight_and_bias(kind, batch, m, k, has_bias, dtype):
    """float64 leaves and a function deriving (weight, bias) views from them, like a hypernetwork's output."""
    leaves = {}
    if kind == "flat_odd":  # a view at an odd offset of a flat (B, P) buffer: not 16-byte aligned
        leaves["flat"] = torch.randn(batch, 1 + m * k + m + 2, dtype=torch.float64) / math.sqrt(k)
    elif kind == "shared":
        leaves["weight"] = torch.randn(1, m, k, dtype=torch.float64) / math.sqrt(k)
    elif kind == "transposed":
        leaves["weight"] = torch.randn(batch, k, m, dtype=torch.float64) / math.sqrt(k)
    else:
        leaves["weight"] = torch.randn(batch, m, k, dtype=torch.float64) / math.sqrt(k)
    if has_bias and kind != "flat_odd":
        leaves["bias"] = torch.randn(batch, m, dtype=torch.float64)

    def derive(t):
        if kind == "flat_odd":
            w = t["flat"][:, 1 : 1 + m * k].view(batch, m, k)
            return w, (t["flat"][:, 1 + m * k : 1 + m * k + m] if has_bias else None)
        w = t["weight"]
        w = w.expand(batch, m, k) if kind == "shared" else (w.transpose(1, 2) if kind == "transposed" else w)
        return w, t.get("bias")

    return leaves, derive


def _run_through_the_op(layout, weight_kind, x_kind, act, dtype, n, has_bias=True, save_preact=None, batch=3, k=6,
                        m=5, w0=None):
    """Forward and every gradient of the op with backend "cuda" against the float64 loop reference."""
    leaves, derive_w = _weight_and_bias(weight_kind, batch, m, k, has_bias, dtype)
    cm = layout == "channel"
    x_shape = (batch, k, n) if cm else (batch, n, k)
    leaves["x"] = torch.randn(*x_shape[:-1], x_shape[-1] * (2 if x_kind == "strided" else 1), dtype=torch.float64)
    w0 = w0 if w0 is not None else (2.0 if dtype == torch.float32 else 1.5)

    def derive(t):
        x = t["x"][..., ::2] if x_kind == "strided" else t["x"]
        return (x, *derive_w(t))

    low = {name: v.to(dtype).requires_grad_() for name, v in leaves.items()}
    ref = {name: v.to(dtype).double().requires_grad_() for name, v in leaves.items()}
    act_obj = get_activation(act)
    keep = act_obj.needs_preactivation if save_preact is None else save_preact
    y, preact = batched_linear_op(*derive(low), act, w0, cm, keep, "cuda")
    assert preact.numel() == (y.numel() if keep and act_obj.needs_preactivation else 0)
    x_r, w_r, b_r = derive(ref)
    if cm:
        y_ref = conv1x1_reference(x_r, w_r, b_r, act, w0)
    else:
        y_ref = linear_reference(x_r, w_r, b_r, act, w0)
    assert y.dtype == dtype and y.shape == y_ref.shape and y.is_contiguous()
    assert_close(y, y_ref, FORWARD_RTOL[dtype], "forward")
    grad = torch.randn_like(y_ref).to(dtype)
    y.backward(grad)
    y_ref.backward(grad.double())
    for name in leaves:
        assert_close(low[name].grad, ref[name].grad, GRAD_RTOL[dtype], f"grad of {name}")


def _emulated_cases():
    """Every activation with every dtype, and every layout with every weight and x storage kind, cycling the
    remaining choices so that the count stays linear."""
    layouts = [("token", 1), ("token", 5), ("channel", 6), ("channel", 1)]
    weight_kinds = ["contiguous", "flat_odd", "shared", "transposed"]
    x_kinds = ["contiguous", "strided"]
    cases = []
    for i, (act, dtype) in enumerate((a, d) for a in ACTS for d in DTYPES):
        layout, n = layouts[i % len(layouts)]
        cases.append((layout, weight_kinds[i % 4], x_kinds[i % 2], act, dtype, n, i % 3 != 2))
    for j, ((layout, n), wk, xk) in enumerate((l, w, x) for l in layouts for w in weight_kinds for x in x_kinds):
        cases.append((layout, wk, xk, ACTS[j % len(ACTS)], torch.float32, n, j % 2 == 0))
    return cases


@pytest.mark.parametrize(
    "layout, weight_kind, x_kind, act, dtype, n, has_bias", _emulated_cases(),
    ids=lambda v: str(v).replace("torch.", "") if not isinstance(v, bool) else ("bias" if v else "nobias"),
)
def test_emulated_op_matches_reference(emulated, layout, weight_kind, x_kind, act, dtype, n, has_bias):
    _run_through_the_op(layout, weight_kind, x_kind, act, dtype, n, has_bias)
    assert emulated.calls, "nothing was launched"
    assert all(call[1]["stream"] == 0x5EED for call in emulated.calls), "not launched on the stream asked for"


@pytest.mark.parametrize("act", ["gelu", "silu", "sine"])
@pytest.mark.parametrize("n", [1, 4])
def test_emulated_backward_recomputes_a_missing_preactivation(emulated, act, n):
    _run_through_the_op("token", "contiguous", "contiguous", act, torch.float32, n, save_preact=False)
    kinds = [(kind, call["act"], call.get("preact")) for kind, call in emulated.calls]
    none = ACTIVATIONS["none"].code
    assert kinds[0] == ("forward", ACTIVATIONS[act].code, 0)  # kept nothing
    assert kinds[1][:2] == ("forward", none) and kinds[1][2] == 0  # z recomputed into its own buffer
    assert kinds[2][0] == "backward" and emulated.calls[2][1]["saved_is_preact"]


def test_emulated_channel_major_passes_transposed_strides(emulated):
    x = torch.randn(2, 4, 6)  # (B, C_in, S)
    w = torch.randn(2, 3, 4)
    y, _ = batched_linear_op(x, w, None, "relu", 1.0, True, False, "cuda")
    call = emulated.calls[0][1]
    assert (call["B"], call["N"], call["K"], call["M"]) == (2, 6, 4, 3)
    assert (call["sxb"], call["sxn"], call["sxk"]) == (24, 1, 6)  # x (B, K, S) read as (B, S, K)
    assert (call["syb"], call["syn"], call["sym"]) == (18, 1, 6)  # y (B, M, S) written as (B, S, M)
    assert y.shape == (2, 3, 6) and y.is_contiguous()
    assert_close(y, conv1x1_reference(x.double(), w.double(), None, "relu"), FORWARD_RTOL[torch.float32])


def test_emulated_misaligned_views_are_passed_as_they_are(emulated):
    """No alignment is required and nothing is copied: the kernels get the view's own (odd) address."""
    flat = torch.randn(3, 1 + 5 * 7 + 5)
    w, b = flat[:, 1 : 36].view(3, 5, 7), flat[:, 36:]
    x = torch.randn(3, 2, 14)[..., ::2]
    batched_linear_op(x, w, b, "tanh", 1.0, False, False, "cuda")
    call = emulated.calls[0][1]
    assert call["w"] == w.data_ptr() and call["w"] % 16 != 0
    assert (call["swb"], call["swm"], call["swk"]) == w.stride()
    assert call["bias"] == b.data_ptr() and (call["sbb"], call["sbm"]) == b.stride()
    assert call["x"] == x.data_ptr() and call["sxk"] == 2


@pytest.mark.parametrize("bias", ["none", "shared", "per_sample"])
def test_emulated_shared_weight_single_token_is_folded_into_one_gemm(emulated, bias):
    batch, m, k = 6, 5, 4
    w = torch.randn(1, m, k).expand(batch, m, k)
    b = {"none": None, "shared": torch.randn(1, m).expand(batch, m), "per_sample": torch.randn(batch, m)}[bias]
    x = torch.randn(batch, 1, k, requires_grad=True)
    y, _ = batched_linear_op(x, w, b, "relu", 1.0, False, False, "cuda")
    fwd = emulated.calls[0][1]
    folded = bias != "per_sample"  # a per-sample bias cannot be one GEMM's bias
    assert (fwd["B"], fwd["N"]) == ((1, batch) if folded else (batch, 1))
    assert_close(y, linear_reference(x.double(), w.double(), None if b is None else b.double(), "relu"),
                 FORWARD_RTOL[torch.float32])
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    bwd = [c for kind, c in emulated.calls if kind == "backward"]
    assert len(bwd) == 1 and (bwd[0]["B"], bwd[0]["N"]) == (1, batch) and bwd[0]["dw"] == 0
    xr = x.detach().double().requires_grad_()
    y_ref = linear_reference(xr, w.double(), None if b is None else b.double(), "relu")
    y_ref.backward(torch.ones_like(y_ref))
    assert_close(dx, xr.grad, GRAD_RTOL[torch.float32], "dx")


@pytest.mark.parametrize("mask", [(True, False, False), (False, True, False), (False, False, True), (False, True, True)])
@pytest.mark.parametrize("act", ["none", "relu", "gelu"])
def test_emulated_output_mask_subsets(emulated, mask, act):
    x, w, b = torch.randn(3, 4, 6), torch.randn(3, 5, 6), torch.randn(3, 5)
    y, preact = batched_linear_op(x, w, b, act, 1.0, False, True, "cuda")
    g = torch.randn_like(y)
    dx, dw, db = batched_linear_backward_op(g, x, w, b, y, preact, act, 1.0, False, list(mask), "cuda")
    for out, want, shape in zip((dx, dw, db), mask, (x.shape, w.shape, b.shape)):
        assert out.shape == (shape if want else (0,))
    call = emulated.calls[-1][1]
    assert (call["dx"] != 0, call["dw"] != 0, call["db"] != 0) == mask
    assert (call["dz"] != 0) == (act != "none" and (mask[0] or mask[1]))  # scratch only where a GEMM reads dz
    xr, wr, br = (t.double().requires_grad_() for t in (x, w, b))
    linear_reference(xr, wr, br, act, 1.0).backward(g.double())
    for out, want, r in zip((dx, dw, db), mask, (xr, wr, br)):
        if want:
            assert_close(out, r.grad, GRAD_RTOL[torch.float32])


def test_emulated_split_reductions_get_their_workspace(emulated):
    x, w, b = torch.randn(1, 300, 40), torch.randn(1, 40, 40) / 7, torch.randn(1, 40)
    y, preact = batched_linear_op(x, w, b, "gelu", 1.0, False, True, "cuda")
    batched_linear_backward_op(torch.randn_like(y), x, w, b, y, preact, "gelu", 1.0, False, [True, True, True], "cuda")
    call = emulated.calls[-1][1]
    assert emulated.real.linear_backward_workspace_size(B=1, N=300, M=40, K=40, need_dw=True, need_db=True) > 0
    assert call["workspace"] != 0 and call["workspace_bytes"] > 0  # the emulator checked size and alignment


def test_emulated_allow_tf32_follows_torch(emulated):
    x, w = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    matmul = torch.backends.cuda.matmul
    assert not cuda_linear.allow_tf32()  # torch's default
    try:
        matmul.allow_tf32 = True
        batched_linear_op(x, w, None, "none", 1.0, False, False, "cuda")
    finally:
        matmul.allow_tf32 = False
    batched_linear_op(x, w, None, "none", 1.0, False, False, "cuda")
    assert [c[1]["allow_tf32"] for c in emulated.calls] == [True, False]


def test_emulated_empty_problems_launch_nothing(emulated):
    for x, w in [(torch.randn(0, 3, 4), torch.randn(0, 5, 4)), (torch.randn(2, 0, 4), torch.randn(2, 5, 4)),
                 (torch.randn(2, 3, 0), torch.randn(2, 5, 0)), (torch.randn(2, 3, 4), torch.randn(2, 0, 4))]:
        b = torch.randn(x.shape[0], w.shape[1])
        y, preact = batched_linear_op(x, w, b, "gelu", 1.0, False, True, "cuda")
        assert y.shape == (x.shape[0], x.shape[1], w.shape[1])
        grads = batched_linear_backward_op(torch.randn_like(y), x, w, b, y, preact, "gelu", 1.0, False,
                                           [True, True, True], "cuda")
        assert [g.shape for g in grads] == [x.shape, w.shape, b.shape]
    assert emulated.calls == []


def test_emulated_opcheck(emulated):
    flat = torch.randn(3, 1 + 5 * 4 + 5, requires_grad=True)
    w, b = flat[:, 1:21].view(3, 5, 4), flat[:, 21:]
    for cm in (False, True):
        x = (torch.randn(3, 4, 7) if cm else torch.randn(3, 7, 4)).requires_grad_()
        torch.library.opcheck(batched_linear_op, (x, w, b, "gelu", 2.0, cm, True, "cuda"))
        y, preact = batched_linear_op(x, w, b, "gelu", 2.0, cm, True, "cuda")
        args = (torch.randn_like(y), x, w, b, y.detach(), preact.detach(), "gelu", 2.0, cm, [True, True, True], "cuda")
        torch.library.opcheck(batched_linear_backward_op, args)


def test_sanitizer_script_cases_pass_under_the_emulator(emulated, monkeypatch):
    """tests/gpu/sanitize_cuda.py's cases and checks, run on CPU: the script itself is right before a GPU sees it."""
    sys.path.insert(0, os.path.join(ROOT, "tests", "gpu"))
    try:
        script = importlib.import_module("sanitize_cuda")
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(script, "_to_gpu", lambda t: t.contiguous().clone())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    names = set()
    for case in script.CASES:
        assert script.run_case(case) == [], case.name
        names.add(case.name)
    assert len(names) == len(script.CASES)


# ============================================================================================================
# GPU
# ============================================================================================================

@pytest.fixture
def gpu():
    """Skips without a GPU; with one, the backend must be usable (or, unless a build is required, skip)."""
    if not HAS_GPU:
        pytest.skip("needs a CUDA GPU")
    reason = cuda_backend.unavailable_reason()
    if reason is not None:
        if REQUIRED:
            pytest.fail(f"HYPERKERNELS_REQUIRE_CUDA_BUILD=1 but the cuda backend is unavailable: {reason}")
        pytest.skip(f"the cuda backend is unavailable: {reason}")
    return torch.device("cuda", torch.cuda.current_device())


@contextlib.contextmanager
def _tf32(enabled: bool):
    matmul = torch.backends.cuda.matmul
    old = cuda_linear.allow_tf32()
    matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        matmul.allow_tf32 = old


def _batched_reference(x, weight, bias, activation, w0, channel_major=False):
    """float64 reference for sizes where reference.py's per-sample loop is too slow: one einsum (independent of
    hyperkernels' code), x (B, N, K) or channel-major (B, K, S)."""
    if channel_major:
        z = torch.einsum("bks,bmk->bms", x, weight)
        return REFERENCE_ACTIVATIONS[activation](z + (bias[:, :, None] if bias is not None else 0), w0)
    z = torch.einsum("bnk,bmk->bnm", x, weight)
    return REFERENCE_ACTIVATIONS[activation](z + (bias[:, None, :] if bias is not None else 0), w0)


def _device_relative_error(out, ref) -> float:
    """reference.relative_error without the copy to the host (these tensors reach gigabytes)."""
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    denom = ref.norm().item()
    err = (out.double() - ref.double()).norm().item()
    return err / denom if denom > 0 else err


def _compare(fn, ref_fn, leaves, dtype, rtol_fwd, rtol_grad):
    """fn / ref_fn map a dict of tensors to the output; leaves are float64 on the GPU. The reference sees the
    leaves rounded to ``dtype`` (so only the computation differs). Returns the forward and gradient errors."""
    low = {k: v.to(dtype).requires_grad_() for k, v in leaves.items()}
    ref = {k: v.to(dtype).double().requires_grad_() for k, v in leaves.items()}
    y = fn(low)
    y_ref = ref_fn(ref)
    assert y.dtype == dtype and y.shape == y_ref.shape and y.is_contiguous()
    errors = {"forward": _device_relative_error(y, y_ref)}
    grad = torch.randn_like(y_ref).to(dtype)
    y.backward(grad)
    y_ref.backward(grad.double())
    for k in leaves:
        errors[f"grad of {k}"] = _device_relative_error(low[k].grad, ref[k].grad)
    assert not torch.isnan(y).any()
    for what, err in errors.items():
        assert err <= (rtol_fwd if what == "forward" else rtol_grad), f"{what}: relative error {err:.3e}"
    return errors


# TF32 keeps 10 mantissa bits of each input (relative rounding 2^-11): errors of a few 1e-4 on random data.
TF32_RTOL = 5e-3


@pytest.mark.parametrize("batch, n, k, m, dtype, act, tf32", [
    (4096, 1, 256, 256, torch.float32, "gelu", False),
    (4096, 1, 256, 256, torch.bfloat16, "relu", False),
    (64, 1024, 128, 128, torch.bfloat16, "gelu", False),
    (64, 1024, 128, 128, torch.float16, "silu", False),
    (64, 1024, 128, 128, torch.float32, "tanh", False),
    (64, 1024, 128, 128, torch.float32, "gelu", True),
], ids=lambda v: str(v).replace("torch.", ""))
def test_real_sizes_against_float64(gpu, batch, n, k, m, dtype, act, tf32):
    leaves = {
        "x": torch.randn(batch, n, k, device=gpu, dtype=torch.float64),
        "weight": torch.randn(batch, m, k, device=gpu, dtype=torch.float64) / math.sqrt(k),
        "bias": torch.randn(batch, m, device=gpu, dtype=torch.float64),
    }
    fn = lambda t: hk.batched_linear(t["x"], t["weight"], t["bias"], activation=act, backend="cuda")  # noqa: E731
    ref_fn = lambda t: _batched_reference(t["x"], t["weight"], t["bias"], act, 1.0)  # noqa: E731
    with _tf32(tf32):
        errors = _compare(fn, ref_fn, leaves, dtype, TF32_RTOL if tf32 else FORWARD_RTOL[dtype],
                          TF32_RTOL if tf32 else GRAD_RTOL[dtype])
    if tf32:  # TF32 really engaged: float32 FMA errors here are ~1e-7
        assert errors["forward"] > 1e-6, f"TF32 allowed but the GEMM looks exact: {errors}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_conv1x1_channel_major_against_float64(gpu, dtype):
    batch, c_in, c_out, h, w = 16, 64, 96, 32, 32
    leaves = {
        "x": torch.randn(batch, c_in, h, w, device=gpu, dtype=torch.float64),
        "weight": torch.randn(batch, c_out, c_in, device=gpu, dtype=torch.float64) / math.sqrt(c_in),
        "bias": torch.randn(batch, c_out, device=gpu, dtype=torch.float64),
    }
    fn = lambda t: hk.batched_conv1x1(t["x"], t["weight"], t["bias"], activation="gelu", backend="cuda")  # noqa: E731
    ref_fn = lambda t: conv1x1_reference(t["x"], t["weight"], t["bias"], "gelu")  # noqa: E731
    with _tf32(False):
        _compare(fn, ref_fn, leaves, dtype, FORWARD_RTOL[dtype], GRAD_RTOL[dtype])


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_shared_weight_single_token_on_gpu(gpu, dtype, bias):
    """The folded path (B tokens against one weight as one GEMM) and its dx."""
    batch, k, m = 1000, 96, 80
    leaves = {"x": torch.randn(batch, k, device=gpu, dtype=torch.float64),
              "weight": torch.randn(1, m, k, device=gpu, dtype=torch.float64) / math.sqrt(k)}
    if bias:
        leaves["bias"] = torch.randn(1, m, device=gpu, dtype=torch.float64)

    def views(t):
        return t["x"], t["weight"].expand(batch, m, k), (t["bias"].expand(batch, m) if bias else None)

    fn = lambda t: hk.batched_linear(*views(t), activation="silu", backend="cuda")  # noqa: E731
    ref_fn = lambda t: _batched_reference(views(t)[0][:, None], *views(t)[1:], "silu", 1.0)[:, 0]  # noqa: E731
    with _tf32(False):
        _compare(fn, ref_fn, leaves, dtype, FORWARD_RTOL[dtype], GRAD_RTOL[dtype])


def _kernel_names(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def _gemv_vector_flags(names) -> set:
    """The VEC template argument of every gemv_rows_kernel launch (demangled or mangled names)."""
    flags = set()
    for name in names:
        if "gemv_rows_kernel" not in name:
            continue
        demangled = re.search(r"gemv_rows_kernel<[^,<>]+,\s*\d+,\s*(true|false)>", name)
        mangled = re.search(r"gemv_rows_kernel.*?Lb([01])E", name)
        if demangled:
            flags.add(demangled.group(1) == "true")
        elif mangled:
            flags.add(mangled.group(1) == "1")
    return flags


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_misaligned_views_work_and_only_aligned_ones_get_vector_loads(gpu, dtype):
    """A weight view at an odd offset of a flat buffer is accepted and computed (GEMV and GEMM paths); the
    launcher's alignment detection picks 16-byte loads for a 16-byte aligned view and scalar ones otherwise."""
    batch, k, m = 64, 64, 32
    per16 = 16 // torch.empty(0, dtype=dtype).element_size()  # elements per 16 bytes
    flat = torch.randn(batch, m * k + 2 * per16, device=gpu, dtype=dtype) / math.sqrt(k)  # row: 16-byte multiple
    views = {"aligned": flat[:, per16 : per16 + m * k].view(batch, m, k),
             "odd": flat[:, 1 : 1 + m * k].view(batch, m, k)}
    for n in (1, 37):
        x = torch.randn(batch, n, k, device=gpu, dtype=dtype)
        for kind, w in views.items():
            y = hk.batched_linear(x, w, activation="gelu", backend="cuda")
            assert_close(y, _batched_reference(x.double(), w.double(), None, "gelu", 1.0), FORWARD_RTOL[dtype], kind)
    x = torch.randn(batch, k, device=gpu, dtype=dtype)
    flags = {kind: _gemv_vector_flags(_kernel_names(lambda w=w: hk.batched_linear(x, w, backend="cuda")))
             for kind, w in views.items()}
    if not flags["aligned"] and not flags["odd"]:
        pytest.skip("the profiler recorded no gemv_rows_kernel launch here (no CUPTI?): the paths were not observed")
    assert flags == {"aligned": {True}, "odd": {False}}, flags


def test_runs_on_the_current_stream(gpu):
    """Work queued on a busy side stream must precede our kernels: launched on any other stream, they would
    read x before the copy that fills it."""
    batch, n, k, m = 32, 64, 48, 40
    x_new = torch.randn(batch, n, k, device=gpu)
    w = (torch.randn(batch, m, k, device=gpu) / math.sqrt(k)).requires_grad_()
    g = torch.randn(batch, n, m, device=gpu)
    expected = hk.batched_linear(x_new, w, activation="tanh", backend="torch")
    (expected_dw,) = torch.autograd.grad(expected, w, g)
    x = torch.zeros_like(x_new)
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time on the side stream
        x.copy_(x_new)
        y = hk.batched_linear(x, w, activation="tanh", backend="cuda")
        (dw,) = torch.autograd.grad(y, w, g)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw, expected_dw, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_runs_on_a_device_other_than_the_current_one(gpu):
    dev = torch.device("cuda", 1)
    assert torch.cuda.current_device() == 0
    x = torch.randn(8, 33, 20, device=dev)
    w = torch.randn(8, 17, 20, device=dev, requires_grad=True)
    b = torch.randn(8, 17, device=dev, requires_grad=True)
    y = hk.batched_linear(x, w, b, activation="gelu", backend="cuda")
    assert y.device == dev
    gw, gb = torch.autograd.grad(y, (w, b), torch.ones_like(y))
    xr, wr, br = x.double().cpu(), w.detach().double().cpu().requires_grad_(), b.detach().double().cpu().requires_grad_()
    y_ref = linear_reference(xr, wr, br, "gelu")
    y_ref.backward(torch.ones_like(y_ref))
    assert_close(y, y_ref, FORWARD_RTOL[torch.float32])
    assert_close(gw, wr.grad, GRAD_RTOL[torch.float32], "dw")
    assert_close(gb, br.grad, GRAD_RTOL[torch.float32], "db")
    assert torch.cuda.current_device() == 0


@pytest.mark.parametrize("n", [1, 300])  # the GEMV path; the GEMM path with split (workspace) reductions
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_graph_capture_and_replay(gpu, n, dtype):
    batch, k, m = 8, 40, 48
    x = torch.randn(batch, n, k, device=gpu, dtype=dtype, requires_grad=True)
    w = torch.randn(batch, m, k, device=gpu, dtype=dtype, requires_grad=True)
    b = torch.randn(batch, m, device=gpu, dtype=dtype, requires_grad=True)
    gy = torch.randn(batch, n, m, device=gpu, dtype=dtype)

    def step():
        y = hk.batched_linear(x, w, b, activation="gelu", backend="cuda")  # keeps the preact: a second output
        return (y, *torch.autograd.grad(y, (x, w, b), gy))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (kernel loading, allocator) off the capture
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for _ in range(2):
        with torch.no_grad():
            for t in (x, w, b, gy):
                t.copy_(torch.randn_like(t))
        graph.replay()
        eager = step()
        torch.cuda.synchronize()
        for c, e in zip(captured, eager):
            assert torch.equal(c, e)  # the same deterministic kernels on the same data


@pytest.mark.parametrize("n", [1, 3])
def test_batch_of_2_to_the_20(gpu, n):
    """B = 2^20 samples: far past the 65535 of grid dims y / z (the kernels use 1-D grids)."""
    batch, k, m = 2**20, 8, 8
    leaves = {"x": torch.randn(batch, n, k, device=gpu, dtype=torch.float64),
              "weight": torch.randn(batch, m, k, device=gpu, dtype=torch.float64) / math.sqrt(k),
              "bias": torch.randn(batch, m, device=gpu, dtype=torch.float64)}
    fn = lambda t: hk.batched_linear(t["x"], t["weight"], t["bias"], activation="tanh", backend="cuda")  # noqa: E731
    ref_fn = lambda t: _batched_reference(t["x"], t["weight"], t["bias"], "tanh", 1.0)  # noqa: E731
    with _tf32(False):
        _compare(fn, ref_fn, leaves, torch.float32, FORWARD_RTOL[torch.float32], GRAD_RTOL[torch.float32])


def _chunked_check(x, w, b, y, dx, dw, db, gy, act, rows_dim):
    """float64 reference of y, dx, dw, db computed over chunks of samples / tokens (the full float64 copies
    would not fit), errors accumulated over every element."""
    acc = {k: [0.0, 0.0] for k in ("y", "dx", "dw", "db")}
    dw_ref = torch.zeros(w.shape, device=w.device, dtype=torch.float64)
    db_ref = torch.zeros(b.shape, device=b.device, dtype=torch.float64)
    total = x.shape[rows_dim]
    step = max(1, (1 << 28) // (x.numel() // total))  # ~2 GiB of float64 per chunk
    for s in range(0, total, step):
        sl = [slice(None)] * 3
        sl[rows_dim] = slice(s, s + step)
        sl = tuple(sl)
        xc = x[sl].double()
        wc = w.double() if rows_dim == 1 else w[sl].double()
        bc = b.double() if rows_dim == 1 else b[sl[0]].double()
        zc = torch.einsum("bnk,bmk->bnm", xc, wc) + bc[:, None, :]
        zr = zc.clone().requires_grad_()
        with torch.enable_grad():
            yc = REFERENCE_ACTIVATIONS[act](zr, 1.0)
            (dzc,) = torch.autograd.grad(yc, zr, gy[sl].double())
        parts = {"y": (y[sl], yc.detach()), "dx": (dx[sl], torch.einsum("bnm,bmk->bnk", dzc, wc))}
        dwc, dbc = torch.einsum("bnm,bnk->bmk", dzc, xc), dzc.sum(1)
        if rows_dim == 1:
            dw_ref += dwc
            db_ref += dbc
        else:
            parts["dw"] = (dw[sl], dwc)
            parts["db"] = (db[sl[0]], dbc)
        for key, (out, ref) in parts.items():
            acc[key][0] += (out.double() - ref).norm().item() ** 2
            acc[key][1] += ref.norm().item() ** 2
        del xc, zc, zr, yc, dzc, parts
    if rows_dim == 1:
        for key, out, ref in (("dw", dw, dw_ref), ("db", db, db_ref)):
            acc[key] = [(out.double() - ref).norm().item() ** 2, ref.norm().item() ** 2]
    return {k: math.sqrt(e / r) for k, (e, r) in acc.items()}


@pytest.mark.parametrize("case", ["one_sample_gemm", "many_samples_gemv"])
def test_more_than_2_to_the_31_elements(gpu, case):
    """x with B * N * K > 2^31 elements in bfloat16 (about 4.4 GB each for x, dx, and for the GEMV case w and dw):
    offsets past 2^31 inside one sample (GEMM), and across samples (GEMV)."""
    if case == "one_sample_gemm":
        batch, n, k, m, rows_dim = 1, 2**22 + 3, 520, 4, 1
    else:
        batch, n, k, m, rows_dim = 2**21 + 1, 1, 1040, 1, 0
    assert batch * n * k > 2**31
    need = (4 if case == "many_samples_gemv" else 2) * batch * n * k * 2 + (12 << 30)  # + float64 chunks
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs about {need / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    dt = torch.bfloat16
    x = torch.randn(batch, n, k, device=gpu, dtype=dt).requires_grad_()
    w = (torch.randn(batch, m, k, device=gpu, dtype=dt) * (k ** -0.5)).requires_grad_()
    b = torch.randn(batch, m, device=gpu, dtype=dt).requires_grad_()
    y = hk.batched_linear(x, w, b, activation="gelu", backend="cuda")
    gy = torch.randn_like(y)
    dx, dw, db = torch.autograd.grad(y, (x, w, b), gy)
    errors = _chunked_check(x.detach(), w.detach(), b.detach(), y.detach(), dx, dw, db, gy, "gelu", rows_dim)
    assert errors["y"] <= FORWARD_RTOL[dt], errors
    assert max(errors["dx"], errors["dw"], errors["db"]) <= GRAD_RTOL[dt], errors


def _compute_sanitizer():
    candidates = [shutil.which("compute-sanitizer")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "compute-sanitizer"))
    candidates.append("/usr/local/cuda/bin/compute-sanitizer")
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer(gpu, tool):
    """memcheck: out-of-bounds and misaligned accesses in every kernel path; racecheck: shared-memory hazards
    (the GEMM tile pipeline, the GEMV-cols and dz / db reductions)."""
    sanitizer = _compute_sanitizer()
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found (it ships with the CUDA toolkit: PATH, $CUDA_HOME/bin, "
                    "/usr/local/cuda/bin)")
    script = os.path.join(ROOT, "tests", "gpu", "sanitize_cuda.py")
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    cmd = [sanitizer, "--tool", tool, "--error-exitcode", "86", sys.executable, script]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=540)
    out = proc.stdout + proc.stderr
    if "sanitize_cuda: start" not in out:
        pytest.skip(f"compute-sanitizer could not run the program on this machine: {out[-1500:]}")
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-6000:]}"
    assert "sanitize_cuda: done" in out and ", 0 mismatches" in out, out[-3000:]
