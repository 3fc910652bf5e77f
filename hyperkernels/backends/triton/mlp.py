r"""The fused per-sample MLP in Triton: every layer of ``h_l = act(h_{l-1} W_l[b]^T + b_l[b])`` in one kernel,
forward and backward, reading each sample's weights in place from the flat ``(B, P)`` hypernetwork output.

Sections, in the order of Triton's matmul tutorial: configs, kernels, launchers.

Specialisation. A kernel is compiled per network: the widths ``SIZES``, their padded widths ``PADS`` (powers of two,
at least 16, tl.dot's smallest), the weight and bias offsets in a row ``WOFF`` / ``BOFF`` and the activation of
each layer ``ACTS`` are constexpr tuples, and the layers are unrolled with ``tl.static_range``, so every layer's
tiles have their own compile-time shape and the activations of one layer feed the next in registers. Widths up to
``MAX_WIDTH``; wider layers are cut into chunks of rows (``CHUNKS``, per layer) so that no tile outgrows the
registers: a chunk's output is put in place with a select over a ``(rows, chunks, chunk)`` view, which costs
``chunks`` selects per output element against ``K`` multiply-adds, and is compiled only for layers that need it.

Two regimes, like the per-sample linear kernels:

* ``N == 1``: a chain of batched GEMVs, memory-bound on the weights (``B * P`` elements, each read once). A program
  owns ``BLOCK_B`` samples; per layer it streams the weight in chunks of whole rows (contiguous in the row) as a
  ``(BLOCK_B, rows, K)`` tile, multiplies on CUDA cores in float32 and keeps ``h`` in registers. The backward is one
  pass per program over the layers, last to first: each weight chunk is read once for ``dh = W^T dz`` and the
  matching ``dW = dz h^T`` chunk written in the same step (coalesced: dW rows are contiguous in ``dparams``).
* ``N > 1``: a program owns one tile of ``BLOCK_N`` points of one sample and runs every layer with ``tl.dot``
  (float32 accumulation; float32 inputs as tf32 exactly when PyTorch's matmuls may use it, else tf32x3): each
  weight is read once per program (from L2 for all but the first program of a sample: a sample's tiles are adjacent
  in the grid).

What the backward needs, recompute or keep (``mlp_keeps_hidden(single_point)``: keep for ``N == 1`` only):

* ``N > 1``: the backward kernel recomputes the forward of its tile in registers (each layer's input in the input
  dtype, and the pre-activation where the activation's derivative needs it), then runs the backward. Keeping would
  write ``B * N * sum(hidden)`` values in the forward and read them in the backward; recomputing costs the forward's
  ``2 * B * N * sum(K * M)`` FLOPs on tensor cores instead. Per point and hidden unit that is ``2 * K`` FLOPs against
  4 bytes (bfloat16, written once and read once): recomputing wins while ``K < 2 * FLOP/s / (bytes/s)``, about 200
  on an H100 reaching 300 TFLOP/s (under half its bfloat16 peak), which covers the widths of neural fields
  (64-128); and it saves that memory, which dominates a field's training footprint.
* ``N == 1``: the activations are tiny (``B * sum(hidden)``) but recomputing them means reading every weight again,
  so the forward keeps what ``backends.torch.mlp.saved_kinds`` says (3 passes over the weights per training step
  instead of 4). A backward that finds nothing kept (the forward ran without grad mode) first reruns the forward
  kernel to store them. When asked to keep (``save_hidden``) the ``N > 1`` forward writes them too, and its
  backward recomputes anyway.

The dW reduction for ``N > 1``. Several tiles of one sample each produce a partial dW of the whole row of ``P``
parameters. Two modes:

* per tile (``ATOMIC``): one program per tile, float32 ``atomic_add`` (relaxed) into one zeroed float32 ``(B, P)``
  buffer (``dparams`` itself for float32), cast after. Most parallelism, no partial buffers; the order of the adds
  varies, so ``dparams`` is not bitwise deterministic. Used when there are too few samples to fill the GPU.
* per split (``not ATOMIC``): ``SPLITS`` programs per sample, each looping over its share of the tiles and adding
  into its own float32 slice (the first tile stores, the rest read-add-write), then the slices are summed in a
  fixed order. Deterministic. Used when the samples alone fill the GPU (one split: each program owns a sample, no
  partial buffer), and when ``torch.use_deterministic_algorithms(True)`` is on (then a ``(B, SPLITS, P)`` buffer).

Either way a tile of ``BLOCK_N`` points moves ``4 * P`` bytes of dW partials for ``6 * BLOCK_N * P`` FLOPs, which is
why the backward prefers large tiles where registers allow.

Indices: 1-D grids, sample outermost (no grid axis limit matters: axis 0 allows 2^31 - 1 programs); per-sample base
offsets (and per-split ones of the dW buffer) in int64; offsets inside one sample in int32 unless one sample spans
2^31 elements (``INDEX64``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...activations import Activation
from ...layout import MLPSpec
from ..torch import mlp as torch_mlp
from .activations import activation_forward, activation_grad
from ._compat import loop_bound
from ._config import AUTOTUNE, INTERPRET
from .linear import _check_grid, _device_guard, _device_sms, _dot_precision, _n_bucket, _next_pow2, _upcast

# The widest layer the kernels take (in, hidden and out alike). ``hyperkernels._dispatch`` keeps the same number
# for ``backend="auto"``.
MAX_WIDTH = 256

_INT32_MAX = 2**31 - 1

# What the forward stores of each layer when asked to keep (``backends.torch.mlp.saved_kinds``), as kernel codes.
_KIND_CODES = {"-": 0, "h": 1, "z": 2}

# ------------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------------

# GEMV (N == 1): (BLOCK_B samples per program, num_warps). A weight chunk of BLOCK_B x rows x K elements is held in
# registers at _GEMV_ELEMS_PER_THREAD per thread: 32 loads in flight per thread cover memory latency with a few
# programs per SM, and leave room for h, the partial sums and addresses.
_GEMV_CONFIGS = [(1, 4), (2, 4), (4, 4), (1, 8), (2, 8), (4, 8)]
_GEMV_ELEMS_PER_THREAD = 32
# The interpreter runs one program at a time in numpy: few, large programs, unchunked layers.
_INTERPRETER_GEMV = dict(BLOCK_B=16, TILE=2**16)

# GEMM (N > 1): (BLOCK_N points per program, num_warps), the candidates by the widest padded layer and the dots'
# operand class, best first: 2 (16-bit), 4 (float32 with tf32 dots), "tf32x3" (float32, the default: see
# linear._dot_precision). Read off sm_90 builds (registers and spills: tests/offline_compile.py, Triton 3.9; first
# from 3.6 and 3.9 builds of 16-bit nets) of [2, 64, 64, 64, 3], [2, 128, 128, 128, 3] and [256, 100, 256] with
# gelu (the most registers) and relu: the backward holds every layer's input of its tile (and the pre-activations
# gelu / silu / sine need) in registers while it runs, so its tiles shrink with the width; with 4 warps it spills at
# width 64 where 8 warps do not. The tf32x3 backward spills at every tile tried (16-64 points, 4 or 8 warps, 16-128
# row chunks: 164-3400 B at widths 64-256), and so does its forward at width 256; the least-spilling are listed
# (bench/results/gpu_resources.md has every number, tests/offline_compile.py's SPILL_EXCEPTIONS the allowances).
# Not yet timed on a GPU: the autotuner measures these.
_GEMM_FWD_CANDIDATES = {
    (64, 2): [(64, 4), (128, 8), (64, 8)], (64, 4): [(64, 4), (128, 8), (64, 8)],
    (128, 2): [(64, 4), (128, 8), (64, 8)], (128, 4): [(64, 8), (32, 4), (16, 4)],
    (256, 2): [(32, 4), (16, 4)], (256, 4): [(32, 4), (16, 4)],
    (64, "tf32x3"): [(64, 4), (64, 8)], (128, "tf32x3"): [(16, 4)], (256, "tf32x3"): [(16, 8), (16, 4)],
}
_GEMM_BWD_CANDIDATES = {
    (64, 2): [(64, 8), (128, 8), (32, 8)], (64, 4): [(64, 8), (32, 8), (16, 4)],
    (128, 2): [(16, 4), (32, 4)], (128, 4): [(16, 8), (16, 4)],
    (256, 2): [(16, 4), (32, 4)], (256, 4): [(16, 4)],
    (64, "tf32x3"): [(16, 8), (32, 8)], (128, "tf32x3"): [(16, 8), (32, 8)], (256, "tf32x3"): [(16, 8)],
}
_GEMM_FWD_CONFIGS = sorted({c for cands in _GEMM_FWD_CANDIDATES.values() for c in cands})
_GEMM_BWD_CONFIGS = sorted({c for cands in _GEMM_BWD_CANDIDATES.values() for c in cands})
_INTERPRETER_GEMM = dict(BLOCK_N=32)
# Weight chunks of the GEMM layers. A layer's weight passes from global memory through registers into shared
# memory (tl.dot's right operand): chunks of whole rows bound the registers that staging takes. sm_90 builds of the
# backward (which holds the layer inputs of its tile meanwhile) stop spilling at 16 KiB chunks for width 128 in
# bfloat16; the forward holds nothing else and takes 32 KiB (a whole 128 x 128 bfloat16 layer). The dW chunk is the
# float32 accumulator of dz^T h (rows x K) in registers. tf32x3 holds two float32 values per operand element (see
# _operand_bytes), and float32's backward needs both chunks halved again: at width 128 (sm_90, gelu, 16 points)
# that takes tf32 from 444 B of spills to none, and tf32x3 from 1636 B to 272 B.
_FWD_W_CHUNK_BYTES = 32 * 1024
_BWD_W_CHUNK_BYTES = 16 * 1024
_BWD_DW_CHUNK = 32 * 64
_F32_BWD_SHRINK = 2
# Points per program below which splitting a sample's tiles over more programs is not worth a float32 partial row.
_MIN_POINTS_PER_SPLIT = 128


def _pad(n: int) -> int:
    return max(16, _next_pow2(n))


def _chunks(pads, elems: int) -> tuple:
    """Rows of each layer's weight per chunk: the whole layer if ``rows x K <= elems``, else the largest power of two
    that fits (at least 16: tl.dot's smallest)."""
    return tuple(min(m, max(16, elems // k)) for k, m in zip(pads[:-1], pads[1:]))


def _gemv_chunks(pads, block_b: int, tile: int) -> tuple:
    """Rows per chunk of a GEMV layer: ``BLOCK_B x rows x K <= tile`` (at least one row)."""
    return tuple(min(m, max(1, tile // (block_b * k))) for k, m in zip(pads[:-1], pads[1:]))


def _gemv_configs(interpret: bool = INTERPRET) -> list:
    if interpret:
        return [triton.Config(dict(_INTERPRETER_GEMV), num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_B": bb, "TILE": _GEMV_ELEMS_PER_THREAD * 32 * w}, num_warps=w, num_stages=1)
            for bb, w in _GEMV_CONFIGS]


def _gemv_prune(configs, named_args, **kwargs):
    """Several samples per program only where one whole layer of each still fits the tile (otherwise more rows of
    one sample do the same job with better locality), and no more samples than the batch has."""
    args = {**named_args, **kwargs}
    pads, batch = args["PADS"], args["B"]
    biggest = max(k * m for k, m in zip(pads[:-1], pads[1:]))
    kept = [c for c in configs if c.kwargs["BLOCK_B"] <= _next_pow2(batch)
            and (c.kwargs["BLOCK_B"] == 1 or c.kwargs["BLOCK_B"] * biggest <= c.kwargs["TILE"])]
    kept = kept or [c for c in configs if c.kwargs["BLOCK_B"] == 1]
    # Without autotuning: the most samples per program, then the fewest warps.
    kept.sort(key=lambda c: (-c.kwargs["BLOCK_B"], c.num_warps))
    return kept if AUTOTUNE else kept[:1]


def _gemm_configs(table, interpret: bool = INTERPRET) -> list:
    if interpret:
        return [triton.Config(dict(_INTERPRETER_GEMM), num_warps=4, num_stages=1)]
    # num_stages=1: the layers are unrolled, not looped, so there is nothing to software-pipeline, and the tile loop
    # of the backward would only multiply its shared memory.
    return [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=1) for bn, w in table]


def _operand_class(elem: int, precision) -> object:
    """The key of a GEMM candidate table: 2 for 16-bit dots, 4 for float32 with tf32, "tf32x3" for float32 otherwise
    (also without a precision: it is float32's default)."""
    if elem == 2:
        return 2
    return 4 if precision == "tf32" else "tf32x3"


def _gemm_prune(backward: bool):
    """The candidates of the network's widest layer and operand class (widths up to 64 count as 64), without tiles
    of more points than the problem has."""
    table = _GEMM_BWD_CANDIDATES if backward else _GEMM_FWD_CANDIDATES

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        n, pads, elem = args["N"], args["PADS"], args["x_ptr"].element_size()
        wanted = table[(max(64, max(pads)), _operand_class(elem, args.get("DOT_PRECISION")))]
        by_tile = {(c.kwargs["BLOCK_N"], c.num_warps): c for c in configs}
        kept = [by_tile[t] for t in wanted if t in by_tile and t[0] <= max(16, _next_pow2(n))]
        if not kept:  # fewer points than every candidate's tile: the smallest tile
            kept = [min(configs, key=lambda c: (c.kwargs["BLOCK_N"], c.num_warps))]
        return kept if AUTOTUNE else kept[:1]

    return prune


def _gemv_chunk_heuristic(args):
    return _gemv_chunks(args["PADS"], args["BLOCK_B"], args["TILE"])


def _tf32x3(args) -> bool:
    return args.get("DOT_PRECISION") == "tf32x3"


def _operand_bytes(args) -> int:
    """Register bytes per weight element on its way to a tl.dot: tf32x3 splits each float32 into two (a TF32 high
    part and the remainder), so its chunks hold half the elements."""
    elem = args["x_ptr"].element_size()
    return 2 * elem if _tf32x3(args) else elem


def _fwd_chunk_heuristic(args):
    return _chunks(args["PADS"], _FWD_W_CHUNK_BYTES // _operand_bytes(args))


def _f32_shrink(args) -> int:
    return _F32_BWD_SHRINK if args["x_ptr"].element_size() == 4 else 1


def _bwd_fwd_chunk_heuristic(args):
    return _chunks(args["PADS"], _BWD_W_CHUNK_BYTES // (_operand_bytes(args) * _f32_shrink(args)))


def _bwd_chunk_heuristic(args):
    return _chunks(args["PADS"], _BWD_DW_CHUNK // _f32_shrink(args))


# Autotune keys: the network (its constexpr tuples select the compiled kernel anyway) and, for the GEMMs, the number
# of points rounded to a power of two; the autotuner adds the tensors' dtypes.
_NET_KEY = ["SIZES", "WOFF", "BOFF", "ACTS"]

# ------------------------------------------------------------------------------------------------------
# Kernels: helpers
# ------------------------------------------------------------------------------------------------------


@triton.jit
def _store_rows(ptr, rows, mask_r, v, M: tl.constexpr, MP: tl.constexpr):
    """v (R, MP) into rows ``rows`` (int64 row indices) of a contiguous (rows, M) tensor."""
    om = tl.arange(0, MP)
    tl.store(ptr + rows[:, None] * M + om[None, :], v.to(ptr.dtype.element_ty),
             mask=mask_r[:, None] & (om < M)[None, :])


@triton.jit
def _save_layer(ptr, rows, mask_r, z, h, M: tl.constexpr, MP: tl.constexpr, KIND: tl.constexpr):
    """What the forward keeps of a layer (KIND 1: its output h, 2: its pre-activation z, 0: nothing)."""
    if KIND == 2:
        _store_rows(ptr, rows, mask_r, z, M, MP)
    elif KIND == 1:
        _store_rows(ptr, rows, mask_r, h, M, MP)


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


# -- N == 1: batched GEMV layers on CUDA cores ----------------------------------------------------------


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
        om = tl.arange(0, MP)
        if INDEX64:
            om = om.to(tl.int64)
        z = tl.sum(_gemv_chunk(p_rows, mask_bk, om, ok, stride_pk, W_OFF, K, M) * h[:, None, :], axis=2)
    else:
        z3 = tl.zeros((BLOCK_B, C, BM), dtype=tl.float32)
        chunk = tl.arange(0, C)
        for c in range(C):
            om_c = c * BM + tl.arange(0, BM)  # (a fresh name: a runtime loop would carry an outer om)
            if INDEX64:
                om_c = om_c.to(tl.int64)
            part = tl.sum(_gemv_chunk(p_rows, mask_bk, om_c, ok, stride_pk, W_OFF, K, M) * h[:, None, :], axis=2)
            z3 = tl.where((chunk == c)[None, :, None], part[:, None, :], z3)
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
        om = tl.arange(0, MP)
        if INDEX64:
            om = om.to(tl.int64)
        dh = _gemv_chunk_backward(dz, om, h_in, p_rows, d_rows, mask_bk, ok, dh, stride_pk, W_OFF, K, M,
                                  NEED_DW, NEED_DH)
    else:
        dz3 = tl.reshape(dz, (BLOCK_B, C, BM))
        chunk = tl.arange(0, C)
        for c in range(C):
            dzc = tl.sum(tl.where((chunk == c)[None, :, None], dz3, 0.0), axis=1)
            om_c = c * BM + tl.arange(0, BM)
            if INDEX64:
                om_c = om_c.to(tl.int64)
            dh = _gemv_chunk_backward(dzc, om_c, h_in, p_rows, d_rows, mask_bk, ok, dh, stride_pk, W_OFF, K, M,
                                      NEED_DW, NEED_DH)
    return dh


# -- N > 1: tl.dot layers for a tile of points --------------------------------------------------------


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
    C: tl.constexpr = MP // BM
    if C == 1:
        om = tl.arange(0, MP)
        if INDEX64:
            om = om.to(tl.int64)
        wt = tl.load(p_row + (W_OFF + om[None, :] * K + ok[:, None]) * stride_pk,
                     mask=(ok < K)[:, None] & (om < M)[None, :], other=0.0)
        if UPCAST:
            wt = wt.to(tl.float32)
        z = tl.dot(h, wt, input_precision=DOT_PRECISION)
    else:
        z3 = tl.zeros((BLOCK_N, C, BM), dtype=tl.float32)
        chunk = tl.arange(0, C)
        for c in range(C):
            om_c = c * BM + tl.arange(0, BM)
            if INDEX64:
                om_c = om_c.to(tl.int64)
            wt = tl.load(p_row + (W_OFF + om_c[None, :] * K + ok[:, None]) * stride_pk,
                         mask=(ok < K)[:, None] & (om_c < M)[None, :], other=0.0)
            if UPCAST:
                wt = wt.to(tl.float32)
            part = tl.dot(h, wt, input_precision=DOT_PRECISION)
            z3 = tl.where((chunk == c)[None, :, None], part[:, None, :], z3)
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
        om = tl.arange(0, MP)
        if INDEX64:
            om = om.to(tl.int64)
        dh = _gemm_chunk_backward(dz, om, h_in, p_row, dw_row, rel, ok, dh, stride_pk, W_OFF, K, M,
                                  NEED_DW, NEED_DH, ATOMIC, DOT_PRECISION, UPCAST)
    else:
        dz3 = tl.reshape(dz, (BLOCK_N, C, BM))
        chunk = tl.arange(0, C)
        for c in range(C):
            dzc = tl.sum(tl.where((chunk == c)[None, :, None], dz3, 0.0), axis=1)
            om_c = c * BM + tl.arange(0, BM)
            if INDEX64:
                om_c = om_c.to(tl.int64)
            dh = _gemm_chunk_backward(dzc, om_c, h_in, p_row, dw_row, rel, ok, dh, stride_pk, W_OFF, K, M,
                                      NEED_DW, NEED_DH, ATOMIC, DOT_PRECISION, UPCAST)
    return dh


# ------------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------------


@triton.autotune(configs=_gemv_configs(), key=_NET_KEY, prune_configs_by={"early_config_prune": _gemv_prune})
@triton.heuristics({"CHUNKS": _gemv_chunk_heuristic})
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
            _save_layer(saved[l], rows, mask_b, z, h, SIZES[l + 1], PADS[l + 1], KINDS[l])
    _store_rows(y_ptr, rows, mask_b, h, SIZES[NUM_LAYERS], PADS[NUM_LAYERS])


@triton.autotune(configs=_gemv_configs(), key=_NET_KEY + ["NEED_DX", "NEED_DW"],
                 prune_configs_by={"early_config_prune": _gemv_prune})
@triton.heuristics({"CHUNKS": _gemv_chunk_heuristic})
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
        _store_rows(dx_ptr, rows, mask_b, dh, SIZES[0], PADS[0])


@triton.autotune(configs=_gemm_configs(_GEMM_FWD_CONFIGS), key=_NET_KEY + ["N_BUCKET"],
                 prune_configs_by={"early_config_prune": _gemm_prune(backward=False)})
@triton.heuristics({"CHUNKS": _fwd_chunk_heuristic})
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
            _save_layer(saved[l], rows, mask_n, z, a, SIZES[l + 1], PADS[l + 1], KINDS[l])
        h = a.to(x_ptr.dtype.element_ty)  # the next layer's tl.dot operand, rounded like PyTorch's layer output
        # Without it the compiler hoists later layers' weight loads into this one's registers (sm_90 builds of
        # [2, 128, 128, 128, 3] with 4 warps: 227 registers without, 128 with).
        tl.debug_barrier()
    _store_rows(y_ptr, rows, mask_n, a, SIZES[NUM_LAYERS], PADS[NUM_LAYERS])


@triton.autotune(configs=_gemm_configs(_GEMM_BWD_CONFIGS), key=_NET_KEY + ["N_BUCKET", "NEED_DX", "NEED_DW", "ATOMIC"],
                 prune_configs_by={"early_config_prune": _gemm_prune(backward=True)}, reset_to_zero=["dw_ptr"])
@triton.heuristics({"CHUNKS": _bwd_chunk_heuristic, "FWD_CHUNKS": _bwd_fwd_chunk_heuristic})
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
            _store_rows(dx_ptr, b * N + offs_n, mask_n, dh, SIZES[0], PADS[0])


# ------------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------------


def check_widths(spec: MLPSpec) -> None:
    widest = max(spec.sizes)
    if widest > MAX_WIDTH:
        raise ValueError(
            f"layout: the triton backend's fused MLP takes widths up to {MAX_WIDTH}, got sizes {list(spec.sizes)}; "
            "use backend='torch' (or 'auto', which picks it) for wider layers"
        )


def _net_constexprs(spec: MLPSpec, act: Activation, out_act: Activation) -> dict:
    layers = spec.num_layers
    return dict(
        SIZES=tuple(int(s) for s in spec.sizes),
        PADS=tuple(_pad(s) for s in spec.sizes),
        WOFF=tuple(int(o) for o in spec.weight_offsets),
        BOFF=tuple(int(o) for o in spec.bias_offsets),
        ACTS=tuple([act.code] * (layers - 1) + [out_act.code]),
        NUM_LAYERS=layers,
    )


def _kinds(spec: MLPSpec, act: Activation, out_act: Activation) -> tuple:
    return tuple(_KIND_CODES[k] for k in torch_mlp.saved_kinds(spec, act, out_act))


def _keep_z(spec: MLPSpec, act: Activation, out_act: Activation) -> tuple:
    return tuple(a.needs_preactivation for a in [act] * (spec.num_layers - 1) + [out_act])


def _extent(t: Tensor, dims) -> int:
    """The largest element offset spanned by dims ``dims`` of ``t``."""
    return sum((t.shape[d] - 1) * abs(t.stride(d)) for d in dims)


def _index64(params: Tensor, *views: Tensor) -> bool:
    """Whether offsets inside one sample may pass int32: a parameter row, or the points x channels of a 3-D view."""
    return _extent(params, (1,)) > _INT32_MAX or any(_extent(v, (1, 2)) > _INT32_MAX for v in views)


def _fold_shared(x: Tensor, params: Tensor) -> bool:
    """One point per sample and one parameter row shared by all (batch stride 0): the B points are the rows of one
    sample's GEMM, which runs on tensor cores instead of B GEMVs over the same weights."""
    return x.shape[1] == 1 and params.stride(0) == 0 and x.shape[0] > 1


def _launch_forward(x: Tensor, params: Tensor, y: Tensor, saved, spec: MLPSpec, act: Activation,
                    out_act: Activation, w0: float) -> None:
    """Writes the output into ``y`` (contiguous (B, N, out)) and, when ``saved`` is a list, each layer's kept value
    into it (contiguous (B, N, M_l), an empty tensor where nothing is kept)."""
    batch, n, _ = x.shape
    net = _net_constexprs(spec, act, out_act)
    save = saved is not None
    saved_args = tuple(s if s.numel() else y for s in saved) if save else (y,) * spec.num_layers
    common = dict(**net, KINDS=_kinds(spec, act, out_act), SAVE=save)
    if _fold_shared(x, params):
        # (B, 1, in) -> (1, B, in): contiguous (B, 1, M) outputs are the same memory as (1, B, M) ones.
        x = x.as_strided((1, batch, x.shape[2]), (0, x.stride(0), x.stride(2)))
        batch, n = 1, batch
    if n == 1:
        grid = lambda meta: (_check_grid(triton.cdiv(batch, meta["BLOCK_B"])),)  # noqa: E731
        _fwd_gemv_kernel[grid](
            x, params, y, saved_args,
            batch,
            x.stride(0), x.stride(2),
            params.stride(0), params.stride(1),
            w0,
            INDEX64=_index64(params, x), **common,
        )
        return
    grid = lambda meta: (_check_grid(batch * triton.cdiv(n, meta["BLOCK_N"])),)  # noqa: E731
    _fwd_gemm_kernel[grid](
        x, params, y, saved_args,
        n, _n_bucket(n),
        *x.stride(),
        *params.stride(),
        w0,
        DOT_PRECISION=_dot_precision(x.dtype), UPCAST=_upcast(x.dtype),
        INDEX64=_index64(params, x), **common,
    )


def _saved_buffers(x: Tensor, batch: int, n: int, spec: MLPSpec, act: Activation, out_act: Activation) -> list:
    """One contiguous (B, N, M_l) tensor per layer that keeps something, an empty one per layer that does not."""
    kinds = torch_mlp.saved_kinds(spec, act, out_act)
    return [x.new_empty((batch, n, m)) if k != "-" else x.new_empty(0) for m, k in zip(spec.sizes[1:], kinds)]


def _empty_problem(x: Tensor, params: Tensor) -> bool:
    return x.numel() == 0 or params.numel() == 0


def mlp_forward(x: Tensor, params: Tensor, spec: MLPSpec, act: Activation, out_act: Activation, w0: float,
                save_hidden: bool):
    """See ``hyperkernels/backends/__init__.py``: ``(y, saved)``, y contiguous ``(B, N, out)``."""
    check_widths(spec)
    if _empty_problem(x, params):  # nothing to launch; keeps every empty-size rule in one place
        return torch_mlp.mlp_forward(x, params, spec, act, out_act, w0, save_hidden)
    batch, n, _ = x.shape
    y = x.new_empty((batch, n, spec.sizes[-1]))
    saved = _saved_buffers(x, batch, n, spec, act, out_act) if save_hidden else None
    with _device_guard(x):
        _launch_forward(x, params, y, saved, spec, act, out_act, w0)
    return y, (saved if save_hidden else [])


def _programs_wanted(device: torch.device) -> int:
    """Programs that keep every SM busy with a few resident each; on CPU (the interpreter) parallelism is moot."""
    sms = _device_sms(device)
    return 1 if sms is None else 4 * sms


def _dw_mode(batch: int, n: int, need_dw: bool, device: torch.device) -> tuple[bool, int]:
    """(ATOMIC, SPLITS) of the N > 1 backward; see the module docstring."""
    if not need_dw:
        return True, 1  # nothing to reduce: one program per tile
    wanted = _programs_wanted(device)
    if batch >= wanted:
        return False, 1
    if torch.are_deterministic_algorithms_enabled():
        return False, max(1, min(triton.cdiv(wanted, batch), n // _MIN_POINTS_PER_SPLIT))
    return True, 1


def _launch_gemm_backward(grad_y, x, params, dx, dparams, spec, act, out_act, w0) -> None:
    batch, n, _ = x.shape
    need_dx, need_dw = dx is not None, dparams is not None
    atomic, splits = _dw_mode(batch, n, need_dw, x.device)
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
        buf = torch.zeros((batch, splits, spec.numel), dtype=f32, device=x.device)
        stride_dwb, stride_dws = buf.stride(0), buf.stride(1)

    if atomic:
        grid = lambda meta: (_check_grid(batch * triton.cdiv(n, meta["BLOCK_N"])),)  # noqa: E731
    else:
        grid = (_check_grid(batch * splits),)
    _bwd_gemm_kernel[grid](
        grad_y, x, params, dx if need_dx else x, buf,
        n, _n_bucket(n), splits,
        *grad_y.stride(),
        *x.stride(),
        *params.stride(),
        stride_dwb, stride_dws,
        w0,
        **_net_constexprs(spec, act, out_act), KEEP_Z=_keep_z(spec, act, out_act),
        NEED_DX=need_dx, NEED_DW=need_dw, ATOMIC=atomic,
        DOT_PRECISION=_dot_precision(x.dtype), UPCAST=_upcast(x.dtype), INDEX64=_index64(params, x, grad_y),
    )
    if need_dw and buf is not dparams:
        if buf.dim() == 3:
            torch.sum(buf, dim=1, out=dparams) if dparams.dtype == f32 else dparams.copy_(buf.sum(1))
        else:
            dparams.copy_(buf)


def _launch_gemv_backward(grad_y, x, params, y, saved, dx, dparams, spec, act, out_act, w0) -> None:
    batch = x.shape[0]
    need_dx, need_dw = dx is not None, dparams is not None
    saved_args = tuple(s.contiguous() if s.numel() else y for s in saved)
    grid = lambda meta: (_check_grid(triton.cdiv(batch, meta["BLOCK_B"])),)  # noqa: E731
    _bwd_gemv_kernel[grid](
        grad_y, x, params, y.contiguous(), saved_args, dx if need_dx else x, dparams if need_dw else x,
        batch,
        grad_y.stride(0), grad_y.stride(2),
        x.stride(0), x.stride(2),
        params.stride(0), params.stride(1),
        dparams.stride(0) if need_dw else 0,
        w0,
        **_net_constexprs(spec, act, out_act), KINDS=_kinds(spec, act, out_act),
        NEED_DX=need_dx, NEED_DW=need_dw, INDEX64=_index64(params, x),
    )


def mlp_backward(grad_y: Tensor, x: Tensor, params: Tensor, y: Tensor, saved, spec: MLPSpec, act: Activation,
                 out_act: Activation, w0: float, output_mask):
    """See ``hyperkernels/backends/__init__.py``: ``(dx, dparams)``, contiguous, None where not asked for."""
    need_dx, need_dw = output_mask
    check_widths(spec)
    if _empty_problem(x, params):
        return torch_mlp.mlp_backward(grad_y, x, params, y, saved, spec, act, out_act, w0, output_mask)
    batch, n, _ = x.shape
    dx = x.new_empty(x.shape) if need_dx else None
    # Every entry of a row belongs to exactly one layer's weight or bias (MLPSpec tiles [0, P)): no zero fill.
    dparams = params.new_empty((batch, spec.numel)) if need_dw else None
    if not (need_dx or need_dw):
        return dx, dparams
    with _device_guard(x):
        if n == 1:
            if not saved:  # rerun the forward, keeping each layer's value (B * sum(M_l) elements: small)
                saved = _saved_buffers(x, batch, 1, spec, act, out_act)
                _launch_forward(x, params, torch.empty_like(y, memory_format=torch.contiguous_format), saved, spec,
                                act, out_act, w0)
            _launch_gemv_backward(grad_y, x, params, y, saved, dx, dparams, spec, act, out_act, w0)
        else:
            _launch_gemm_backward(grad_y, x, params, dx, dparams, spec, act, out_act, w0)
    return dx, dparams
