r"""Hyper-fused linear in Triton: ``y = act(W[b] x + c[b])`` with ``theta[b] = G h[b] + g`` never materialised.

Sections, in the order of Triton's matmul tutorial: autotune configs, kernels, launchers. The math is in
``backends/torch/hyper_linear.py``; here is how the kernels map it.

Every large product is one GEMM over the ``R = B*N`` rows ``r = (b, n)`` whose reduction runs over a flat index
``f = p * Q + q`` of pairs, with one operand an outer product formed in registers, tile by tile:

==========  ==================================  ======================  ==============================
GEMM        formed operand ``t1[r, p] t2[r, q]``  plain operand            (rows, columns, reduction)
==========  ==================================  ======================  ==============================
forward z   ``x[r, i] h[b, k]``                 ``G_W`` as ``(O, I*K)``     ``(R, O, I*K)``
dx          ``dz[r, o] h[b, k]``                ``G_W`` as ``(O*K, I)``     ``(R, I, O*K)``
dh (per r)  ``dz[r, o] x[r, i]``                ``G_W`` as ``(O*I, K)``     ``(R, K, O*I)``
dG_W        ``x[r, i] h[b, k]``                 ``dz^T``                    ``(O, I*K, R)``
==========  ==================================  ======================  ==============================

The first three are one kernel, ``_row_gemm_kernel``. A reduction step loads ``t1[r, f // Q]`` and
``t2[r, f % Q]`` for ``BLOCK_J`` consecutive ``f`` (repeated addresses hit L1), multiplies them in float32 and
feeds the product, in the input dtype, to ``tl.dot`` against a plain ``(BLOCK_J, BLOCK_C)`` tile of ``G``:
``G``'s tiles are affine loads that Triton pipelines through shared memory like any GEMM operand. ``G_W`` is
read in place for the forward and ``dh``; ``dx`` reads it through a ``(O, K, I)`` copy made once per backward
(the size of the head, not of the batch). The small terms of the head bias and of the generated target bias
are extra ``tl.dot``s into the same accumulator (``E2``, ``E3``, ``E4`` below); the activation is fused in the
forward's epilogue. All ``B*N`` rows share ``G``, so even ``N = 1`` is one large GEMM on tensor cores, not ``B``
GEMVs.

``dG`` is ``_dg_kernel``: output ``(o, f)``, reduction over the rows, left operand ``dz^T`` (plain) and right
operand the outer-product tile formed per step. The same kernel, with one factor a column of ones, gives the
gradients of the bias rows and of the head bias. With few output tiles the rows are split across programs
(float32 partial sums, added by the launcher). ``dz = grad_y * f'(.)`` is formed once by ``_dz_kernel`` (it is
``B*N*out``, the size of ``y``): the outer-product kernels read each of its elements ``K`` or ``I`` times and
would otherwise recompute the activation's derivative as often.

Nothing of size ``B*out*in`` exists at any point; the temporaries are ``dz``, the ``(O, K, I)`` copy of ``G_W``
and, for ``dh``, a float32 ``(B, N, K)`` buffer summed over ``N`` (deterministic, unlike atomics).

Grids are 1-D (no axis can overflow); row indices, per-row offsets and the dG split slices' offsets are int64
(``B*N*in`` may pass 2^31); offsets into ``G`` stay int32 unless ``G`` itself spans 2^31 elements (``INDEX64``).
bfloat16 tiles are upcast before ``tl.dot`` only under the interpreter (Triton issue 11584).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...activations import ACTIVATIONS, Activation
from ..torch.hyper_linear import split_head
from ._config import INTERPRET
from ._jit import load_dz, loop_bound
from ._launch import (
    check_grid,
    device_guard,
    dot_flags,
    gemm_configs,
    gemm_prune,
    index64,
    n_bucket,
    split_count,
    split_rows,
    sum_splits,
)
from .activations import activation_forward

_ACT_NONE = ACTIVATIONS["none"]

# ------------------------------------------------------------------------------------------------------
# Autotune configs
# ------------------------------------------------------------------------------------------------------

# (rows, columns, reduction, num_warps, num_stages): a table of its own, laid out like linear_gemm.py's, since the
# formed operand changes what fits. It lives in registers (two gathered loads and their product per element), so
# reductions stay at 16-32 and tiles of 8192+ outputs get 8 warps: AOT-compiled for sm_90 with triton 3.9 (bf16,
# cuobjdump --dump-resource-usage), 64-deep steps spill hundreds of bytes of registers, and so do 128x64 / 64x128
# tiles on 4 warps; the tiles below spill nothing, except 128x128 with a gelu epilogue (~150 bytes).
_TILES = [
    (128, 128, 32, 8, 3),
    (128, 64, 32, 8, 3),
    (64, 128, 32, 8, 3),
    (64, 64, 32, 4, 4),
    (128, 128, 16, 8, 4),
    (64, 64, 16, 4, 4),
    (32, 64, 32, 4, 4),
    (64, 32, 32, 4, 4),
    (32, 32, 32, 4, 4),
    (16, 64, 32, 4, 4),
    (16, 128, 32, 8, 3),
    (16, 32, 32, 2, 4),
]


def _configs(rows: str, cols: str, red: str, interpret: bool = INTERPRET) -> list[triton.Config]:
    return gemm_configs(_TILES, rows, cols, red, interpret)


# The GEMM pruning (``_launch.gemm_prune``) was first written for linear's table, whose float32-only tiles include
# these two, and it kept them from 16-bit operands here too: the offline resource checks measured this kernel's
# 16-bit configs without them, so they stay out.
_NOT_16BIT = frozenset({(128, 64, 32, 8, 3), (64, 128, 32, 8, 3)})


# ROLE (forward / dx / dh, or which dG) is part of the autotune key: equal sizes can mean different operands.
_FORWARD, _DX, _DH = 0, 1, 2
_DG_MAIN, _DG_BIAS_ROWS, _DG_HEAD_BIAS_W, _DG_HEAD_BIAS_C = 0, 1, 2, 3

# ------------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------------


@triton.jit
def _extra_dot(acc, rows_ptr, stride_col, size, e_ptr, stride_ep, stride_ec, offs_c, mask_r, mask_c,
               DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK: tl.constexpr):
    """acc += t[r, :size] @ E[:size, c]: a plain GEMM term, ``t`` addressed by per-row pointers."""
    offs = tl.arange(0, BLOCK)
    for p0 in range(0, loop_bound(size), BLOCK):
        p = p0 + offs
        mask_p = p < size
        tv = tl.load(rows_ptr[:, None] + p[None, :] * stride_col, mask=mask_r[:, None] & mask_p[None, :], other=0.0)
        ev = tl.load(e_ptr + p[:, None] * stride_ep + offs_c[None, :] * stride_ec,
                     mask=mask_p[:, None] & mask_c[None, :], other=0.0)
        tv = tv.to(ev.dtype)
        if UPCAST:
            tv = tv.to(tl.float32)
            ev = ev.to(tl.float32)
        acc = tl.dot(tv, ev, acc, input_precision=DOT_PRECISION)
    return acc


@triton.autotune(
    configs=_configs("BLOCK_R", "BLOCK_C", "BLOCK_J"),
    key=["C", "P", "Q", "R_BUCKET", "ROLE"],
    prune_configs_by={"early_config_prune": gemm_prune(
        "BLOCK_R", "BLOCK_C", "BLOCK_J", {"BLOCK_R": "R", "BLOCK_C": "C", "BLOCK_J": "PQ"}, "g_ptr",
        operand_strides=("stride_gf", "stride_gc"), not_16bit=_NOT_16BIT)},
)
@triton.jit
def _row_gemm_kernel(
    t1_ptr, t2_ptr, g_ptr, e2_ptr, e3_ptr, e4_ptr, out_ptr, z_ptr,
    R, N, C, P, Q, PQ, R_BUCKET, ROLE,
    stride_t1b, stride_t1n, stride_t1p,
    stride_t2b, stride_t2n, stride_t2q,
    stride_gf, stride_gc,
    stride_e2p, stride_e2c,
    stride_e3q, stride_e3c,
    stride_e4c,
    stride_or, stride_oc,
    w0,
    ACT: tl.constexpr, SAVE_PREACT: tl.constexpr, HAS_E2: tl.constexpr, HAS_E3: tl.constexpr,
    HAS_E4: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, INDEX64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """One (BLOCK_R rows x BLOCK_C columns) tile of
    ``out[r, c] = act(sum_f t1[r, f // Q] t2[r, f % Q] G[f, c] + sum_p t1[r, p] E2[p, c] + sum_q t2[r, q] E3[q, c]
    + E4[c])`` over ``f < PQ = P*Q``; rows ``r = b*N + n``; ``t1``, ``t2`` are ``(B, N, P)``, ``(B, N, Q)`` views
    (point stride 0 for ``h``). ``z`` (the pre-activation) shares ``out``'s strides."""
    pid = tl.program_id(0)
    tiles_c = tl.cdiv(C, BLOCK_C)
    pid_r = pid // tiles_c
    pid_c = pid % tiles_c

    offs_r = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    b = offs_r // N
    n = offs_r % N
    t1_rows = t1_ptr + b * stride_t1b + n * stride_t1n
    t2_rows = t2_ptr + b * stride_t2b + n * stride_t2n
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_j = tl.arange(0, BLOCK_J)
    if INDEX64:
        offs_c = offs_c.to(tl.int64)
        offs_j = offs_j.to(tl.int64)
    mask_c = offs_c < C
    g_ptrs = g_ptr + offs_j[:, None] * stride_gf + offs_c[None, :] * stride_gc

    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for f0 in range(0, loop_bound(PQ), BLOCK_J):
        f = f0 + tl.arange(0, BLOCK_J)
        mask_f = f < PQ
        mask = mask_r[:, None] & mask_f[None, :]
        v1 = tl.load(t1_rows[:, None] + (f // Q)[None, :] * stride_t1p, mask=mask, other=0.0)
        v2 = tl.load(t2_rows[:, None] + (f % Q)[None, :] * stride_t2q, mask=mask, other=0.0)
        a = (v1.to(tl.float32) * v2.to(tl.float32)).to(g_ptr.dtype.element_ty)  # tensor cores take the input dtype
        gv = tl.load(g_ptrs, mask=mask_f[:, None] & mask_c[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            gv = gv.to(tl.float32)
        acc = tl.dot(a, gv, acc, input_precision=DOT_PRECISION)
        g_ptrs += BLOCK_J * stride_gf

    if HAS_E2:
        acc = _extra_dot(acc, t1_rows, stride_t1p, P, e2_ptr, stride_e2p, stride_e2c, offs_c, mask_r, mask_c,
                         DOT_PRECISION, UPCAST, BLOCK_J)
    if HAS_E3:
        acc = _extra_dot(acc, t2_rows, stride_t2q, Q, e3_ptr, stride_e3q, stride_e3c, offs_c, mask_r, mask_c,
                         DOT_PRECISION, UPCAST, BLOCK_J)
    if HAS_E4:
        acc += tl.load(e4_ptr + offs_c * stride_e4c, mask=mask_c, other=0.0).to(tl.float32)[None, :]

    out = offs_r[:, None] * stride_or + offs_c[None, :] * stride_oc
    mask = mask_r[:, None] & mask_c[None, :]
    if SAVE_PREACT:
        tl.store(z_ptr + out, acc.to(z_ptr.dtype.element_ty), mask=mask)
    y = activation_forward(acc, w0, ACT)
    tl.store(out_ptr + out, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.autotune(
    configs=_configs("BLOCK_C", "BLOCK_J", "BLOCK_R"),
    key=["C", "P", "Q", "R_BUCKET", "ROLE"],
    prune_configs_by={"early_config_prune": gemm_prune(
        "BLOCK_C", "BLOCK_J", "BLOCK_R", {"BLOCK_C": "C", "BLOCK_J": "PQ", "BLOCK_R": "R"}, "dz_ptr",
        operand_strides=("stride_dzr", "stride_dzc"), not_16bit=_NOT_16BIT)},
)
@triton.jit
def _dg_kernel(
    dz_ptr, u_ptr, v_ptr, out_ptr,
    R, N, C, P, Q, PQ, R_BUCKET, ROLE, R_PER_SPLIT,
    stride_dzr, stride_dzc,
    stride_ub, stride_un, stride_up,
    stride_vb, stride_vn, stride_vq,
    stride_os, stride_oc, stride_of,
    U_ONES: tl.constexpr, V_ONES: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, INDEX64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One (BLOCK_C x BLOCK_J) tile of ``out[c, f] = sum_r dz[r, c] u[r, f // Q] v[r, f % Q]`` over the rows of one
    split (``u`` or ``v`` a column of ones where U_ONES / V_ONES); split ``s`` writes at ``s * stride_os``."""
    pid = tl.program_id(0)
    tiles_f = tl.cdiv(PQ, BLOCK_J)
    tiles = tl.cdiv(C, BLOCK_C) * tiles_f
    split = pid // tiles
    rest = pid % tiles
    pid_c = rest // tiles_f
    pid_f = rest % tiles_f

    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    f = pid_f * BLOCK_J + tl.arange(0, BLOCK_J)
    if INDEX64:
        offs_c = offs_c.to(tl.int64)
        f = f.to(tl.int64)
    mask_c = offs_c < C
    mask_f = f < PQ
    col_u = (f // Q) * stride_up
    col_v = (f % Q) * stride_vq

    r_start = split.to(tl.int64) * R_PER_SPLIT
    r_stop = tl.minimum(R, r_start + R_PER_SPLIT)
    rel_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_C, BLOCK_J), dtype=tl.float32)
    for r0 in range(loop_bound(r_start), loop_bound(r_stop), BLOCK_R):
        offs_r = r0 + rel_r
        mask_r = offs_r < r_stop
        dzt = tl.load(dz_ptr + offs_r[None, :] * stride_dzr + offs_c[:, None] * stride_dzc,
                      mask=mask_c[:, None] & mask_r[None, :], other=0.0)
        b = offs_r // N
        n = offs_r % N
        mask = mask_r[:, None] & mask_f[None, :]
        if U_ONES:
            w = tl.where(mask, 1.0, 0.0)
        else:
            w = tl.load(u_ptr + (b * stride_ub + n * stride_un)[:, None] + col_u[None, :], mask=mask,
                        other=0.0).to(tl.float32)
        if not V_ONES:
            w = w * tl.load(v_ptr + (b * stride_vb + n * stride_vn)[:, None] + col_v[None, :], mask=mask,
                            other=0.0).to(tl.float32)
        w = w.to(dz_ptr.dtype.element_ty)
        if UPCAST:
            dzt = dzt.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(dzt, w, acc, input_precision=DOT_PRECISION)

    # A split's slice is a base offset: int64 (splits x C x P*Q may pass 2^31 where one slice does not).
    out = out_ptr + split.to(tl.int64) * stride_os + offs_c[:, None] * stride_oc + f[None, :] * stride_of
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_f[None, :])


@triton.jit
def _dz_kernel(
    g_ptr, y_ptr, z_ptr, dz_ptr,
    R, N, O,
    stride_gb, stride_gn, stride_go,
    stride_yb, stride_yn, stride_yo,
    stride_zb, stride_zn, stride_zo,
    w0,
    ACT: tl.constexpr, LOAD_Y: tl.constexpr, LOAD_Z: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """dz = grad_y * f'(.) for BLOCK_R rows, written contiguous ``(R, O)`` in dz's dtype."""
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    b = offs_r // N
    n = offs_r % N
    g_rows = g_ptr + b * stride_gb + n * stride_gn
    y_rows = y_ptr + b * stride_yb + n * stride_yn
    z_rows = z_ptr + b * stride_zb + n * stride_zn
    for o0 in range(0, loop_bound(O), BLOCK_O):
        offs_o = o0 + tl.arange(0, BLOCK_O)
        mask = mask_r[:, None] & (offs_o < O)[None, :]
        dz = load_dz(g_rows[:, None] + offs_o[None, :] * stride_go, y_rows[:, None] + offs_o[None, :] * stride_yo,
                     z_rows[:, None] + offs_o[None, :] * stride_zo, mask, w0, ACT, LOAD_Y, LOAD_Z)
        tl.store(dz_ptr + offs_r[:, None] * O + offs_o[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------------

# _dz_kernel's tile: 32 rows x 128 outputs is 4096 elements in flight per program, plenty for an elementwise pass,
# over 8 warps: 16 elements per thread (4 warps' 32, each with its own addresses where rows are unaligned, spilled
# 40-64 B with gelu at 11 outputs in sm_90 builds of triton 3.6 and 3.9; 8 warps: none).
_DZ_BLOCK_R, _DZ_BLOCK_O, _DZ_WARPS = 32, 128, 8


def _row_strides(t: Optional[Tensor]) -> tuple[int, int, int]:
    """(sample, point, column) strides of a ``(B, N|1, D)`` operand; point stride 0 for a ``(B, 1, D)`` one that
    every point of its sample shares (``h``)."""
    if t is None:
        return (0, 0, 0)
    return t.stride(0), (0 if t.shape[1] == 1 else t.stride(1)), t.stride(2)


def _launch_rows(role, t1, t2, g2, e2, e3, e4, out, z, act, w0):
    """``_row_gemm_kernel``: ``t1 (B, N, P)``, ``t2 (B, N|1, Q)``, ``g2 (P*Q, C)``, ``e2 (P, C)``, ``e3 (Q, C)``,
    ``e4 (C,)`` (each ``e`` optional), into ``out`` / ``z`` ``(R, C)``."""
    batch, n, p = t1.shape
    q = t2.shape[2]
    c = g2.shape[1]
    r = batch * n
    save = z is not None
    grid = lambda meta: (check_grid(triton.cdiv(r, meta["BLOCK_R"]) * triton.cdiv(c, meta["BLOCK_C"])),)  # noqa: E731
    _row_gemm_kernel[grid](
        t1, t2, g2, g2 if e2 is None else e2, g2 if e3 is None else e3, g2 if e4 is None else e4,
        out, out if z is None else z,
        r, n, c, p, q, p * q, n_bucket(r), role,
        *_row_strides(t1), *_row_strides(t2), g2.stride(0), g2.stride(1),
        *(e2.stride() if e2 is not None else (0, 0)),
        *(e3.stride() if e3 is not None else (0, 0)),
        e4.stride(0) if e4 is not None else 0,
        out.stride(0), out.stride(1),
        w0,
        ACT=act.code, SAVE_PREACT=save, HAS_E2=e2 is not None, HAS_E3=e3 is not None, HAS_E4=e4 is not None,
        INDEX64=index64(g2, e2, e3, e4), **dot_flags(t1.dtype),
    )


def _dg_splits(c: int, pq: int, rows: int, device: torch.device) -> int:
    """How many slices of the rows the dG kernel splits into (one program per 64x64 output tile is the parallelism
    it has without splitting; the bias terms are a few tiles, each reducing over all B*N rows). Its own name, so that
    the tests and bench/gpu_smoke.py can force a split on CPU by replacing it."""
    return split_count(triton.cdiv(c, 64) * triton.cdiv(pq, 64), rows, device)


def _launch_dg(role, dz2, u, v, out2, n, p, q):
    """``out2[c, f] = sum_r dz2[r, c] u[r, f // q] v[r, f % q]``: ``u`` / ``v`` ``(B, N|1, p|q)`` views, or None
    for a column of ones (then ``p`` / ``q`` is 1); ``out2`` any ``(C, p*q)`` view."""
    r, c = dz2.shape
    splits, per_split = split_rows(r, _dg_splits(c, p * q, r, dz2.device))
    target = out2 if splits == 1 else torch.empty((splits, c, p * q), dtype=torch.float32, device=dz2.device)
    out_strides = (0, *out2.stride()) if splits == 1 else target.stride()

    def grid(meta):
        return (check_grid(splits * triton.cdiv(c, meta["BLOCK_C"]) * triton.cdiv(p * q, meta["BLOCK_J"])),)

    _dg_kernel[grid](
        dz2, dz2 if u is None else u, dz2 if v is None else v, target,
        r, n, c, p, q, p * q, n_bucket(r), role, per_split,
        dz2.stride(0), dz2.stride(1), *_row_strides(u), *_row_strides(v), *out_strides,
        U_ONES=u is None, V_ONES=v is None,
        INDEX64=index64(out2, target), **dot_flags(dz2.dtype),
    )
    if splits > 1:
        sum_splits(target, out2, 0)


def _forward_into(x, h, head_weight, head_bias, out_features, bias, y, z, act, w0):
    batch, n, i = x.shape
    k = h.shape[1]
    o = out_features
    g_w3, g_c, gb_w, gb_c = split_head(head_weight, head_bias, o, i, bias)
    # (I*K, O): row f = i*K + k. A view where G_W's strides allow, else a copy of the head's size, never the batch's.
    g2 = g_w3.reshape(o, i * k).t()
    _launch_rows(_FORWARD, x, h.unsqueeze(1), g2, None if gb_w is None else gb_w.t(),
                 None if g_c is None else g_c.t(), gb_c, y.view(batch * n, o),
                 None if z is None else z.view(batch * n, o), act, w0)


def hyper_linear_forward(x: Tensor, h: Tensor, head_weight: Tensor, head_bias: Optional[Tensor], out_features: int,
                         bias: bool, act: Activation, w0: float, save_preact: bool) -> tuple[Tensor, Tensor]:
    """See ``hyperkernels/ops/hyper_linear.py``: ``(y, preact)``, contiguous ``(B, N, out)``."""
    batch, n, _ = x.shape
    keep = save_preact and act.needs_preactivation
    y = x.new_empty((batch, n, out_features))
    z = x.new_empty(y.shape) if keep else None
    with device_guard(x):
        _forward_into(x, h, head_weight, head_bias, out_features, bias, y, z, act, w0)
    return y, (z if keep else x.new_empty(0))


def hyper_linear_backward(grad_y: Tensor, x: Tensor, h: Tensor, head_weight: Tensor, head_bias: Optional[Tensor],
                          y: Tensor, preact: Tensor, out_features: int, bias: bool, act: Activation, w0: float,
                          output_mask) -> tuple:
    """``(dx, dh, dhead_weight, dhead_bias)``, contiguous, None where ``output_mask`` says not needed."""
    need_x, need_h, need_g, need_gb = output_mask
    need_gb = need_gb and head_bias is not None
    batch, n, i = x.shape
    k = h.shape[1]
    o = out_features
    r = batch * n
    g_w3, g_c, gb_w, gb_c = split_head(head_weight, head_bias, o, i, bias)
    hr = h.unsqueeze(1)
    dx = dh = dg = dgb = None
    with device_guard(x):
        load_z = act.needs_preactivation
        load_y = not load_z and act.code != _ACT_NONE.code
        if load_z and preact.numel() == 0:  # the forward kept no pre-activation: recompute it
            preact = x.new_empty((batch, n, o))
            _forward_into(x, h, head_weight, head_bias, o, bias, preact, None, _ACT_NONE, w0)
        dz = x.new_empty((batch, n, o))
        yv = y if load_y else grad_y
        zv = preact if load_z else grad_y
        _dz_kernel[(check_grid(triton.cdiv(r, _DZ_BLOCK_R)),)](
            grad_y, yv, zv, dz, r, n, o, *grad_y.stride(), *yv.stride(), *zv.stride(), w0,
            ACT=act.code, LOAD_Y=load_y, LOAD_Z=load_z, BLOCK_R=_DZ_BLOCK_R, BLOCK_O=_DZ_BLOCK_O,
            num_warps=_DZ_WARPS,
        )
        dz2 = dz.view(r, o)

        if need_x:
            dx = x.new_empty(x.shape)
            g_x = g_w3.permute(0, 2, 1).reshape(o * k, i)  # (O*K, I): row f = o*K + k; a copy of the head's size
            _launch_rows(_DX, dz, hr, g_x, gb_w, None, None, dx.view(r, i), None, _ACT_NONE, w0)
        if need_h:
            # Rows are (sample, point) pairs: float32 per-row sums, added over the points of each sample.
            per_row = torch.empty((r, k), dtype=torch.float32, device=x.device)
            _launch_rows(_DH, dz, x, g_w3.reshape(o * i, k), g_c, None, None, per_row, None, _ACT_NONE, w0)
            dh = (per_row if n == 1 else per_row.view(batch, n, k).sum(1)).to(h.dtype)
        if need_g:
            dg = head_weight.new_empty(head_weight.shape)
            _launch_dg(_DG_MAIN, dz2, x, hr, dg[: o * i].view(o, i * k), n, i, k)
            if bias:
                _launch_dg(_DG_BIAS_ROWS, dz2, None, hr, dg[o * i :], n, 1, k)
        if need_gb:
            dgb = head_weight.new_empty(head_weight.shape[:1])
            _launch_dg(_DG_HEAD_BIAS_W, dz2, x, None, dgb[: o * i].view(o, i), n, i, 1)
            if bias:
                _launch_dg(_DG_HEAD_BIAS_C, dz2, None, None, dgb[o * i :].view(o, 1), n, 1, 1)
    return dx, dh, dg, dgb
