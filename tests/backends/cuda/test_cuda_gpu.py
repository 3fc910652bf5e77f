"""The cuda backend on a GPU (each test skips on CPU with "needs a CUDA GPU"): real sizes against float64 references
(forward and every gradient, per-dtype tolerances), TF32 on and off, the channel-major conv layout, misaligned views
and which of them get vector loads, the current stream, a second device, CUDA graph capture, a batch of 2^20,
problems past 2^31 elements, and compute-sanitizer runs of tests/gpu/sanitize_cuda.py."""
from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import hyperkernels as hk
from cuda_emulator import REQUIRED
from hyperkernels.backends import cuda as cuda_backend
from hyperkernels.backends._precision import tf32_allowed
from reference import (FORWARD_RTOL, GRAD_RTOL, REFERENCE_ACTIVATIONS, assert_close, conv1x1_reference,
                       linear_reference)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
HAS_GPU = torch.cuda.is_available()


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
    old = tf32_allowed()
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
