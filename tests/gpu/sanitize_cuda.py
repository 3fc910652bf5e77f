"""Launch every kernel path of the cuda backend once, on small shapes, for compute-sanitizer.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 86 \
        python tests/gpu/sanitize_cuda.py
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool racecheck --error-exitcode 86 \
        python tests/gpu/sanitize_cuda.py

(``tests/backends/cuda/test_cuda_gpu.py::test_compute_sanitizer`` runs exactly this where the tool exists.)

Without the caching allocator every tensor is its own cudaMalloc, so memcheck sees an access past the end of a
tensor instead of landing in a neighbour inside one cached segment. Inputs are made on the CPU and copied
over, outputs copied back, and the backend object is called directly (no autograd): the only kernels that run
are hyperkernels' own, so the sanitizer's time goes to them.

Each case is checked against a float64 CPU reference too (loosely: the sanitizer is the point), and the script
exits non-zero on a mismatch. Paths covered (csrc/gemv.cu, gemm.cu, reductions.cu): gemv_rows_kernel with and
without 16-byte vectors (and the scalar tail), group sizes 4 and 32; gemv_cols_kernel (forward with a transposed
weight, and the N = 1 dx); gemm_kernel in FMA, TF32 and WMMA (float16 / bfloat16) math, with every load mode
(vector, scalar along d, scalar along rows) and both epilogue orders, with and without a split reduction into the
workspace; dz_db_mfast_kernel and dz_db_nfast_kernel with and without splits; outer_kernel; reduce_splits_kernel
for dW and db; the shared-weight fold; an expanded grad_y (all strides 0).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import torch  # noqa: E402

from hyperkernels._dispatch import get_backend  # noqa: E402
from hyperkernels.activations import get_activation  # noqa: E402
from hyperkernels.backends.cuda import unavailable_reason  # noqa: E402
from reference import REFERENCE_ACTIVATIONS  # noqa: E402

# Loose bounds on ||out - ref|| / ||ref||: a wrong index shows as O(1); rounding (and TF32) is far below.
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
TOL_TF32 = 1e-2


class Case:
    def __init__(self, name, b, n, k, m, dtype=torch.float32, act="gelu", *, layout="token", weight="contiguous",
                 x="contiguous", bias=True, mask=(True, True, True), keep_preact=True, tf32=False, grad="dense",
                 w0=1.5):
        self.__dict__.update(locals())
        del self.__dict__["self"]


CASES = [
    # N = 1: GEMV paths
    Case("gemv_vec_fp32", 5, 1, 64, 24, torch.float32, "gelu"),
    Case("gemv_vec_tail_bf16", 4, 1, 41, 9, torch.bfloat16, "relu", weight="padded_rows", x="padded"),
    Case("gemv_scalar_odd_offset_fp16", 3, 1, 3, 5, torch.float16, "sine", weight="flat_odd"),
    Case("gemv_wide_scalar_fp32", 2, 1, 300, 7, torch.float32, "silu", weight="flat_odd", x="strided"),
    Case("gemv_cols_transposed_bf16", 3, 1, 40, 70, torch.bfloat16, "silu", weight="transposed"),
    Case("gemv_shared_fold_fp32", 6, 1, 33, 17, torch.float32, "tanh", weight="shared", bias=False),
    Case("gemv_act_none_only_dx_fp16", 3, 1, 16, 8, torch.float16, "none", mask=(True, False, False)),
    Case("gemv_only_db_bf16", 3, 1, 16, 8, torch.bfloat16, "sigmoid", mask=(False, False, True)),
    Case("gemv_expanded_grad_fp32", 3, 1, 16, 8, torch.float32, "relu", grad="expanded"),
    # N > 1: tiled GEMM paths
    Case("gemm_fma_vec_fp32", 3, 70, 72, 40, torch.float32, "gelu"),
    Case("gemm_fma_dfast_fp32", 2, 65, 70, 33, torch.float32, "tanh", keep_preact=False),
    Case("gemm_tf32_fp32", 2, 70, 72, 40, torch.float32, "silu", tf32=True),
    Case("gemm_wmma_vec_fp16", 3, 70, 64, 48, torch.float16, "relu"),
    Case("gemm_wmma_channel_major_bf16", 2, 70, 40, 36, torch.bfloat16, "gelu", layout="channel"),
    Case("gemm_wmma_rfast_weight_bf16", 2, 33, 40, 50, torch.bfloat16, "sigmoid", weight="transposed"),
    Case("gemm_odd_views_fp16", 2, 17, 33, 19, torch.float16, "sine", weight="flat_odd", x="strided"),
    Case("gemm_split_dw_db_fp32", 1, 300, 40, 40, torch.float32, "gelu", keep_preact=False),
    Case("gemm_split_channel_major_bf16", 1, 300, 24, 20, torch.bfloat16, "none", layout="channel"),
    Case("gemm_expanded_grad_fp16", 2, 40, 24, 20, torch.float16, "none", grad="expanded"),
    Case("gemm_only_dw_fp32", 2, 40, 24, 20, torch.float32, "relu", mask=(False, True, False)),
]


def _to_gpu(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().to("cuda")  # a copy, no kernel


def _make(case: Case):
    """(gpu tensors, float64 cpu tensors) of x, weight, bias in the backend's layouts: x (B, N, K) or (B, K, N)."""
    gen = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    b, n, k, m, dt = case.b, case.n, case.k, case.m, case.dtype

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dt)

    cm = case.layout == "channel"
    x_shape = (b, k, n) if cm else (b, n, k)
    if case.x == "strided":
        xs = rnd(*x_shape[:-1], 2 * x_shape[-1])
        x_gpu, x_cpu = _to_gpu(xs)[..., ::2], xs[..., ::2]
    elif case.x == "padded":  # rows of a wider buffer: the vector loads' scalar tail
        xs = rnd(*x_shape[:-1], x_shape[-1] + 7)
        x_gpu, x_cpu = _to_gpu(xs)[..., : x_shape[-1]], xs[..., : x_shape[-1]]
    else:
        x_cpu = rnd(*x_shape)
        x_gpu = _to_gpu(x_cpu)
    s = k ** -0.5
    if case.weight == "flat_odd":
        flat = rnd(b, 1 + m * k + 3, scale=s)
        w_gpu, w_cpu = _to_gpu(flat)[:, 1 : 1 + m * k].view(b, m, k), flat[:, 1 : 1 + m * k].view(b, m, k)
    elif case.weight == "padded_rows":
        buf = rnd(b, m, k + 7, scale=s)
        w_gpu, w_cpu = _to_gpu(buf)[:, :, :k], buf[:, :, :k]
    elif case.weight == "transposed":
        wt = rnd(b, k, m, scale=s)
        w_gpu, w_cpu = _to_gpu(wt).transpose(1, 2), wt.transpose(1, 2)
    elif case.weight == "shared":
        w1 = rnd(1, m, k, scale=s)
        w_gpu, w_cpu = _to_gpu(w1).expand(b, m, k), w1.expand(b, m, k)
    else:
        w_cpu = rnd(b, m, k, scale=s)
        w_gpu = _to_gpu(w_cpu)
    bias_cpu = rnd(b, m) if case.bias else None
    bias_gpu = _to_gpu(bias_cpu) if case.bias else None
    out_shape = (b, m, n) if cm else (b, n, m)
    if case.grad == "expanded":
        g1 = rnd(1, 1, 1)
        g_gpu, g_cpu = _to_gpu(g1).expand(out_shape), g1.expand(out_shape)
    else:
        g_cpu = rnd(*out_shape)
        g_gpu = _to_gpu(g_cpu)
    return (x_gpu, w_gpu, bias_gpu, g_gpu), tuple(None if t is None else t.double() for t in (x_cpu, w_cpu, bias_cpu, g_cpu))


def _reference(case: Case, x, w, bias, g):
    """float64 forward and gradients on the CPU, through autograd of the plain formula."""
    cm = case.layout == "channel"
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    bias = bias.clone().requires_grad_() if bias is not None else None
    xt = x.transpose(1, 2) if cm else x
    z = torch.einsum("bnk,bmk->bnm", xt, w)
    if bias is not None:
        z = z + bias[:, None, :]
    y = REFERENCE_ACTIVATIONS[case.act](z, case.w0)
    y = y.transpose(1, 2) if cm else y
    grads = torch.autograd.grad(y, [x, w] + ([bias] if bias is not None else []), g, allow_unused=True)
    return y.detach(), grads


def _rel(out, ref):
    out, ref = out.double().cpu(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def run_case(case: Case) -> list[str]:
    backend = get_backend("cuda")
    act = get_activation(case.act)
    (x, w, bias, g), (xr, wr, br, gr) = _make(case)
    cm = case.layout == "channel"
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = case.tf32
    try:
        y, preact = backend.linear_forward(x, w, bias, act, case.w0, cm, case.keep_preact)
        if not case.keep_preact:
            assert preact.numel() == 0
        dx, dw, db = backend.linear_backward(g, x, w, bias, y, preact, act, case.w0, cm, case.mask)
        torch.cuda.synchronize()  # a fault is reported against this case
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    y_ref, grads = _reference(case, xr, wr, br, gr)
    tol = TOL_TF32 if case.tf32 else TOL[case.dtype]
    problems = []
    checks = [("y", y, y_ref), ("dx", dx, grads[0]), ("dw", dw, grads[1])]
    if br is not None:
        checks.append(("db", db, grads[2]))
    for (name, out, ref), wanted in zip(checks, (True, *case.mask)):
        if not wanted:
            if out is not None:
                problems.append(f"{name}: not asked for, got a tensor")
            continue
        err = _rel(out, ref)
        if not err <= tol:
            problems.append(f"{name}: relative error {err:.2e} > {tol:.0e}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="", help="comma-separated substrings: run only matching cases")
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason is not None:
        print(f"sanitize_cuda: the cuda backend is unavailable: {reason}", flush=True)
        return 2
    torch.zeros(1, device="cuda")  # CUDA context up: the marker below says the tool let the program run
    torch.cuda.synchronize()
    print(f"sanitize_cuda: start on {torch.cuda.get_device_name()}", flush=True)
    wanted = [s for s in args.cases.split(",") if s]
    failures = 0
    ran = 0
    for case in CASES:
        if wanted and not any(s in case.name for s in wanted):
            continue
        t0 = time.time()
        problems = run_case(case)
        ran += 1
        status = "ok" if not problems else "MISMATCH " + "; ".join(problems)
        failures += bool(problems)
        print(f"sanitize_cuda: {case.name}: {status} ({time.time() - t0:.1f} s)", flush=True)
    print(f"sanitize_cuda: done: {ran} cases, {failures} mismatches", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
