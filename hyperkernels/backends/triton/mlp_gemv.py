r"""The fused MLP with one point per sample (``N == 1``): a chain of batched GEMVs, kernels and launchers.

Memory-bound on the weights (``B * P`` elements, each read once). A program owns ``BLOCK_B`` samples; per layer it
streams the weight in chunks of whole rows (contiguous in the row) as a ``(BLOCK_B, rows, K)`` tile, multiplies on
CUDA cores in float32 and keeps ``h`` in registers. The backward is one pass per program over the layers, last to
first, from the per-layer values the forward kept: each weight chunk is read once for ``dh = W^T dz`` and the
matching ``dW = dz h^T`` chunk written in the same step (coalesced: dW rows are contiguous in ``dparams``).
The network's constexprs (``SIZES``, ``PADS``, ...) are described in ``mlp.py``; the configs in ``mlp_tiles.py``.
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from ._jit import block_offsets, put_chunk, save_layer, store_rows, take_chunk
from ._launch import check_grid, sample_index64
from .activations import activation_forward, activation_grad
from .mlp_tiles import NET_KEY, gemv_chunk_heuristic, gemv_configs, gemv_prune

# ------------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------------


@triton.jit
def _load_layer_output(ptr, rows, mask_r, w0, M: tl.constexpr, MP: tl.constexpr, KIND: tl.constexpr,
                       ACT: tl.constexpr):
    """(h, z) of a kept layer in float32: h as kept, or act(z) from the kept z (then z is returned too)."""
    om = tl.arange(0, MP)
    v = tl.load(ptr + rows[:, None] * M + om[None, :], mask=mask_r[:, None] & (om < M)[None, :], other=0.0)
    v = v.to(tl.float32)
    if KIND == 2:
        h = activation_forward(v, w0, ACT)
    else:
        h = v
    return h, v


@triton.jit
def _gemv_chunk(p_rows, mask_bk, om, ok, stride_pk, W_OFF: tl.constexpr, K: tl.constexpr, M: tl.constexpr):
    """Rows ``om`` of the samples' weights as a (BLOCK_B, rows, KP) float32 tile (0 where masked)."""
    offs = (W_OFF + om[None, :, None] * K + ok[None, None, :]) * stride_pk
    w = tl.load(p_rows[:, None, None] + offs, mask=mask_bk & (om < M)[None, :, None], other=0.0)
    return w.to(tl.float32)


@triton.jit
def _gemv_layer_forward(h, p_rows, mask_b, stride_pk,
                        W_OFF: tl.constexpr, B_OFF: tl.constexpr, K: tl.constexpr, M: tl.constexpr,
                        KP: tl.constexpr, MP: tl.constexpr, BM: tl.constexpr, BLOCK_B: tl.constexpr,
                        INDEX64: tl.constexpr):
    """z = W h + bias for BLOCK_B samples: h (BLOCK_B, KP) float32 -> z (BLOCK_B, MP) float32."""
    ok = tl.arange(0, KP)
    if INDEX64:
        ok = ok.to(tl.int64)
    mask_bk = mask_b[:, None, None] & (ok < K)[None, None, :]
    C: tl.constexpr = MP // BM
    if C == 1:
        om = block_offsets(0, MP, INDEX64)
        z = tl.sum(_gemv_chunk(p_rows, mask_bk, om, ok, stride_pk, W_OFF, K, M) * h[:, None, :], axis=2)
    else:
        z3 = tl.zeros((BLOCK_B, C, BM), dtype=tl.float32)
        for c in range(C):
            om_c = block_offsets(c, BM, INDEX64)  # (a fresh name: a runtime loop would carry an outer om)
            part = tl.sum(_gemv_chunk(p_rows, mask_bk, om_c, ok, stride_pk, W_OFF, K, M) * h[:, None, :], axis=2)
            z3 = put_chunk(z3, part, c, C)
        z = tl.reshape(z3, (BLOCK_B, MP))
    if B_OFF >= 0:
        om = tl.arange(0, MP)
        bias = tl.load(p_rows[:, None] + (B_OFF + om[None, :]) * stride_pk, mask=mask_b[:, None] & (om < M)[None, :],
                       other=0.0)
        z += bias.to(tl.float32)
    return z


@triton.jit
def _gemv_chunk_backward(dzc, om, h_in, p_rows, d_rows, mask_bk, ok, dh, stride_pk,
                         W_OFF: tl.constexpr, K: tl.constexpr, M: tl.constexpr,
                         NEED_DW: tl.constexpr, NEED_DH: tl.constexpr):
    """One chunk of rows: writes dW[rows] = dz[rows] h_in^T and adds W[rows]^T dz[rows] to dh."""
    if NEED_DW:
        offs = W_OFF + om[None, :, None] * K + ok[None, None, :]
        dw = dzc[:, :, None] * h_in[:, None, :]
        tl.store(d_rows[:, None, None] + offs, dw.to(d_rows.dtype.element_ty), mask=mask_bk & (om < M)[None, :, None])
    if NEED_DH:
        dh += tl.sum(_gemv_chunk(p_rows, mask_bk, om, ok, stride_pk, W_OFF, K, M) * dzc[:, :, None], axis=1)
    return dh


@triton.jit
def _gemv_layer_backward(dz, h_in, p_rows, d_rows, mask_b, stride_pk,
                         W_OFF: tl.constexpr, B_OFF: tl.constexpr, K: tl.constexpr, M: tl.constexpr,
                         KP: tl.constexpr, MP: tl.constexpr, BM: tl.constexpr, BLOCK_B: tl.constexpr,
                         NEED_DW: tl.constexpr, NEED_DH: tl.constexpr, INDEX64: tl.constexpr):
    """For dz (BLOCK_B, MP) float32 of a layer whose input was h_in (BLOCK_B, KP) float32: writes dW and db into the
    samples' dparams rows and returns dh_in = W^T dz (BLOCK_B, KP) float32 (zeros unless NEED_DH). Each weight
    chunk is read once and the matching dW chunk written in the same step."""
    ok = tl.arange(0, KP)
    if INDEX64:
        ok = ok.to(tl.int64)
    mask_bk = mask_b[:, None, None] & (ok < K)[None, None, :]
    dh = tl.zeros((BLOCK_B, KP), dtype=tl.float32)
    if NEED_DW:
        if B_OFF >= 0:
            om = tl.arange(0, MP)
            tl.store(d_rows[:, None] + B_OFF + om[None, :], dz.to(d_rows.dtype.element_ty),
                     mask=mask_b[:, None] & (om < M)[None, :])
    C: tl.constexpr = MP // BM
    if C == 1:
        om = block_offsets(0, MP, INDEX64)
        dh = _gemv_chunk_backward(dz, om, h_in, p_rows, d_rows, mask_bk, ok, dh, stride_pk, W_OFF, K, M,
                                  NEED_DW, NEED_DH)
    else:
        dz3 = tl.reshape(dz, (BLOCK_B, C, BM))
        for c in range(C):
            dzc = take_chunk(dz3, c, C)
            om_c = block_offsets(c, BM, INDEX64)
            dh = _gemv_chunk_backward(dzc, om_c, h_in, p_rows, d_rows, mask_bk, ok, dh, stride_pk, W_OFF, K, M,
                                      NEED_DW, NEED_DH)
    return dh


# ------------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------------


@triton.autotune(configs=gemv_configs(), key=NET_KEY, prune_configs_by={"early_config_prune": gemv_prune})
@triton.heuristics({"CHUNKS": gemv_chunk_heuristic})
@triton.jit
def _fwd_gemv_kernel(
    x_ptr, p_ptr, y_ptr, saved,
    B,
    stride_xb, stride_xk,
    stride_pb, stride_pk,
    w0,
    SIZES: tl.constexpr, PADS: tl.constexpr, WOFF: tl.constexpr, BOFF: tl.constexpr, ACTS: tl.constexpr,
    KINDS: tl.constexpr, NUM_LAYERS: tl.constexpr, SAVE: tl.constexpr, INDEX64: tl.constexpr,
    CHUNKS: tl.constexpr, BLOCK_B: tl.constexpr, TILE: tl.constexpr,
):
    """Every layer for BLOCK_B samples of one point each; ``saved`` holds one (B, M_l) pointer per layer."""
    pid = tl.program_id(0)
    offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    rows = offs_b.to(tl.int64)
    p_rows = p_ptr + rows * stride_pb
    ok = tl.arange(0, PADS[0])
    h = tl.load(x_ptr + rows[:, None] * stride_xb + ok[None, :] * stride_xk,
                mask=mask_b[:, None] & (ok < SIZES[0])[None, :], other=0.0).to(tl.float32)
    for l in tl.static_range(NUM_LAYERS):
        z = _gemv_layer_forward(h, p_rows, mask_b, stride_pk, WOFF[l], BOFF[l], SIZES[l], SIZES[l + 1], PADS[l],
                                PADS[l + 1], CHUNKS[l], BLOCK_B, INDEX64)
        h = activation_forward(z, w0, ACTS[l])
        if SAVE:
            save_layer(saved[l], rows, mask_b, z, h, SIZES[l + 1], PADS[l + 1], KINDS[l])
    store_rows(y_ptr, rows, mask_b, h, SIZES[NUM_LAYERS], PADS[NUM_LAYERS])


@triton.autotune(configs=gemv_configs(), key=NET_KEY + ["NEED_DX", "NEED_DW"],
                 prune_configs_by={"early_config_prune": gemv_prune})
@triton.heuristics({"CHUNKS": gemv_chunk_heuristic})
@triton.jit
def _bwd_gemv_kernel(
    g_ptr, x_ptr, p_ptr, y_ptr, saved, dx_ptr, dp_ptr,
    B,
    stride_gb, stride_gm,
    stride_xb, stride_xk,
    stride_pb, stride_pk,
    stride_db,
    w0,
    SIZES: tl.constexpr, PADS: tl.constexpr, WOFF: tl.constexpr, BOFF: tl.constexpr, ACTS: tl.constexpr,
    KINDS: tl.constexpr, NUM_LAYERS: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr,
    INDEX64: tl.constexpr, CHUNKS: tl.constexpr, BLOCK_B: tl.constexpr, TILE: tl.constexpr,
):
    """The whole backward for BLOCK_B samples of one point each, from the kept layer values ``saved`` (as
    ``KINDS`` says) and the output ``y``: layers last to first, dz = dL/dz in float32 registers throughout."""
    pid = tl.program_id(0)
    offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    rows = offs_b.to(tl.int64)
    p_rows = p_ptr + rows * stride_pb
    d_rows = dp_ptr + rows * stride_db

    om = tl.arange(0, PADS[NUM_LAYERS])
    mask_out = mask_b[:, None] & (om < SIZES[NUM_LAYERS])[None, :]
    g = tl.load(g_ptr + rows[:, None] * stride_gb + om[None, :] * stride_gm, mask=mask_out, other=0.0)
    if KINDS[NUM_LAYERS - 1] == 2:
        y_out, z_out = _load_layer_output(saved[NUM_LAYERS - 1], rows, mask_b, w0, SIZES[NUM_LAYERS],
                                          PADS[NUM_LAYERS], 2, ACTS[NUM_LAYERS - 1])
    else:
        y_out, z_out = _load_layer_output(y_ptr, rows, mask_b, w0, SIZES[NUM_LAYERS], PADS[NUM_LAYERS], 1,
                                          ACTS[NUM_LAYERS - 1])
    dz = activation_grad(g, z_out, y_out, w0, ACTS[NUM_LAYERS - 1])

    ok = tl.arange(0, PADS[0])
    x = tl.load(x_ptr + rows[:, None] * stride_xb + ok[None, :] * stride_xk,
                mask=mask_b[:, None] & (ok < SIZES[0])[None, :], other=0.0).to(tl.float32)
    for l in tl.static_range(NUM_LAYERS - 1, -1, -1):
        if l == 0:
            h_in = x
            z_in = x
        else:
            h_in, z_in = _load_layer_output(saved[l - 1], rows, mask_b, w0, SIZES[l], PADS[l], KINDS[l - 1],
                                            ACTS[l - 1])
        dh = _gemv_layer_backward(dz, h_in, p_rows, d_rows, mask_b, stride_pk, WOFF[l], BOFF[l], SIZES[l],
                                  SIZES[l + 1], PADS[l], PADS[l + 1], CHUNKS[l], BLOCK_B, NEED_DW,
                                  NEED_DX or l > 0, INDEX64)
        if l > 0:
            dz = activation_grad(dh, z_in, h_in, w0, ACTS[l - 1])
    if NEED_DX:
        store_rows(dx_ptr, rows, mask_b, dh, SIZES[0], PADS[0])


# ------------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------------


def launch_forward(x: Tensor, params: Tensor, y: Tensor, saved_args: tuple, w0: float, net: dict) -> None:
    """``_fwd_gemv_kernel`` over ``x (B, 1, in)``; ``net`` the network's constexprs (``mlp.py``), ``saved_args`` one
    pointer per layer (any tensor where nothing is kept)."""
    batch = x.shape[0]
    grid = lambda meta: (check_grid(triton.cdiv(batch, meta["BLOCK_B"])),)  # noqa: E731
    _fwd_gemv_kernel[grid](
        x, params, y, saved_args,
        batch,
        x.stride(0), x.stride(2),
        params.stride(0), params.stride(1),
        w0,
        INDEX64=sample_index64(params, x), **net,
    )


def launch_backward(grad_y: Tensor, x: Tensor, params: Tensor, y: Tensor, saved_args: tuple, dx, dparams, w0: float,
                    net: dict) -> None:
    """``_bwd_gemv_kernel``: whichever of ``dx`` / ``dparams`` is not None, from the kept values ``saved_args``."""
    batch = x.shape[0]
    need_dx, need_dw = dx is not None, dparams is not None
    grid = lambda meta: (check_grid(triton.cdiv(batch, meta["BLOCK_B"])),)  # noqa: E731
    _bwd_gemv_kernel[grid](
        grad_y, x, params, y, saved_args, dx if need_dx else x, dparams if need_dw else x,
        batch,
        grad_y.stride(0), grad_y.stride(2),
        x.stride(0), x.stride(2),
        params.stride(0), params.stride(1),
        dparams.stride(0) if need_dw else 0,
        w0,
        NEED_DX=need_dx, NEED_DW=need_dw, INDEX64=sample_index64(params, x), **net,
    )
