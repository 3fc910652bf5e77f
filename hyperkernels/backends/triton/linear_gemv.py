r"""Per-sample linear, one token per sample (``N == 1``): a batched GEMV, configs, kernels and launchers.

Memory-bound: the floor is reading every weight once. A program owns ``BLOCK_B`` samples x a ``BLOCK_M x BLOCK_K``
weight tile; several samples per program keep the loads wide when the layer is small. Multiply-adds on CUDA cores in
float32; no ``tl.dot`` (it would waste 15 of 16 rows). The backward is one kernel that streams each weight once for
``dx`` and writes ``dW = dz x^T`` in the same pass. Tensors arrive as the token-major 3-D views ``linear.py``
describes; the token dim (size 1) is never indexed.
"""
from __future__ import annotations

from typing import Optional

import triton
import triton.language as tl
from torch import Tensor

from ...activations import Activation
from ._config import INTERPRET
from ._jit import block_offsets, load_dz, loop_bound
from ._launch import autotune_keep, check_grid, next_pow2, sample_index64
from .activations import activation_forward

# ------------------------------------------------------------------------------------------------------
# Autotune configs
# ------------------------------------------------------------------------------------------------------

# GEMV tiles: (elements per program, num_warps). 4096-8192 elements keep 32-64 loads in flight per thread,
# enough to cover memory latency; the split of those elements between samples, rows and columns is
# enumerated below and pruned to the layer's widths.
_GEMV_BUDGETS = [(4096, 4), (8192, 4), (8192, 8)]
_INTERPRETER_GEMV_TILE = (4, 32, 32, 4)  # (BLOCK_B, BLOCK_M, BLOCK_K, num_warps)
_GEMV_MAX_CONFIGS = 8  # benchmarked per (M, K, dtype) on first use; more than this costs seconds
_GEMV_UNALIGNED_ELEMS = 32  # weight elements per thread where each needs its own address (see _gemv_prune)


def _gemv_configs(interpret: bool = INTERPRET) -> list[triton.Config]:
    """Every (BLOCK_B, BLOCK_M, BLOCK_K) split of the element budgets (pruned per layer by ``_gemv_prune``)."""
    if interpret:
        bb, bm, bk, w = _INTERPRETER_GEMV_TILE
        return [triton.Config({"BLOCK_B": bb, "BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w)]
    configs = []
    for elems, warps in _GEMV_BUDGETS:
        for bm in (16, 32, 64, 128):
            for bk in (16, 32, 64, 128, 256):
                bb = elems // (bm * bk)
                # Many samples of a small layer per thread spill registers in the backward (sm_90 builds).
                if 1 <= bb <= 4 * warps and bb * bm * bk == elems:
                    configs.append(triton.Config({"BLOCK_B": bb, "BLOCK_M": bm, "BLOCK_K": bk}, num_warps=warps))
    return configs


def _gemv_prune(configs, named_args, **kwargs):
    """Keeps GEMV tiles that fit the layer, in tiers relaxed until one is non-empty: blocks no wider than its
    widths (rounded up to a power of two, at least 16); rows along K at least 64 wide where K allows, K being
    the weight's stride-1 dimension in every common layout; several samples per program only when a sample's
    whole weight fits in the tile (otherwise more of one sample's rows do the same job with better locality).
    Of those, the ones with the most useful (unmasked) elements in flight, at most ``_GEMV_MAX_CONFIGS``."""
    args = {**named_args, **kwargs}
    m, k = args["M"], args["K"]
    m2, k2 = max(16, next_pow2(m)), max(16, next_pow2(k))

    def blocks(cfg):
        return cfg.kwargs["BLOCK_B"], cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_K"]

    def fits(cfg):
        _, bm, bk = blocks(cfg)
        return bm <= m2 and bk <= k2

    def wide(cfg):
        return blocks(cfg)[2] >= min(64, k2)

    def one_sample_or_whole(cfg):
        bb, bm, bk = blocks(cfg)
        return bb == 1 or (bm >= m and bk >= k)

    def one_sample_or_all_rows(cfg):
        bb, bm, bk = blocks(cfg)
        return bb == 1 or bm >= m or bk >= k

    # A weight whose rows are not 16-byte aligned (or not contiguous) is loaded element by element, each with its
    # own 64-bit address: 64 elements per thread then spill (sm_80 / sm_90, K = 33: ~300 B), 32 do not.
    elem = args["w_ptr"].element_size()
    unaligned = args["stride_wk"] != 1 or (args["stride_wm"] * elem) % 16 != 0

    def per_thread_ok(cfg):
        bb, bm, bk = blocks(cfg)
        return not unaligned or bb * bm * bk <= _GEMV_UNALIGNED_ELEMS * 32 * cfg.num_warps

    tiers = [
        lambda c: fits(c) and wide(c) and one_sample_or_whole(c),
        lambda c: fits(c) and one_sample_or_whole(c),
        lambda c: fits(c) and one_sample_or_all_rows(c),
        fits,
    ]
    configs = [c for c in configs if per_thread_ok(c)] or list(configs)
    kept = list(configs)
    for tier in tiers:
        if any(tier(c) for c in configs):
            kept = [c for c in configs if tier(c)]
            break

    def useful(cfg):
        bb, bm, bk = blocks(cfg)
        return bb * min(bm, m) * min(bk, k)

    kept.sort(key=useful, reverse=True)
    best = useful(kept[0])
    return autotune_keep([c for c in kept if 2 * useful(c) >= best], _GEMV_MAX_CONFIGS)


# ------------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------------


@triton.autotune(
    configs=_gemv_configs(),
    key=["M", "K"],
    prune_configs_by={"early_config_prune": _gemv_prune},
)
@triton.jit
def _fwd_gemv_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, z_ptr,
    B, M, K,
    stride_xb, stride_xk,
    stride_wb, stride_wm, stride_wk,
    stride_bb, stride_bm,
    stride_yb, stride_ym,
    w0,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE_PREACT: tl.constexpr, INDEX64: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """act(W[b] x[b] + bias[b]) for BLOCK_B samples x BLOCK_M outputs, one token per sample."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    pid_b = pid // tiles_m
    pid_m = pid % tiles_m

    offs_b = block_offsets(pid_b, BLOCK_B, False)  # samples: their offsets are int64 rows below
    offs_m = block_offsets(pid_m, BLOCK_M, INDEX64)
    offs_k = block_offsets(0, BLOCK_K, INDEX64)
    mask_b = offs_b < B
    mask_bm = mask_b[:, None] & (offs_m < M)[None, :]
    rows = offs_b.to(tl.int64)

    x_ptrs = x_ptr + rows[:, None] * stride_xb + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + (rows[:, None] * stride_wb + offs_m[None, :] * stride_wm)[:, :, None] \
        + offs_k[None, None, :] * stride_wk
    acc = tl.zeros((BLOCK_B, BLOCK_M), dtype=tl.float32)
    for kk in range(0, loop_bound(tl.cdiv(K, BLOCK_K))):
        mask_k = offs_k < K - kk * BLOCK_K
        xv = tl.load(x_ptrs, mask=mask_b[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        wv = tl.load(w_ptrs, mask=mask_bm[:, :, None] & mask_k[None, None, :], other=0.0).to(tl.float32)
        acc += tl.sum(wv * xv[:, None, :], axis=2)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        bias = tl.load(bias_ptr + rows[:, None] * stride_bb + offs_m[None, :] * stride_bm, mask=mask_bm, other=0.0)
        acc += bias.to(tl.float32)
    out = rows[:, None] * stride_yb + offs_m[None, :] * stride_ym
    if SAVE_PREACT:
        tl.store(z_ptr + out, acc.to(z_ptr.dtype.element_ty), mask=mask_bm)
    y = activation_forward(acc, w0, ACT)
    tl.store(y_ptr + out, y.to(y_ptr.dtype.element_ty), mask=mask_bm)


@triton.autotune(
    configs=_gemv_configs(),
    key=["M", "K"],
    prune_configs_by={"early_config_prune": _gemv_prune},
)
@triton.jit
def _bwd_gemv_kernel(
    g_ptr, x_ptr, w_ptr, y_ptr, z_ptr, dx_ptr, dw_ptr, db_ptr,
    B, M, K,
    stride_gb, stride_gm,
    stride_xb, stride_xk,
    stride_wb, stride_wm, stride_wk,
    stride_yb, stride_ym,
    stride_zb, stride_zm,
    stride_dxb, stride_dxk,
    stride_dwb, stride_dwm, stride_dwk,
    stride_dbb, stride_dbm,
    w0,
    ACT: tl.constexpr, LOAD_Y: tl.constexpr, LOAD_Z: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, INDEX64: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The whole backward for one token per sample. A program owns BLOCK_B samples x BLOCK_K inputs and walks
    the outputs M: each weight tile is read once (dx += dz W) and the matching dW tile (dz x^T) written in the
    same step; the programs of the first K block also write db = dz."""
    pid = tl.program_id(0)
    tiles_k = tl.cdiv(K, BLOCK_K)
    pid_b = pid // tiles_k
    pid_k = pid % tiles_k

    offs_b = block_offsets(pid_b, BLOCK_B, False)
    offs_k = block_offsets(pid_k, BLOCK_K, INDEX64)
    offs_m = block_offsets(0, BLOCK_M, INDEX64)
    mask_b = offs_b < B
    mask_k = offs_k < K
    mask_bk = mask_b[:, None] & mask_k[None, :]
    rows = offs_b.to(tl.int64)

    if NEED_DW:
        xv = tl.load(x_ptr + rows[:, None] * stride_xb + offs_k[None, :] * stride_xk, mask=mask_bk, other=0.0)
        xv = xv.to(tl.float32)
    acc = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.float32)
    for mm in range(0, loop_bound(tl.cdiv(M, BLOCK_M))):
        cur_m = mm * BLOCK_M + offs_m
        mask_bm = mask_b[:, None] & (cur_m < M)[None, :]
        dz = load_dz(g_ptr + rows[:, None] * stride_gb + cur_m[None, :] * stride_gm,
                     y_ptr + rows[:, None] * stride_yb + cur_m[None, :] * stride_ym,
                     z_ptr + rows[:, None] * stride_zb + cur_m[None, :] * stride_zm,
                     mask_bm, w0, ACT, LOAD_Y, LOAD_Z)
        if NEED_DB:
            if pid_k == 0:
                tl.store(db_ptr + rows[:, None] * stride_dbb + cur_m[None, :] * stride_dbm,
                         dz.to(db_ptr.dtype.element_ty), mask=mask_bm)
        mask_bmk = mask_bm[:, :, None] & mask_k[None, None, :]
        if NEED_DX:
            w_ptrs = w_ptr + (rows[:, None] * stride_wb + cur_m[None, :] * stride_wm)[:, :, None] \
                + offs_k[None, None, :] * stride_wk
            wv = tl.load(w_ptrs, mask=mask_bmk, other=0.0).to(tl.float32)
            acc += tl.sum(wv * dz[:, :, None], axis=1)
        if NEED_DW:
            dw_ptrs = dw_ptr + (rows[:, None] * stride_dwb + cur_m[None, :] * stride_dwm)[:, :, None] \
                + offs_k[None, None, :] * stride_dwk
            tl.store(dw_ptrs, (dz[:, :, None] * xv[:, None, :]).to(dw_ptr.dtype.element_ty), mask=mask_bmk)
    if NEED_DX:
        tl.store(dx_ptr + rows[:, None] * stride_dxb + offs_k[None, :] * stride_dxk,
                 acc.to(dx_ptr.dtype.element_ty), mask=mask_bk)


# ------------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------------


def launch_forward(xt: Tensor, weight: Tensor, bias: Optional[Tensor], bias_strides: tuple, yt: Tensor,
                   zt: Optional[Tensor], act: Activation, w0: float) -> None:
    """``_fwd_gemv_kernel`` over ``(B, 1, K)`` views: act(x W^T + b) into ``yt``, and the pre-activation into ``zt``
    if given; ``bias_strides`` are (sample, token, column)."""
    batch, _, k = xt.shape
    m = weight.shape[1]

    def grid(meta):
        return (check_grid(triton.cdiv(batch, meta["BLOCK_B"]) * triton.cdiv(m, meta["BLOCK_M"])),)

    _fwd_gemv_kernel[grid](
        xt, weight, xt if bias is None else bias, yt, yt if zt is None else zt,
        batch, m, k,
        xt.stride(0), xt.stride(2),
        weight.stride(0), weight.stride(1), weight.stride(2),
        bias_strides[0], bias_strides[2],
        yt.stride(0), yt.stride(2),
        w0,
        ACT=act.code, HAS_BIAS=bias is not None, SAVE_PREACT=zt is not None,
        INDEX64=sample_index64(xt, weight, yt),
    )


def launch_backward(gt, xt, weight, yt, zt, dxt, dw, db, w0, flags) -> None:
    """``_bwd_gemv_kernel``: whichever of ``dxt`` / ``dw`` / ``db`` is not None; ``flags`` the activation's."""
    batch, _, k = xt.shape
    m = weight.shape[1]
    need_dx, need_dw, need_db = dxt is not None, dw is not None, db is not None
    dxt_arg = dxt if need_dx else gt
    dw_arg = dw if need_dw else gt
    db_arg = db if need_db else gt
    dw_strides = dw.stride() if need_dw else (0, 0, 0)
    db_strides = db.stride() if need_db else (0, 0)

    def grid(meta):
        return (check_grid(triton.cdiv(batch, meta["BLOCK_B"]) * triton.cdiv(k, meta["BLOCK_K"])),)

    _bwd_gemv_kernel[grid](
        gt, xt, weight, yt, zt, dxt_arg, dw_arg, db_arg,
        batch, m, k,
        gt.stride(0), gt.stride(2),
        xt.stride(0), xt.stride(2),
        *weight.stride(),
        yt.stride(0), yt.stride(2),
        zt.stride(0), zt.stride(2),
        dxt_arg.stride(0), dxt_arg.stride(2),
        *dw_strides,
        *db_strides,
        w0,
        NEED_DX=need_dx, NEED_DW=need_dw, NEED_DB=need_db, INDEX64=sample_index64(gt, xt, weight, yt, zt), **flags,
    )
