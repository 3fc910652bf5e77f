r"""The fused MLP with several points per sample (``N > 1``): every layer as ``tl.dot`` on a tile of points, kernels
and launchers.

A program owns one tile of ``BLOCK_N`` points of one sample and runs every layer with ``tl.dot`` (float32
accumulation; float32 inputs as tf32 exactly when PyTorch's matmuls may use it, else tf32x3): each weight is read once
per program (from L2 for all but the first program of a sample: a sample's tiles are adjacent in the grid). The
backward recomputes the forward of its tile in registers (``mlp.py`` says why), then runs the layers last to first.

The dW reduction. Several tiles of one sample each produce a partial dW of the whole row of ``P`` parameters. Two
modes (``mlp.py`` chooses):

* per tile (``ATOMIC``): one program per tile, float32 ``atomic_add`` (relaxed) into one zeroed float32 ``(B, P)``
  buffer (``dparams`` itself for float32), cast after. Most parallelism, no partial buffers; the order of the adds
  varies, so ``dparams`` is not bitwise deterministic.
* per split (``not ATOMIC``): ``SPLITS`` programs per sample, each looping over its share of the tiles and adding
  into its own float32 slice (the first tile stores, the rest read-add-write), then the slices are summed in a
  fixed order. Deterministic.

Either way a tile of ``BLOCK_N`` points moves ``4 * P`` bytes of dW partials for ``6 * BLOCK_N * P`` FLOPs, which is
why the backward prefers large tiles where registers allow.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._jit import block_offsets, loop_bound, put_chunk, save_layer, store_rows, take_chunk
from ._launch import check_grid, n_bucket, sample_index64, sum_splits
from .activations import activation_forward, activation_grad
from .mlp_tiles import (
    GEMM_BWD_CONFIGS,
    GEMM_FWD_CONFIGS,
    NET_KEY,
    bwd_chunk_heuristic,
    bwd_fwd_chunk_heuristic,
    fwd_chunk_heuristic,
    gemm_configs,
    gemm_prune,
)

# ------------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------------


@triton.jit
def _kept_value(z, h, KEEP_Z: tl.constexpr):
    """What activation_grad needs of a layer: its pre-activation z, or its output h (already kept as the next
    layer's input, so no extra registers)."""
    if KEEP_Z:
        v = z.to(h.dtype)
    else:
        v = h
    return v


@triton.jit
def _accumulate(ptrs, val, mask, rel, ATOMIC: tl.constexpr):
    """Adds a float32 tile into a dW buffer: atomically, or, in a buffer slice this program owns, by storing the
    first of its tiles (``rel == 0``) and reading-adding-writing the others."""
    if ATOMIC:
        tl.atomic_add(ptrs, val, mask=mask, sem="relaxed")
    else:
        # (A tensor-shaped condition: the interpreter rejects a scalar one in a mask.)
        prev = tl.load(ptrs, mask=mask & ((tl.zeros(val.shape, tl.int32) + rel) > 0), other=0.0)
        tl.store(ptrs, (prev.to(tl.float32) + val).to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _gemm_layer_forward(h, p_row, stride_pk,
                        W_OFF: tl.constexpr, B_OFF: tl.constexpr, K: tl.constexpr, M: tl.constexpr,
                        KP: tl.constexpr, MP: tl.constexpr, BM: tl.constexpr, BLOCK_N: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, INDEX64: tl.constexpr):
    """z = h W^T + bias for a tile of points: h (BLOCK_N, KP) in the input dtype -> z (BLOCK_N, MP) float32."""
    ok = tl.arange(0, KP)
    if INDEX64:
        ok = ok.to(tl.int64)
    if UPCAST:  # the interpreter's bf16 tl.dot is wrong (Triton issue 11584)
        h = h.to(tl.float32)
    # (The weight loads are written out in both branches: as a jitted helper they cost the backward kernel's float32
    # build 4 B more spills on sm_90, through the debug labels of one more inlined call.)
    C: tl.constexpr = MP // BM
    if C == 1:
        om = block_offsets(0, MP, INDEX64)
        wt = tl.load(p_row + (W_OFF + om[None, :] * K + ok[:, None]) * stride_pk,
                     mask=(ok < K)[:, None] & (om < M)[None, :], other=0.0)
        if UPCAST:
            wt = wt.to(tl.float32)
        z = tl.dot(h, wt, input_precision=DOT_PRECISION)
    else:
        z3 = tl.zeros((BLOCK_N, C, BM), dtype=tl.float32)
        for c in range(C):
            om_c = block_offsets(c, BM, INDEX64)
            wt = tl.load(p_row + (W_OFF + om_c[None, :] * K + ok[:, None]) * stride_pk,
                         mask=(ok < K)[:, None] & (om_c < M)[None, :], other=0.0)
            if UPCAST:
                wt = wt.to(tl.float32)
            part = tl.dot(h, wt, input_precision=DOT_PRECISION)
            z3 = put_chunk(z3, part, c, C)
        z = tl.reshape(z3, (BLOCK_N, MP))
    if B_OFF >= 0:
        om = tl.arange(0, MP)
        bias = tl.load(p_row + (B_OFF + om) * stride_pk, mask=om < M, other=0.0)
        z += bias.to(tl.float32)[None, :]
    return z


@triton.jit
def _gemm_chunk_backward(dzc, om, h_in, p_row, dw_row, rel, ok, dh, stride_pk,
                         W_OFF: tl.constexpr, K: tl.constexpr, M: tl.constexpr,
                         NEED_DW: tl.constexpr, NEED_DH: tl.constexpr, ATOMIC: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One chunk of rows: adds dW[rows] = dz[:, rows]^T h_in to the dW buffer and dz[:, rows] W[rows] to dh."""
    mask_w = (om < M)[:, None] & (ok < K)[None, :]
    offs = W_OFF + om[:, None] * K + ok[None, :]
    dzl = dzc.to(h_in.dtype)  # tensor cores take both operands in the input dtype
    if UPCAST:
        dzl = dzl.to(tl.float32)
        h_in = h_in.to(tl.float32)
    if NEED_DW:
        dw = tl.dot(tl.trans(dzl), h_in, input_precision=DOT_PRECISION)
        _accumulate(dw_row + offs, dw, mask_w, rel, ATOMIC)
    if NEED_DH:
        w = tl.load(p_row + offs * stride_pk, mask=mask_w, other=0.0)
        if UPCAST:
            w = w.to(tl.float32)
        dh = tl.dot(dzl, w, dh, input_precision=DOT_PRECISION)
    return dh


@triton.jit
def _gemm_layer_backward(dz, h_in, p_row, dw_row, rel, stride_pk,
                         W_OFF: tl.constexpr, B_OFF: tl.constexpr, K: tl.constexpr, M: tl.constexpr,
                         KP: tl.constexpr, MP: tl.constexpr, BM: tl.constexpr, BLOCK_N: tl.constexpr,
                         NEED_DW: tl.constexpr, NEED_DH: tl.constexpr, ATOMIC: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, INDEX64: tl.constexpr):
    """dz (BLOCK_N, MP) float32 of a layer whose input was h_in (BLOCK_N, KP, input dtype): adds this tile's dW and
    db to the dW buffer row and returns dh_in = dz W (BLOCK_N, KP) float32 (zeros unless NEED_DH)."""
    ok = tl.arange(0, KP)
    if INDEX64:
        ok = ok.to(tl.int64)
    dh = tl.zeros((BLOCK_N, KP), dtype=tl.float32)
    if NEED_DW:
        if B_OFF >= 0:
            om = tl.arange(0, MP)
            _accumulate(dw_row + B_OFF + om, tl.sum(dz, axis=0), om < M, rel, ATOMIC)
    C: tl.constexpr = MP // BM
    if C == 1:
        om = block_offsets(0, MP, INDEX64)
        dh = _gemm_chunk_backward(dz, om, h_in, p_row, dw_row, rel, ok, dh, stride_pk, W_OFF, K, M,
                                  NEED_DW, NEED_DH, ATOMIC, DOT_PRECISION, UPCAST)
    else:
        dz3 = tl.reshape(dz, (BLOCK_N, C, BM))
        for c in range(C):
            dzc = take_chunk(dz3, c, C)
            om_c = block_offsets(c, BM, INDEX64)
            dh = _gemm_chunk_backward(dzc, om_c, h_in, p_row, dw_row, rel, ok, dh, stride_pk, W_OFF, K, M,
                                      NEED_DW, NEED_DH, ATOMIC, DOT_PRECISION, UPCAST)
    return dh


# ------------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------------


@triton.autotune(configs=gemm_configs(GEMM_FWD_CONFIGS), key=NET_KEY + ["N_BUCKET"],
                 prune_configs_by={"early_config_prune": gemm_prune(backward=False)})
@triton.heuristics({"CHUNKS": fwd_chunk_heuristic})
@triton.jit
def _fwd_gemm_kernel(
    x_ptr, p_ptr, y_ptr, saved,
    N, N_BUCKET,
    stride_xb, stride_xn, stride_xk,
    stride_pb, stride_pk,
    w0,
    SIZES: tl.constexpr, PADS: tl.constexpr, WOFF: tl.constexpr, BOFF: tl.constexpr, ACTS: tl.constexpr,
    KINDS: tl.constexpr, NUM_LAYERS: tl.constexpr, SAVE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, INDEX64: tl.constexpr,
    CHUNKS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Every layer for one tile of BLOCK_N points of one sample; y and the kept values are contiguous (B, N, M)."""
    pid = tl.program_id(0)
    tiles = tl.cdiv(N, BLOCK_N)
    b = (pid // tiles).to(tl.int64)
    offs_n = (pid % tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    if INDEX64:
        offs_n = offs_n.to(tl.int64)
    mask_n = offs_n < N
    rows = b * N + offs_n
    p_row = p_ptr + b * stride_pb
    ok = tl.arange(0, PADS[0])
    h = tl.load(x_ptr + b * stride_xb + offs_n[:, None] * stride_xn + ok[None, :] * stride_xk,
                mask=mask_n[:, None] & (ok < SIZES[0])[None, :], other=0.0)
    for l in tl.static_range(NUM_LAYERS):
        z = _gemm_layer_forward(h, p_row, stride_pk, WOFF[l], BOFF[l], SIZES[l], SIZES[l + 1], PADS[l], PADS[l + 1],
                                CHUNKS[l], BLOCK_N, DOT_PRECISION, UPCAST, INDEX64)
        a = activation_forward(z, w0, ACTS[l])
        if SAVE:
            save_layer(saved[l], rows, mask_n, z, a, SIZES[l + 1], PADS[l + 1], KINDS[l])
        h = a.to(x_ptr.dtype.element_ty)  # the next layer's tl.dot operand, rounded like PyTorch's layer output
        # Without it the compiler hoists later layers' weight loads into this one's registers (sm_90 builds of
        # [2, 128, 128, 128, 3] with 4 warps: 227 registers without, 128 with).
        tl.debug_barrier()
    store_rows(y_ptr, rows, mask_n, a, SIZES[NUM_LAYERS], PADS[NUM_LAYERS])


@triton.autotune(configs=gemm_configs(GEMM_BWD_CONFIGS), key=NET_KEY + ["N_BUCKET", "NEED_DX", "NEED_DW", "ATOMIC"],
                 prune_configs_by={"early_config_prune": gemm_prune(backward=True)}, reset_to_zero=["dw_ptr"])
@triton.heuristics({"CHUNKS": bwd_chunk_heuristic, "FWD_CHUNKS": bwd_fwd_chunk_heuristic})
@triton.jit
def _bwd_gemm_kernel(
    g_ptr, x_ptr, p_ptr, dx_ptr, dw_ptr,
    N, N_BUCKET, SPLITS,
    stride_gb, stride_gn, stride_gm,
    stride_xb, stride_xn, stride_xk,
    stride_pb, stride_pk,
    stride_dwb, stride_dws,
    w0,
    SIZES: tl.constexpr, PADS: tl.constexpr, WOFF: tl.constexpr, BOFF: tl.constexpr, ACTS: tl.constexpr,
    KEEP_Z: tl.constexpr, NUM_LAYERS: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr,
    ATOMIC: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, INDEX64: tl.constexpr,
    CHUNKS: tl.constexpr, FWD_CHUNKS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The whole backward for the tiles of one sample that this program owns (one tile when ATOMIC, else a
    SPLITS-th of them): per tile, the forward recomputed in registers, then the layers last to first. dW and db go
    to the float32 dW buffer row ``b * stride_dwb + split * stride_dws`` (see ``_accumulate``); dx is stored."""
    pid = tl.program_id(0)
    tiles = tl.cdiv(N, BLOCK_N)
    if ATOMIC:
        splits = tiles
    else:
        splits = SPLITS
    b = (pid // splits).to(tl.int64)
    split = pid % splits
    per_split = tl.cdiv(tiles, splits)
    t_start = split * per_split
    t_stop = tl.minimum(t_start + per_split, tiles)
    p_row = p_ptr + b * stride_pb
    dw_row = dw_ptr + b * stride_dwb + split.to(tl.int64) * stride_dws  # base offsets in int64, like b's
    ok = tl.arange(0, PADS[0])
    om = tl.arange(0, PADS[NUM_LAYERS])
    for t in range(loop_bound(t_start), loop_bound(t_stop)):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        if INDEX64:
            offs_n = offs_n.to(tl.int64)
        mask_n = offs_n < N
        # Forward, keeping in registers (input dtype) each layer's input and, where the activation's derivative
        # needs it, its pre-activation. (Keeping only the pre-activation and recomputing the output from it in the
        # backward stores less, but the recomputed gelu / silu spill more registers in sm_90 builds than they save.)
        x = tl.load(x_ptr + b * stride_xb + offs_n[:, None] * stride_xn + ok[None, :] * stride_xk,
                    mask=mask_n[:, None] & (ok < SIZES[0])[None, :], other=0.0)
        h = x
        hs = (x,)
        kept = ()
        for l in tl.static_range(NUM_LAYERS):
            z = _gemm_layer_forward(h, p_row, stride_pk, WOFF[l], BOFF[l], SIZES[l], SIZES[l + 1], PADS[l],
                                    PADS[l + 1], FWD_CHUNKS[l], BLOCK_N, DOT_PRECISION, UPCAST, INDEX64)
            h = activation_forward(z, w0, ACTS[l]).to(x_ptr.dtype.element_ty)
            hs = hs + (h,)
            kept = kept + (_kept_value(z, h, KEEP_Z[l]),)
            tl.debug_barrier()  # (as in the forward kernel)
        # Backward. Masked points have grad 0, hence dz = 0 all the way down: they add nothing to dW.
        g = tl.load(g_ptr + b * stride_gb + offs_n[:, None] * stride_gn + om[None, :] * stride_gm,
                    mask=mask_n[:, None] & (om < SIZES[NUM_LAYERS])[None, :], other=0.0)
        # (activation_grad reads z for the activations that keep it, the output y for the others.)
        dz = activation_grad(g, kept[NUM_LAYERS - 1], kept[NUM_LAYERS - 1], w0, ACTS[NUM_LAYERS - 1])
        for l in tl.static_range(NUM_LAYERS - 1, -1, -1):
            dh = _gemm_layer_backward(dz, hs[l], p_row, dw_row, t - t_start, stride_pk, WOFF[l], BOFF[l], SIZES[l],
                                      SIZES[l + 1], PADS[l], PADS[l + 1], CHUNKS[l], BLOCK_N, NEED_DW,
                                      NEED_DX or l > 0, ATOMIC, DOT_PRECISION, UPCAST, INDEX64)
            if l > 0:
                dz = activation_grad(dh, kept[l - 1], kept[l - 1], w0, ACTS[l - 1])
            tl.debug_barrier()
        if NEED_DX:
            store_rows(dx_ptr, b * N + offs_n, mask_n, dh, SIZES[0], PADS[0])


# ------------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------------


def launch_forward(x: Tensor, params: Tensor, y: Tensor, saved_args: tuple, w0: float, net: dict,
                   dot: dict) -> None:
    """``_fwd_gemm_kernel`` over ``x (B, N, in)``; ``net`` the network's constexprs (``mlp.py``), ``saved_args`` one
    pointer per layer (any tensor where nothing is kept), ``dot`` the dot constexprs (``_launch.dot_flags``)."""
    batch, n, _ = x.shape
    grid = lambda meta: (check_grid(batch * triton.cdiv(n, meta["BLOCK_N"])),)  # noqa: E731
    _fwd_gemm_kernel[grid](
        x, params, y, saved_args,
        n, n_bucket(n),
        *x.stride(),
        *params.stride(),
        w0,
        INDEX64=sample_index64(params, x), **net, **dot,
    )


def launch_backward(grad_y: Tensor, x: Tensor, params: Tensor, dx, dparams, atomic: bool, splits: int, w0: float,
                    net: dict, dot: dict) -> None:
    """``_bwd_gemm_kernel``: whichever of ``dx`` / ``dparams`` is not None, dW reduced per tile (``atomic``) or over
    ``splits`` programs per sample (see the module docstring)."""
    batch, n, _ = x.shape
    need_dx, need_dw = dx is not None, dparams is not None
    f32 = torch.float32
    if not need_dw:  # a placeholder the autotuner may zero (reset_to_zero) without harm
        buf, stride_dwb, stride_dws = torch.empty(1, dtype=f32, device=x.device), 0, 0
    elif atomic:
        buf = dparams.zero_() if dparams.dtype == f32 else torch.zeros(dparams.shape, dtype=f32, device=x.device)
        stride_dwb, stride_dws = buf.stride(0), 0
    elif splits == 1:
        # A sample's tiles add up in its own row; with at most 16 points there is one tile (BLOCK_N >= 16), which is
        # stored straight into dparams whatever its dtype.
        direct = dparams.dtype == f32 or n <= 16
        buf = dparams if direct else torch.empty(dparams.shape, dtype=f32, device=x.device)
        stride_dwb, stride_dws = buf.stride(0), 0
    else:
        # Splits without a tile (BLOCK_N is chosen by the autotuner) must add zeros.
        buf = torch.zeros((batch, splits, dparams.shape[1]), dtype=f32, device=x.device)
        stride_dwb, stride_dws = buf.stride(0), buf.stride(1)

    if atomic:
        grid = lambda meta: (check_grid(batch * triton.cdiv(n, meta["BLOCK_N"])),)  # noqa: E731
    else:
        grid = (check_grid(batch * splits),)
    _bwd_gemm_kernel[grid](
        grad_y, x, params, dx if need_dx else x, buf,
        n, n_bucket(n), splits,
        *grad_y.stride(),
        *x.stride(),
        *params.stride(),
        stride_dwb, stride_dws,
        w0,
        NEED_DX=need_dx, NEED_DW=need_dw, ATOMIC=atomic, INDEX64=sample_index64(params, x, grad_y), **net, **dot,
    )
    if need_dw and buf is not dparams:
        if buf.dim() == 3:
            sum_splits(buf, dparams, 1)
        else:
            dparams.copy_(buf)
