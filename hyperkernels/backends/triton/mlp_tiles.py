"""The fused MLP's tile tables: the autotune configs of its kernels, how they are pruned per network, and how each
layer's weight is cut into chunks of rows (the ``CHUNKS`` heuristics). Read by ``mlp_gemv.py`` and ``mlp_gemm.py``.

Every number here was read off offline sm_90 builds (registers and spills: tests/backends/triton/offline_compile.py;
bench/results/gpu_resources.md has every number); none was yet timed on a GPU: the autotuner measures the candidates.
"""
from __future__ import annotations

import triton

from ._config import INTERPRET
from ._launch import autotune_keep, next_pow2

# ------------------------------------------------------------------------------------------------------
# GEMV (N == 1)
# ------------------------------------------------------------------------------------------------------

# (BLOCK_B samples per program, num_warps). A weight chunk of BLOCK_B x rows x K elements is held in registers at
# GEMV_ELEMS_PER_THREAD per thread: 32 loads in flight per thread cover memory latency with a few programs per SM,
# and leave room for h, the partial sums and addresses.
GEMV_CONFIGS = [(1, 4), (2, 4), (4, 4), (1, 8), (2, 8), (4, 8)]
GEMV_ELEMS_PER_THREAD = 32
# The interpreter runs one program at a time in numpy: few, large programs, unchunked layers.
_INTERPRETER_GEMV = dict(BLOCK_B=16, TILE=2**16)


def pad(n: int) -> int:
    """A layer width padded for the kernels: a power of two, at least 16 (tl.dot's smallest)."""
    return max(16, next_pow2(n))


def gemv_chunks(pads, block_b: int, tile: int) -> tuple:
    """Rows per chunk of a GEMV layer: ``BLOCK_B x rows x K <= tile`` (at least one row)."""
    return tuple(min(m, max(1, tile // (block_b * k))) for k, m in zip(pads[:-1], pads[1:]))


def gemv_configs(interpret: bool = INTERPRET) -> list:
    if interpret:
        return [triton.Config(dict(_INTERPRETER_GEMV), num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_B": bb, "TILE": GEMV_ELEMS_PER_THREAD * 32 * w}, num_warps=w, num_stages=1)
            for bb, w in GEMV_CONFIGS]


def gemv_prune(configs, named_args, **kwargs):
    """Several samples per program only where one whole layer of each still fits the tile (otherwise more rows of
    one sample do the same job with better locality), and no more samples than the batch has."""
    args = {**named_args, **kwargs}
    pads, batch = args["PADS"], args["B"]
    biggest = max(k * m for k, m in zip(pads[:-1], pads[1:]))
    kept = [c for c in configs if c.kwargs["BLOCK_B"] <= next_pow2(batch)
            and (c.kwargs["BLOCK_B"] == 1 or c.kwargs["BLOCK_B"] * biggest <= c.kwargs["TILE"])]
    kept = kept or [c for c in configs if c.kwargs["BLOCK_B"] == 1]
    # Without autotuning: the most samples per program, then the fewest warps.
    kept.sort(key=lambda c: (-c.kwargs["BLOCK_B"], c.num_warps))
    return autotune_keep(kept)


def gemv_chunk_heuristic(args):
    return gemv_chunks(args["PADS"], args["BLOCK_B"], args["TILE"])


# ------------------------------------------------------------------------------------------------------
# GEMM (N > 1)
# ------------------------------------------------------------------------------------------------------

# (BLOCK_N points per program, num_warps), the candidates by the widest padded layer and the dots' operand class,
# best first: 2 (16-bit), 4 (float32 with tf32 dots), "tf32x3" (float32, the default: see _launch.dot_precision).
# Read off sm_90 builds (Triton 3.9; first from 3.6 and 3.9 builds of 16-bit nets) of [2, 64, 64, 64, 3],
# [2, 128, 128, 128, 3] and [256, 100, 256] with gelu (the most registers) and relu: the backward holds every layer's
# input of its tile (and the pre-activations gelu / silu / sine need) in registers while it runs, so its tiles shrink
# with the width; with 4 warps it spills at width 64 where 8 warps do not. The tf32x3 backward spills at every tile
# tried (16-64 points, 4 or 8 warps, 16-128 row chunks: 164-3400 B at widths 64-256), and so does its forward at width
# 256; the least-spilling are listed (offline_compile.py's SPILL_EXCEPTIONS has the allowances). The widest key is
# the widest layer the kernels take (``TritonBackend.mlp_max_width``).
GEMM_FWD_CANDIDATES = {
    (64, 2): [(64, 4), (128, 8), (64, 8)], (64, 4): [(64, 4), (128, 8), (64, 8)],
    (128, 2): [(64, 4), (128, 8), (64, 8)], (128, 4): [(64, 8), (32, 4), (16, 4)],
    (256, 2): [(32, 4), (16, 4)], (256, 4): [(32, 4), (16, 4)],
    (64, "tf32x3"): [(64, 4), (64, 8)], (128, "tf32x3"): [(16, 4)], (256, "tf32x3"): [(16, 8), (16, 4)],
}
GEMM_BWD_CANDIDATES = {
    (64, 2): [(64, 8), (128, 8), (32, 8)], (64, 4): [(64, 8), (32, 8), (16, 4)],
    (128, 2): [(16, 4), (32, 4)], (128, 4): [(16, 8), (16, 4)],
    (256, 2): [(16, 4), (32, 4)], (256, 4): [(16, 4)],
    (64, "tf32x3"): [(16, 8), (32, 8)], (128, "tf32x3"): [(16, 8), (32, 8)], (256, "tf32x3"): [(16, 8)],
}
GEMM_FWD_CONFIGS = sorted({c for cands in GEMM_FWD_CANDIDATES.values() for c in cands})
GEMM_BWD_CONFIGS = sorted({c for cands in GEMM_BWD_CANDIDATES.values() for c in cands})
_INTERPRETER_GEMM = dict(BLOCK_N=32)

# Weight chunks of the GEMM layers. A layer's weight passes from global memory through registers into shared
# memory (tl.dot's right operand): chunks of whole rows bound the registers that staging takes. sm_90 builds of the
# backward (which holds the layer inputs of its tile meanwhile) stop spilling at 16 KiB chunks for width 128 in
# bfloat16; the forward holds nothing else and takes 32 KiB (a whole 128 x 128 bfloat16 layer). The dW chunk is the
# float32 accumulator of dz^T h (rows x K) in registers. tf32x3 holds two float32 values per operand element (see
# _operand_bytes), and float32's backward needs both chunks halved again: at width 128 (sm_90, gelu, 16 points)
# that takes tf32 from 444 B of spills to none, and tf32x3 from 1636 B to 272 B.
FWD_W_CHUNK_BYTES = 32 * 1024
BWD_W_CHUNK_BYTES = 16 * 1024
BWD_DW_CHUNK = 32 * 64
_F32_BWD_SHRINK = 2


def chunks(pads, elems: int) -> tuple:
    """Rows of each layer's weight per chunk: the whole layer if ``rows x K <= elems``, else the largest power of two
    that fits (at least 16: tl.dot's smallest)."""
    return tuple(min(m, max(16, elems // k)) for k, m in zip(pads[:-1], pads[1:]))


def gemm_configs(table, interpret: bool = INTERPRET) -> list:
    if interpret:
        return [triton.Config(dict(_INTERPRETER_GEMM), num_warps=4, num_stages=1)]
    # num_stages=1: the layers are unrolled, not looped, so there is nothing to software-pipeline, and the tile loop
    # of the backward would only multiply its shared memory.
    return [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=1) for bn, w in table]


def operand_class(elem: int, precision) -> object:
    """The key of a GEMM candidate table: 2 for 16-bit dots, 4 for float32 with tf32, "tf32x3" for float32 otherwise
    (also without a precision: it is float32's default)."""
    if elem == 2:
        return 2
    return 4 if precision == "tf32" else "tf32x3"


def gemm_prune(backward: bool):
    """The candidates of the network's widest layer and operand class (widths up to 64 count as 64), without tiles
    of more points than the problem has."""
    table = GEMM_BWD_CANDIDATES if backward else GEMM_FWD_CANDIDATES

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        n, pads, elem = args["N"], args["PADS"], args["x_ptr"].element_size()
        wanted = table[(max(64, max(pads)), operand_class(elem, args.get("DOT_PRECISION")))]
        by_tile = {(c.kwargs["BLOCK_N"], c.num_warps): c for c in configs}
        kept = [by_tile[t] for t in wanted if t in by_tile and t[0] <= max(16, next_pow2(n))]
        if not kept:  # fewer points than every candidate's tile: the smallest tile
            kept = [min(configs, key=lambda c: (c.kwargs["BLOCK_N"], c.num_warps))]
        return autotune_keep(kept)

    return prune


def _operand_bytes(args) -> int:
    """Register bytes per weight element on its way to a tl.dot: tf32x3 splits each float32 into two (a TF32 high
    part and the remainder), so its chunks hold half the elements."""
    elem = args["x_ptr"].element_size()
    return 2 * elem if args.get("DOT_PRECISION") == "tf32x3" else elem


def _f32_shrink(args) -> int:
    return _F32_BWD_SHRINK if args["x_ptr"].element_size() == 4 else 1


def fwd_chunk_heuristic(args):
    return chunks(args["PADS"], FWD_W_CHUNK_BYTES // _operand_bytes(args))


def bwd_fwd_chunk_heuristic(args):
    """The chunks of the forward the backward kernel recomputes (it holds its tile's layer inputs meanwhile)."""
    return chunks(args["PADS"], BWD_W_CHUNK_BYTES // (_operand_bytes(args) * _f32_shrink(args)))


def bwd_chunk_heuristic(args):
    return chunks(args["PADS"], BWD_DW_CHUNK // _f32_shrink(args))


# Autotune keys: the network (its constexpr tuples select the compiled kernel anyway) and, for the GEMMs, the number
# of points rounded to a power of two; the autotuner adds the tensors' dtypes.
NET_KEY = ["SIZES", "WOFF", "BOFF", "ACTS"]
