r"""Per-sample linear / 1x1 conv in Triton: ``y[b] = act(x[b] @ W[b]^T + bias[b])``, forward and backward.

Sections, in the order of Triton's matmul tutorial: autotune configs, kernels, launchers.

Shapes. Every tensor is handled as a token-major 3-D view through its strides, so one kernel serves both
layouts: ``x (B, N, K)``, ``W (B, M, K)``, ``bias (B, M)``, ``y / preact / grad_y (B, N, M)``,
``dx (B, N, K)``, ``dW (B, M, K)``, ``db (B, M)``. A channel-major tensor ``(B, C, S)`` enters as its
transpose ``(B, S, C)`` (a view, never a copy); the outputs are allocated contiguous in the op's layout and
written through the transposed view.

Two regimes:

* ``N == 1``, a batched GEMV: memory-bound, the floor is reading every weight once. A program owns
  ``BLOCK_B`` samples x a ``BLOCK_M x BLOCK_K`` weight tile; several samples per program keep the loads
  wide when the layer is small. Multiply-adds on CUDA cores in float32; no ``tl.dot`` (it would waste 15 of
  16 rows). The backward is one kernel that streams each weight once for ``dx`` and writes ``dW = dz x^T``
  in the same pass.
* ``N > 1``, a per-sample GEMM on tensor cores with ``tl.dot`` and float32 accumulation: forward
  ``(N, K) @ (K, M)``; backward ``dx = dz @ W`` ``(N, M) @ (M, K)`` and ``dW = dz^T @ x`` ``(M, N) @ (N, K)``
  in two kernels, ``db`` summed by the ``dW`` kernel. Both backward kernels recompute
  ``dz = grad_y * f'(.)`` from ``grad_y`` and ``y`` or ``preact`` as they load it: cheaper than writing
  ``dz`` out and reading it back twice.

A weight shared by every sample (batch stride 0) with ``N == 1`` is one GEMM, ``(B, K) @ (K, M)``: the
launchers fold the batch into the rows and run the GEMM kernels on it.

Grids are 1-D: ``B`` times the tiles of one sample, sample outermost, so the tiles of one sample run side by
side and share its weight in L2, and no grid axis can overflow (axis 0 allows 2^31 - 1 programs; axes 1 and 2
only 65535). Per-sample base offsets, and those of the dW kernel's split slices, are computed in int64
(``B * N * K`` may pass 2^31); offsets inside one sample stay int32 unless one sample alone spans 2^31 elements
(``INDEX64``).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...activations import ACTIVATIONS, Activation
from .activations import activation_forward, activation_grad

from .._precision import tf32_allowed
from ._compat import loop_bound
from ._config import AUTOTUNE, INTERPRET

_ACT_NONE = ACTIVATIONS["none"]

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
# float32 only: the tiles above that fit _REGISTER_BUDGET at tf32x3 are few (64 x 64 x 32 on 4 warps and smaller),
# so these spread 64-128 wide tiles over 8 warps. 16-bit operands have the tiles above.
_GEMM_TILES_F32 = [
    (128, 64, 32, 8, 3),
    (64, 128, 32, 8, 3),
    (64, 64, 32, 8, 4),
]
# The interpreter runs one program at a time in numpy: few, large programs are fastest there. Autotuning with
# more than one config cannot run on CPU at all (it benchmarks with a GPU timer), so it gets this one.
_INTERPRETER_GEMM_TILE = (32, 32, 32, 4, 1)

# Shared memory a GEMM config may ask for per program: below the 164 KiB of an A100 and the 227 KiB of an
# H100, with room for the epilogue's layout conversion.
_SMEM_BUDGET = 160 * 1024

# Registers per thread a GEMM config may need, estimated as its float32 accumulator plus one stage of its operand
# tiles: 16-bit operands pack two to a register, float32 ones take two (tf32x3 holds a TF32 high part and a
# remainder of each; tf32 holds one, but counted so its tiles spilled 40-244 B at unaligned shapes on sm_90, so
# float32 gets the same tiles at either precision). Read off sm_90 builds (tests/offline_compile.py): float32 tiles
# above it spilled with gelu on unaligned shapes (tf32x3: 64x128x32 on 4 warps 364 B, 64x64x64 600-1950 B, the dW
# kernel's 64x64x32 on 4 warps, at 128, 12 B; ieee likewise); every 16-bit tile of the table is within it where
# rows are aligned. At
# odd strides, 16-bit tiles hold every pipeline stage in registers (bfloat16, 33 x 65 x 33: 64x128x32 on 4 warps
# and 4 stages 200 B, the dx and dW kernels' 64-deep tiles 1-2.4 KB), which the estimate counts.
_REGISTER_BUDGET = 112

# GEMV tiles: (elements per program, num_warps). 4096-8192 elements keep 32-64 loads in flight per thread,
# enough to cover memory latency; the split of those elements between samples, rows and columns is
# enumerated below and pruned to the layer's widths.
_GEMV_BUDGETS = [(4096, 4), (8192, 4), (8192, 8)]
_INTERPRETER_GEMV_TILE = (4, 32, 32, 4)  # (BLOCK_B, BLOCK_M, BLOCK_K, num_warps)

# Rows of tokens below which an extra dW split is not worth its float32 partial-sum traffic.
_MIN_ROWS_PER_SPLIT = 512


def _next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _n_bucket(n: int) -> int:
    """The token count as an autotune key: powers of two, capped, so that every N does not retune."""
    return min(_next_pow2(n), 8192)


def _gemm_configs(rows: str, cols: str, red: str, interpret: bool = INTERPRET) -> list[triton.Config]:
    tiles = [_INTERPRETER_GEMM_TILE] if interpret else _GEMM_TILES + _GEMM_TILES_F32
    return [
        triton.Config({rows: r, cols: c, red: k}, num_warps=w, num_stages=s) for r, c, k, w, s in tiles
    ]


def _gemm_prune(rows: str, cols: str, red: str, dims: dict[str, str], dtype_arg: str, forms_dz: bool = False,
                operand_strides: tuple = ()):
    """An ``early_config_prune`` for a GEMM kernel; ``dims`` maps each block name to the size argument it
    tiles. Keeps the configs that fit in shared memory, whose tiles overshoot the problem least (sizes rounded
    up to a power of two, at least 16, tl.dot's smallest), and, among those, whose output tile is not needlessly
    small (at least 64 wide where the problem is) so that few configs are benchmarked.

    ``forms_dz``: the kernel's left operand is dz = grad_y * f'(.), a (rows x red) tile streamed from grad_y and
    from y or preact and turned into dz in registers. That costs a second pipelined tile of shared memory, and
    more than 32 of its elements per thread spill registers (seen in sm_90 builds with gelu), so both are
    bounded. Every config must also fit ``_REGISTER_BUDGET`` at the kernel's dot precision, counting every pipeline
    stage when a 16-bit operand's ``operand_strides`` (stride argument names) are odd. (The autotune key holds the
    sizes, not the strides: a process that meets one layer's sizes at two alignments keeps the first one's pick.)"""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        elem = args[dtype_arg].element_size()
        need = {name: max(16, _next_pow2(args[size])) for name, size in dims.items()}
        second = 1 if forms_dz and (args.get("LOAD_Y") or args.get("LOAD_Z")) else 0
        operand_registers = _operand_registers(elem)
        # 16-bit rows at an odd element stride are only 2-byte aligned: too little for the asynchronous copies that
        # pipeline tiles through shared memory, so every stage in flight is held in registers instead.
        staged = elem == 2 and any(args[name] % 2 for name in operand_strides)

        def overshoot(cfg):
            f = 1
            for name in (rows, cols, red):
                f *= max(1, cfg.kwargs[name] // need[name])
            return f

        def fits(cfg):
            kw = cfg.kwargs
            if elem == 2 and (kw[rows], kw[cols], kw[red], cfg.num_warps, cfg.num_stages) in _F32_ONLY:
                return False
            operands = (kw[rows] * (1 + second) + kw[cols]) * kw[red]
            smem = cfg.num_stages * operands * elem
            threads = 32 * cfg.num_warps
            in_flight = operands * operand_registers * (cfg.num_stages if staged else 1)
            registers = (kw[rows] * kw[cols] + in_flight) / threads <= _REGISTER_BUDGET
            dz_tile = not forms_dz or kw[rows] * kw[red] <= 32 * threads
            return smem <= _SMEM_BUDGET and registers and dz_tile

        def big_enough(cfg):
            kw = cfg.kwargs
            return (kw[rows] >= min(64, need[rows]) and kw[cols] >= min(64, need[cols])
                    and kw[red] >= min(32, need[red]))

        kept = [c for c in configs if fits(c)] or list(configs)
        least = min(overshoot(c) for c in kept)
        kept = [c for c in kept if overshoot(c) == least]
        kept = [c for c in kept if big_enough(c)] or kept
        return kept[:_GEMM_MAX_CONFIGS] if AUTOTUNE else kept[:1]

    return prune


_F32_ONLY = set(_GEMM_TILES_F32)
_GEMM_MAX_CONFIGS = 8  # benchmarked per shape on first use


def _operand_registers(elem: int) -> float:
    """Registers per operand element in a tensor-core dot, as ``_REGISTER_BUDGET`` counts them."""
    return 0.5 if elem == 2 else 2.0


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


_GEMV_MAX_CONFIGS = 8  # benchmarked per (M, K, dtype) on first use; more than this costs seconds
_GEMV_UNALIGNED_ELEMS = 32  # weight elements per thread where each needs its own address (see _gemv_prune)


def _gemv_prune(configs, named_args, **kwargs):
    """Keeps GEMV tiles that fit the layer, in tiers relaxed until one is non-empty: blocks no wider than its
    widths (rounded up to a power of two, at least 16); rows along K at least 64 wide where K allows, K being
    the weight's stride-1 dimension in every common layout; several samples per program only when a sample's
    whole weight fits in the tile (otherwise more of one sample's rows do the same job with better locality).
    Of those, the ones with the most useful (unmasked) elements in flight, at most ``_GEMV_MAX_CONFIGS``."""
    args = {**named_args, **kwargs}
    m, k = args["M"], args["K"]
    m2, k2 = max(16, _next_pow2(m)), max(16, _next_pow2(k))

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
    return [c for c in kept if 2 * useful(c) >= best][:_GEMV_MAX_CONFIGS if AUTOTUNE else 1]


# ------------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------------


@triton.jit
def _load_dz(g_ptrs, y_ptrs, z_ptrs, mask, w0,
             ACT: tl.constexpr, LOAD_Y: tl.constexpr, LOAD_Z: tl.constexpr):
    """dz = grad_y * f'(.) for one tile, in float32, 0 where masked; reads y or preact only if f' needs it."""
    g = tl.load(g_ptrs, mask=mask, other=0.0)
    y = g
    z = g
    if LOAD_Y:
        y = tl.load(y_ptrs, mask=mask, other=0.0)
    if LOAD_Z:
        z = tl.load(z_ptrs, mask=mask, other=0.0)
    return activation_grad(g, z, y, w0, ACT)


@triton.autotune(
    configs=_gemm_configs("BLOCK_N", "BLOCK_M", "BLOCK_K"),
    key=["M", "K", "N_BUCKET"],
    prune_configs_by={"early_config_prune": _gemm_prune(
        "BLOCK_N", "BLOCK_M", "BLOCK_K", {"BLOCK_N": "N", "BLOCK_M": "M", "BLOCK_K": "K"}, "x_ptr",
        operand_strides=("stride_xn", "stride_xk", "stride_wm", "stride_wk"))},
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
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles = tl.cdiv(N, BLOCK_N) * tiles_m
    b = (pid // tiles).to(tl.int64)
    pid_n = (pid % tiles) // tiles_m
    pid_m = pid % tiles_m

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    if INDEX64:
        offs_n = offs_n.to(tl.int64)
        offs_m = offs_m.to(tl.int64)
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

    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    if INDEX64:
        offs_m = offs_m.to(tl.int64)
        offs_k = offs_k.to(tl.int64)
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

    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    if INDEX64:
        offs_k = offs_k.to(tl.int64)
        offs_m = offs_m.to(tl.int64)
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
        dz = _load_dz(g_ptr + rows[:, None] * stride_gb + cur_m[None, :] * stride_gm,
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


@triton.autotune(
    configs=_gemm_configs("BLOCK_N", "BLOCK_K", "BLOCK_M"),
    key=["M", "K", "N_BUCKET"],
    prune_configs_by={"early_config_prune": _gemm_prune(
        "BLOCK_N", "BLOCK_K", "BLOCK_M", {"BLOCK_N": "N", "BLOCK_M": "M", "BLOCK_K": "K"}, "w_ptr", forms_dz=True,
        operand_strides=("stride_gn", "stride_gm", "stride_wm", "stride_wk", "stride_yn", "stride_ym", "stride_zn",
                         "stride_zm"))},
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
    pid = tl.program_id(0)
    tiles_k = tl.cdiv(K, BLOCK_K)
    tiles = tl.cdiv(N, BLOCK_N) * tiles_k
    b = (pid // tiles).to(tl.int64)
    pid_n = (pid % tiles) // tiles_k
    pid_k = pid % tiles_k

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    if INDEX64:
        offs_n = offs_n.to(tl.int64)
        offs_k = offs_k.to(tl.int64)
    mask_n = offs_n < N
    mask_k = offs_k < K

    g_ptrs = g_ptr + b * stride_gb + offs_n[:, None] * stride_gn + offs_m[None, :] * stride_gm
    y_ptrs = y_ptr + b * stride_yb + offs_n[:, None] * stride_yn + offs_m[None, :] * stride_ym
    z_ptrs = z_ptr + b * stride_zb + offs_n[:, None] * stride_zn + offs_m[None, :] * stride_zm
    w_ptrs = w_ptr + b * stride_wb + offs_m[:, None] * stride_wm + offs_k[None, :] * stride_wk
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for mm in range(0, loop_bound(tl.cdiv(M, BLOCK_M))):
        m_left = M - mm * BLOCK_M
        dz = _load_dz(g_ptrs, y_ptrs, z_ptrs, mask_n[:, None] & (offs_m[None, :] < m_left), w0,
                      ACT, LOAD_Y, LOAD_Z)
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
    prune_configs_by={"early_config_prune": _gemm_prune(
        "BLOCK_M", "BLOCK_K", "BLOCK_N", {"BLOCK_N": "N", "BLOCK_M": "M", "BLOCK_K": "K"}, "x_ptr", forms_dz=True,
        operand_strides=("stride_gn", "stride_gm", "stride_xn", "stride_xk", "stride_yn", "stride_ym", "stride_zn",
                         "stride_zm"))},
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
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rel_n = tl.arange(0, BLOCK_N)
    offs_n = n_start + rel_n
    if INDEX64:
        offs_m = offs_m.to(tl.int64)
        offs_k = offs_k.to(tl.int64)
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
        dz = _load_dz(g_ptrs, y_ptrs, z_ptrs, mask_m[:, None] & (rel_n[None, :] < n_left), w0,
                      ACT, LOAD_Y, LOAD_Z)
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

_MAX_GRID = 2**31 - 1
_INT32_MAX = 2**31 - 1


def _token_major(t: Tensor, channel_major: bool) -> Tensor:
    """The (B, tokens, channels) view of a tensor in the op's layout (a transpose for channel-major)."""
    return t.transpose(1, 2) if channel_major else t


def _sample_extent(t: Tensor) -> int:
    """The largest element offset inside one sample of a 3-D view (sizes times strides, batch excluded)."""
    return sum((s - 1) * abs(st) for s, st in zip(t.shape[1:], t.stride()[1:]))


def _index64(*views: Tensor) -> bool:
    return any(_sample_extent(v) > _INT32_MAX for v in views)


def _fold_batch(t: Tensor) -> Tensor:
    """(B, 1, C) -> (1, B, C), a view: with a shared weight, the samples of a GEMV are the rows of one GEMM."""
    return t.as_strided((1, t.shape[0], t.shape[2]), (0, t.stride(0), t.stride(2)))


def _dot_precision(dtype: torch.dtype) -> str:
    """float32 dots: ``tf32`` exactly when PyTorch's own matmuls may use it, else ``tf32x3``; other dtypes ignore it.

    ``tf32x3`` splits each operand into a TF32 high part and a TF32 remainder and sums three tensor-core products
    (dropping low x low): float32 accuracy at tensor-core speed. Measured against a float64 reference by emulating
    the rounding on CPU (``test_tf32x3_is_as_accurate_as_ieee`` in tests/test_triton_linear.py): 1.0-1.4x the error
    of an ieee float32 matmul for depths 16-1024, where one TF32 product is ~1000x worse. ``ieee`` runs on CUDA cores
    with the whole tile's operands in registers: the tiles tuned for tensor cores spilled kilobytes there (sm_90
    builds, tests/offline_compile.py), and CUDA-core FMA has a fraction of the tensor cores' throughput (not yet
    measured here). The interpreter computes every precision in float32."""
    if dtype != torch.float32:
        return "ieee"
    return "tf32" if tf32_allowed() else "tf32x3"


def _upcast(dtype: torch.dtype) -> bool:
    return INTERPRET and dtype == torch.bfloat16


def _check_grid(programs: int) -> int:
    if programs > _MAX_GRID:
        raise ValueError(f"problem too large for one launch: {programs} programs > {_MAX_GRID}")
    return programs


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _device_sms(device: torch.device) -> Optional[int]:
    """The SM count of a CUDA device; None elsewhere (CPU tensors under the interpreter, where parallelism is moot).
    The one place the launchers learn the GPU's size: the offline compile check (tests/offline_compile.py) replaces
    it to take the GPU paths (split reductions, atomic dW) without a GPU."""
    if device.type != "cuda":
        return None
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _dw_splits(batch: int, m: int, k: int, n: int, device: torch.device) -> int:
    """How many slices of the tokens the dW kernel splits into: more than one only when one tile per
    (sample, 64x64 block of dW) would leave most of the GPU idle and there are tokens enough to share."""
    sms = _device_sms(device)
    if sms is None or n < 2 * _MIN_ROWS_PER_SPLIT:
        return 1
    tiles = batch * triton.cdiv(m, 64) * triton.cdiv(k, 64)
    if tiles >= 2 * sms:
        return 1
    return max(1, min(triton.cdiv(4 * sms, tiles), n // _MIN_ROWS_PER_SPLIT))


def _device_guard(t: Tensor):
    """Kernels launch on the current device: make it the tensors' device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _launch_forward(xt: Tensor, weight: Tensor, bias: Optional[Tensor], yt: Tensor, zt: Optional[Tensor],
                    act: Activation, w0: float) -> None:
    """Writes act(x W^T + b) into the token-major view ``yt`` (and the pre-activation into ``zt`` if given)."""
    batch, n, k = xt.shape
    m = weight.shape[1]
    save = zt is not None
    z_arg = zt if save else yt
    bias_arg = bias if bias is not None else xt
    bias_strides = (bias.stride(0), 0, bias.stride(1)) if bias is not None else (0, 0, 0)

    if n == 1 and weight.stride(0) == 0:
        # One shared weight: the B single tokens are the rows of one GEMM; the bias keeps a per-row stride.
        xt, yt, z_arg = _fold_batch(xt), _fold_batch(yt), _fold_batch(z_arg)
        bias_strides = (0, bias_strides[0], bias_strides[2])
        batch, n = 1, batch

    if n == 1:
        index64 = _index64(xt, weight, yt)
        grid = lambda meta: (_check_grid(triton.cdiv(batch, meta["BLOCK_B"]) * triton.cdiv(m, meta["BLOCK_M"])),)
        _fwd_gemv_kernel[grid](
            xt, weight, bias_arg, yt, z_arg,
            batch, m, k,
            xt.stride(0), xt.stride(2),
            weight.stride(0), weight.stride(1), weight.stride(2),
            bias_strides[0], bias_strides[2],
            yt.stride(0), yt.stride(2),
            w0,
            ACT=act.code, HAS_BIAS=bias is not None, SAVE_PREACT=save, INDEX64=index64,
        )
        return

    index64 = _index64(xt, weight, yt)
    grid = lambda meta: (_check_grid(batch * triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(m, meta["BLOCK_M"])),)
    _fwd_gemm_kernel[grid](
        xt, weight, bias_arg, yt, z_arg,
        n, m, k, _n_bucket(n),
        *xt.stride(),
        *weight.stride(),
        *bias_strides,
        *yt.stride(),
        w0,
        ACT=act.code, HAS_BIAS=bias is not None, SAVE_PREACT=save,
        DOT_PRECISION=_dot_precision(xt.dtype), UPCAST=_upcast(xt.dtype), INDEX64=index64,
    )


def _empty_problem(x: Tensor, weight: Tensor) -> bool:
    return x.numel() == 0 or weight.numel() == 0


def linear_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: Activation, w0: float,
                   channel_major: bool, save_preact: bool) -> tuple[Tensor, Tensor]:
    """See ``hyperkernels/backends/__init__.py``: ``(y, preact)``, both contiguous in the op's layout."""
    if _empty_problem(x, weight):
        from ..torch import linear as torch_linear  # nothing to launch; keeps every empty-size rule in one place
        return torch_linear.linear_forward(x, weight, bias, act, w0, channel_major, save_preact, "bmm")
    xt = _token_major(x, channel_major)
    batch, n, _ = xt.shape
    m = weight.shape[1]
    shape = (batch, m, n) if channel_major else (batch, n, m)
    keep = save_preact and act.needs_preactivation
    y = x.new_empty(shape)
    z = x.new_empty(shape) if keep else None
    with _device_guard(x):
        _launch_forward(xt, weight, bias, _token_major(y, channel_major),
                        _token_major(z, channel_major) if keep else None, act, w0)
    return y, (z if keep else x.new_empty(0))


def linear_backward(grad_y: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], y: Tensor, preact: Tensor,
                    act: Activation, w0: float, channel_major: bool, output_mask) -> tuple:
    """See ``hyperkernels/backends/__init__.py``: ``(dx, dweight, dbias)``, None where not asked for."""
    need_dx, need_dw, need_db = output_mask
    need_db = need_db and bias is not None
    if _empty_problem(x, weight):
        from ..torch import linear as torch_linear
        return torch_linear.linear_backward(grad_y, x, weight, bias, y, preact, act, w0, channel_major,
                                            (need_dx, need_dw, need_db), "bmm")
    dtype = x.dtype
    xt = _token_major(x, channel_major)
    batch, n, k = xt.shape
    gt = _token_major(grad_y, channel_major)
    load_z = act.needs_preactivation
    load_y = not load_z and act.code != _ACT_NONE.code
    dx = x.new_empty(x.shape) if need_dx else None  # contiguous in x's layout
    dw = x.new_empty(weight.shape) if need_dw else None
    db = x.new_empty(weight.shape[:2]) if need_db else None

    with _device_guard(x):
        if load_z and preact.numel() == 0:  # the forward kept no pre-activation: recompute it (one GEMM)
            preact = x.new_empty(y.shape)
            _launch_forward(xt, weight, bias, _token_major(preact, channel_major), None, _ACT_NONE, w0)
        yt = _token_major(y, channel_major) if load_y else gt
        zt = _token_major(preact, channel_major) if load_z else gt
        dxt = _token_major(dx, channel_major) if need_dx else None
        flags = dict(ACT=act.code, LOAD_Y=load_y, LOAD_Z=load_z)
        gemm_flags = dict(DOT_PRECISION=_dot_precision(dtype), UPCAST=_upcast(dtype))

        if n == 1 and need_dx and weight.stride(0) == 0:
            # Shared weight: dx of all B single tokens is one GEMM (see _launch_forward).
            _launch_dx(_fold_batch(gt), weight, _fold_batch(yt), _fold_batch(zt), _fold_batch(dxt), w0,
                       flags, gemm_flags)
            need_dx = False
        if n == 1:
            if need_dx or need_dw or need_db:
                _launch_gemv_backward(gt, xt, weight, yt, zt, dxt if need_dx else None, dw, db, w0, flags)
        else:
            if need_dx:
                _launch_dx(gt, weight, yt, zt, dxt, w0, flags, gemm_flags)
            if need_dw or need_db:
                _launch_dw(gt, xt, yt, zt, dw, db, w0, flags, gemm_flags)
    return dx, dw, db


def _launch_gemv_backward(gt, xt, weight, yt, zt, dxt, dw, db, w0, flags):
    batch, _, k = xt.shape
    m = weight.shape[1]
    need_dx, need_dw, need_db = dxt is not None, dw is not None, db is not None
    dxt_arg = dxt if need_dx else gt
    dw_arg = dw if need_dw else gt
    db_arg = db if need_db else gt
    dw_strides = dw.stride() if need_dw else (0, 0, 0)
    db_strides = db.stride() if need_db else (0, 0)
    grid = lambda meta: (_check_grid(triton.cdiv(batch, meta["BLOCK_B"]) * triton.cdiv(k, meta["BLOCK_K"])),)
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
        NEED_DX=need_dx, NEED_DW=need_dw, NEED_DB=need_db, INDEX64=_index64(gt, xt, weight, yt, zt), **flags,
    )


def _launch_dx(gt, weight, yt, zt, dxt, w0, flags, gemm_flags):
    batch, n, m = gt.shape
    k = weight.shape[2]
    grid = lambda meta: (_check_grid(batch * triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(k, meta["BLOCK_K"])),)
    _bwd_dx_gemm_kernel[grid](
        gt, weight, yt, zt, dxt,
        n, m, k, _n_bucket(n),
        *gt.stride(), *weight.stride(), *yt.stride(), *zt.stride(), *dxt.stride(),
        w0,
        INDEX64=_index64(gt, weight, yt, zt, dxt), **flags, **gemm_flags,
    )


def _launch_dw(gt, xt, yt, zt, dw, db, w0, flags, gemm_flags):
    batch, n, k = xt.shape
    m = gt.shape[2]
    need_dw, need_db = dw is not None, db is not None
    splits = _dw_splits(batch, m, k, n, xt.device)
    rows_per_split = triton.cdiv(triton.cdiv(n, splits), 128) * 128 if splits > 1 else n
    splits = triton.cdiv(n, rows_per_split)
    if splits > 1:  # float32 partial sums, one slice per split, added up below
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
        return (_check_grid(batch * splits * triton.cdiv(m, meta["BLOCK_M"]) * tiles_k),)

    _bwd_dw_gemm_kernel[grid](
        gt, xt, yt, zt, dw_arg, db_arg,
        n, m, k, _n_bucket(n), rows_per_split, splits,
        *gt.stride(), *xt.stride(), *yt.stride(), *zt.stride(),
        *dw_strides, *db_strides,
        w0,
        NEED_DW=need_dw, NEED_DB=need_db, INDEX64=_index64(gt, xt, yt, zt), **flags, **gemm_flags,
    )
    if splits > 1:
        if need_dw:
            torch.sum(dw_out, dim=0, out=dw) if dw.dtype == torch.float32 else dw.copy_(dw_out.sum(0))
        if need_db:
            torch.sum(db_out, dim=0, out=db) if db.dtype == torch.float32 else db.copy_(db_out.sum(0))
