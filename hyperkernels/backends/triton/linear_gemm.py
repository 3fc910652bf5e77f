r"""Per-sample linear with several tokens per sample (``N > 1``): per-sample GEMMs on tensor cores, configs,
kernels and launchers.

``tl.dot`` with float32 accumulation: forward ``(N, K) @ (K, M)``; backward ``dx = dz @ W`` ``(N, M) @ (M, K)`` and
``dW = dz^T @ x`` ``(M, N) @ (N, K)`` in two kernels, ``db`` summed by the ``dW`` kernel. Both backward kernels
recompute ``dz = grad_y * f'(.)`` from ``grad_y`` and ``y`` or ``preact`` as they load it: cheaper than writing
``dz`` out and reading it back twice. With few output tiles the dW kernel splits the tokens over programs (float32
partial sums, added by the launcher). Tensors arrive as the token-major 3-D views ``linear.py`` describes.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...activations import Activation
from ._config import INTERPRET
from ._jit import block_offsets, load_dz, loop_bound, tile_coords
from ._launch import check_grid, gemm_configs, gemm_prune, n_bucket, sample_index64, sum_splits
from .activations import activation_forward

# ------------------------------------------------------------------------------------------------------
# Autotune configs
# ------------------------------------------------------------------------------------------------------

# GEMM tiles as (rows, cols, reduction, num_warps, num_stages) of the kernel's output tile and its K loop.
# Each GEMM kernel names its own roles (the forward's rows are tokens N, the dW kernel's rows are outputs M),
# so one table serves all three. Big tiles for big problems, 16-row tiles for a few tokens (the smallest
# tl.dot), 16-deep reductions for the dW kernel over a few tokens. (128-deep reductions spill registers in
# the dW kernel's sm_90 build with bfloat16 and gelu, so none are listed.)
_GEMM_TILES = [
    (128, 128, 32, 8, 3),
    (128, 128, 64, 8, 3),
    (128, 64, 32, 4, 4),
    (64, 128, 32, 4, 4),
    (128, 64, 64, 4, 3),
    (64, 64, 64, 4, 3),
    (64, 64, 32, 4, 4),
    (128, 32, 64, 4, 4),
    (32, 128, 64, 4, 4),
    (64, 32, 32, 4, 4),
    (32, 64, 32, 4, 4),
    (32, 32, 32, 4, 4),
    (16, 64, 64, 4, 4),
    (16, 128, 32, 4, 4),
    (16, 32, 32, 2, 4),
    (64, 64, 16, 4, 4),
    (32, 32, 16, 2, 4),
    (256, 64, 32, 8, 3),
    (128, 32, 32, 4, 4),
]
# float32 only: the tiles above that fit the register budget (_launch.REGISTER_BUDGET) at tf32x3 are few (64 x 64 x
# 32 on 4 warps and smaller), so these spread 64-128 wide tiles over 8 warps. 16-bit operands have the tiles above.
_GEMM_TILES_F32 = [
    (128, 64, 32, 8, 3),
    (64, 128, 32, 8, 3),
    (64, 64, 32, 8, 4),
]
F32_ONLY_TILES = frozenset(_GEMM_TILES_F32)


def _gemm_configs(rows: str, cols: str, red: str, interpret: bool = INTERPRET) -> list[triton.Config]:
    return gemm_configs(_GEMM_TILES + _GEMM_TILES_F32, rows, cols, red, interpret)


_DIMS = {"BLOCK_N": "N", "BLOCK_M": "M", "BLOCK_K": "K"}

# ------------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------------


@triton.autotune(
    configs=_gemm_configs("BLOCK_N", "BLOCK_M", "BLOCK_K"),
    key=["M", "K", "N_BUCKET"],
    prune_configs_by={"early_config_prune": gemm_prune(
        "BLOCK_N", "BLOCK_M", "BLOCK_K", _DIMS, "x_ptr",
        operand_strides=("stride_xn", "stride_xk", "stride_wm", "stride_wk"), not_16bit=F32_ONLY_TILES)},
)
@triton.jit
def _fwd_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, z_ptr,
    N, M, K, N_BUCKET,
    stride_xb, stride_xn, stride_xk,
    stride_wb, stride_wm, stride_wk,
    stride_bb, stride_bn, stride_bm,
    stride_yb, stride_yn, stride_ym,
    w0,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE_PREACT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, INDEX64: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (BLOCK_N tokens x BLOCK_M outputs) tile of act(x W^T + b) for one sample; y and preact share strides.
    The bias has a token stride so that a folded batch (shared weight, N = 1) keeps per-sample biases."""
    b, pid_n, pid_m = tile_coords(tl.program_id(0), N, M, BLOCK_N, BLOCK_M)

    offs_n = block_offsets(pid_n, BLOCK_N, INDEX64)
    offs_m = block_offsets(pid_m, BLOCK_M, INDEX64)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_m = offs_m < M

    x_ptrs = x_ptr + b * stride_xb + offs_n[:, None] * stride_xn + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + b * stride_wb + offs_k[:, None] * stride_wk + offs_m[None, :] * stride_wm
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for kk in range(0, loop_bound(tl.cdiv(K, BLOCK_K))):
        k_left = K - kk * BLOCK_K
        a = tl.load(x_ptrs, mask=mask_n[:, None] & (offs_k[None, :] < k_left), other=0.0)
        w = tl.load(w_ptrs, mask=(offs_k[:, None] < k_left) & mask_m[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16 tl.dot is wrong (Triton issue 11584)
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    mask = mask_n[:, None] & mask_m[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + b * stride_bb + offs_n[:, None] * stride_bn + offs_m[None, :] * stride_bm,
                       mask=mask, other=0.0)
        acc += bias.to(tl.float32)
    out = b * stride_yb + offs_n[:, None] * stride_yn + offs_m[None, :] * stride_ym
    if SAVE_PREACT:
        tl.store(z_ptr + out, acc.to(z_ptr.dtype.element_ty), mask=mask)
    y = activation_forward(acc, w0, ACT)
    tl.store(y_ptr + out, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.autotune(
    configs=_gemm_configs("BLOCK_N", "BLOCK_K", "BLOCK_M"),
    key=["M", "K", "N_BUCKET"],
    prune_configs_by={"early_config_prune": gemm_prune(
        "BLOCK_N", "BLOCK_K", "BLOCK_M", _DIMS, "w_ptr", forms_dz=True,
        operand_strides=("stride_gn", "stride_gm", "stride_wm", "stride_wk", "stride_yn", "stride_ym", "stride_zn",
                         "stride_zm"), not_16bit=F32_ONLY_TILES)},
)
@triton.jit
def _bwd_dx_gemm_kernel(
    g_ptr, w_ptr, y_ptr, z_ptr, dx_ptr,
    N, M, K, N_BUCKET,
    stride_gb, stride_gn, stride_gm,
    stride_wb, stride_wm, stride_wk,
    stride_yb, stride_yn, stride_ym,
    stride_zb, stride_zn, stride_zm,
    stride_dxb, stride_dxn, stride_dxk,
    w0,
    ACT: tl.constexpr, LOAD_Y: tl.constexpr, LOAD_Z: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, INDEX64: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (BLOCK_N tokens x BLOCK_K inputs) tile of dx = dz @ W, with dz = grad_y * f'(.) formed on load."""
    b, pid_n, pid_k = tile_coords(tl.program_id(0), N, K, BLOCK_N, BLOCK_K)

    offs_n = block_offsets(pid_n, BLOCK_N, INDEX64)
    offs_k = block_offsets(pid_k, BLOCK_K, INDEX64)
    offs_m = tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_k = offs_k < K

    g_ptrs = g_ptr + b * stride_gb + offs_n[:, None] * stride_gn + offs_m[None, :] * stride_gm
    y_ptrs = y_ptr + b * stride_yb + offs_n[:, None] * stride_yn + offs_m[None, :] * stride_ym
    z_ptrs = z_ptr + b * stride_zb + offs_n[:, None] * stride_zn + offs_m[None, :] * stride_zm
    w_ptrs = w_ptr + b * stride_wb + offs_m[:, None] * stride_wm + offs_k[None, :] * stride_wk
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for mm in range(0, loop_bound(tl.cdiv(M, BLOCK_M))):
        m_left = M - mm * BLOCK_M
        dz = load_dz(g_ptrs, y_ptrs, z_ptrs, mask_n[:, None] & (offs_m[None, :] < m_left), w0, ACT, LOAD_Y, LOAD_Z)
        w = tl.load(w_ptrs, mask=(offs_m[:, None] < m_left) & mask_k[None, :], other=0.0)
        dz = dz.to(w_ptr.dtype.element_ty)  # tensor cores take both operands in the input dtype
        if UPCAST:
            dz = dz.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(dz, w, acc, input_precision=DOT_PRECISION)
        g_ptrs += BLOCK_M * stride_gm
        y_ptrs += BLOCK_M * stride_ym
        z_ptrs += BLOCK_M * stride_zm
        w_ptrs += BLOCK_M * stride_wm

    out = dx_ptr + b * stride_dxb + offs_n[:, None] * stride_dxn + offs_k[None, :] * stride_dxk
    tl.store(out, acc.to(dx_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_k[None, :])


@triton.autotune(
    configs=_gemm_configs("BLOCK_M", "BLOCK_K", "BLOCK_N"),
    key=["M", "K", "N_BUCKET"],
    prune_configs_by={"early_config_prune": gemm_prune(
        "BLOCK_M", "BLOCK_K", "BLOCK_N", _DIMS, "x_ptr", forms_dz=True,
        operand_strides=("stride_gn", "stride_gm", "stride_xn", "stride_xk", "stride_yn", "stride_ym", "stride_zn",
                         "stride_zm"), not_16bit=F32_ONLY_TILES)},
)
@triton.jit
def _bwd_dw_gemm_kernel(
    g_ptr, x_ptr, y_ptr, z_ptr, dw_ptr, db_ptr,
    N, M, K, N_BUCKET, N_PER_SPLIT, SPLITS,
    stride_gb, stride_gn, stride_gm,
    stride_xb, stride_xn, stride_xk,
    stride_yb, stride_yn, stride_ym,
    stride_zb, stride_zn, stride_zm,
    stride_dws, stride_dwb, stride_dwm, stride_dwk,
    stride_dbs, stride_dbb, stride_dbm,
    w0,
    ACT: tl.constexpr, LOAD_Y: tl.constexpr, LOAD_Z: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, INDEX64: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (BLOCK_M outputs x BLOCK_K inputs) tile of dW = dz^T @ x over the tokens of one split, and with it
    db = sum of dz (written by the programs of the first K block). With SPLITS > 1 each split writes a
    float32 partial sum at its own ``stride_dws`` offset; the launcher adds them up. Without NEED_DW there is
    one K block and only db is computed."""
    # The grid's groups are (sample, split) pairs: not _jit.tile_coords, whose group is a sample.
    pid = tl.program_id(0)
    if NEED_DW:
        tiles_k = tl.cdiv(K, BLOCK_K)
    else:
        tiles_k = 1
    tiles = tl.cdiv(M, BLOCK_M) * tiles_k
    rest = pid // tiles
    b = (rest // SPLITS).to(tl.int64)
    split = rest % SPLITS
    pid_m = (pid % tiles) // tiles_k
    pid_k = pid % tiles_k

    n_start = split * N_PER_SPLIT
    n_stop = tl.minimum(N, n_start + N_PER_SPLIT)
    offs_m = block_offsets(pid_m, BLOCK_M, INDEX64)
    offs_k = block_offsets(pid_k, BLOCK_K, INDEX64)
    rel_n = tl.arange(0, BLOCK_N)
    offs_n = n_start + rel_n
    if INDEX64:
        offs_n = offs_n.to(tl.int64)
    mask_m = offs_m < M
    mask_k = offs_k < K

    # dz is loaded transposed, (BLOCK_M, BLOCK_N), straight into the left operand's shape.
    g_ptrs = g_ptr + b * stride_gb + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn
    y_ptrs = y_ptr + b * stride_yb + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    z_ptrs = z_ptr + b * stride_zb + offs_m[:, None] * stride_zm + offs_n[None, :] * stride_zn
    x_ptrs = x_ptr + b * stride_xb + offs_n[:, None] * stride_xn + offs_k[None, :] * stride_xk
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    db = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(loop_bound(n_start), loop_bound(n_stop), BLOCK_N):
        n_left = n_stop - n0
        dz = load_dz(g_ptrs, y_ptrs, z_ptrs, mask_m[:, None] & (rel_n[None, :] < n_left), w0, ACT, LOAD_Y, LOAD_Z)
        if NEED_DB:
            db += tl.sum(dz, axis=1)
        if NEED_DW:
            xv = tl.load(x_ptrs, mask=(rel_n[:, None] < n_left) & mask_k[None, :], other=0.0)
            dz = dz.to(x_ptr.dtype.element_ty)
            if UPCAST:
                dz = dz.to(tl.float32)
                xv = xv.to(tl.float32)
            acc = tl.dot(dz, xv, acc, input_precision=DOT_PRECISION)
        g_ptrs += BLOCK_N * stride_gn
        y_ptrs += BLOCK_N * stride_yn
        z_ptrs += BLOCK_N * stride_zn
        x_ptrs += BLOCK_N * stride_xn

    if NEED_DW:
        # A split's slice is a base offset like a sample's: int64 (splits x B x M x K may pass 2^31).
        out = dw_ptr + split.to(tl.int64) * stride_dws + b * stride_dwb + offs_m[:, None] * stride_dwm \
            + offs_k[None, :] * stride_dwk
        tl.store(out, acc.to(dw_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])
    if NEED_DB:
        if pid_k == 0:
            tl.store(db_ptr + split.to(tl.int64) * stride_dbs + b * stride_dbb + offs_m * stride_dbm,
                     db.to(db_ptr.dtype.element_ty), mask=mask_m)


# ------------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------------


def launch_forward(xt: Tensor, weight: Tensor, bias: Optional[Tensor], bias_strides: tuple, yt: Tensor,
                   zt: Optional[Tensor], act: Activation, w0: float, dot: dict) -> None:
    """``_fwd_gemm_kernel``: act(x W^T + b) into ``yt``, and the pre-activation into ``zt`` if given;
    ``bias_strides`` are (sample, token, column), ``dot`` the dot constexprs (``_launch.dot_flags``)."""
    batch, n, k = xt.shape
    m = weight.shape[1]

    def grid(meta):
        return (check_grid(batch * triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(m, meta["BLOCK_M"])),)

    _fwd_gemm_kernel[grid](
        xt, weight, xt if bias is None else bias, yt, yt if zt is None else zt,
        n, m, k, n_bucket(n),
        *xt.stride(),
        *weight.stride(),
        *bias_strides,
        *yt.stride(),
        w0,
        ACT=act.code, HAS_BIAS=bias is not None, SAVE_PREACT=zt is not None,
        INDEX64=sample_index64(xt, weight, yt), **dot,
    )


def launch_dx(gt, weight, yt, zt, dxt, w0, flags, dot) -> None:
    """``_bwd_dx_gemm_kernel``; ``flags`` the activation's constexprs, ``dot`` the dot's."""
    batch, n, m = gt.shape
    k = weight.shape[2]

    def grid(meta):
        return (check_grid(batch * triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(k, meta["BLOCK_K"])),)

    _bwd_dx_gemm_kernel[grid](
        gt, weight, yt, zt, dxt,
        n, m, k, n_bucket(n),
        *gt.stride(), *weight.stride(), *yt.stride(), *zt.stride(), *dxt.stride(),
        w0,
        INDEX64=sample_index64(gt, weight, yt, zt, dxt), **flags, **dot,
    )


def launch_dw(gt, xt, yt, zt, dw, db, splits, rows_per_split, w0, flags, dot) -> None:
    """``_bwd_dw_gemm_kernel``: whichever of ``dw`` / ``db`` is not None, the tokens in ``splits`` slices of
    ``rows_per_split`` (float32 partial sums added up here when more than one)."""
    batch, n, k = xt.shape
    m = gt.shape[2]
    need_dw, need_db = dw is not None, db is not None
    if splits > 1:
        dw_out = torch.empty((splits, *dw.shape), dtype=torch.float32, device=xt.device) if need_dw else None
        db_out = torch.empty((splits, *db.shape), dtype=torch.float32, device=xt.device) if need_db else None
    else:
        dw_out = dw.unsqueeze(0) if need_dw else None
        db_out = db.unsqueeze(0) if need_db else None
    dw_arg = dw_out if need_dw else gt
    db_arg = db_out if need_db else gt
    dw_strides = dw_out.stride() if need_dw else (0, 0, 0, 0)
    db_strides = db_out.stride() if need_db else (0, 0, 0)

    def grid(meta):
        tiles_k = triton.cdiv(k, meta["BLOCK_K"]) if need_dw else 1
        return (check_grid(batch * splits * triton.cdiv(m, meta["BLOCK_M"]) * tiles_k),)

    _bwd_dw_gemm_kernel[grid](
        gt, xt, yt, zt, dw_arg, db_arg,
        n, m, k, n_bucket(n), rows_per_split, splits,
        *gt.stride(), *xt.stride(), *yt.stride(), *zt.stride(),
        *dw_strides, *db_strides,
        w0,
        NEED_DW=need_dw, NEED_DB=need_db, INDEX64=sample_index64(gt, xt, yt, zt), **flags, **dot,
    )
    if splits > 1:
        if need_dw:
            sum_splits(dw_out, dw, 0)
        if need_db:
            sum_splits(db_out, db, 0)
