"""The launch rules every Triton kernel file of this backend follows, in one place.

* Grids are 1-D, sample outermost (a sample's tiles run side by side and share its weight in L2): axis 0 allows
  2^31 - 1 programs, axes 1 and 2 only 65535, so no batch size can overflow a grid (``check_grid``).
* Per-sample base offsets are computed in int64 by the kernels (``B * N * K`` may pass 2^31); offsets inside one
  sample stay int32 unless one sample alone spans 2^31 elements (``INDEX64``, from ``sample_index64``), and offsets
  into an unbatched operand likewise (``index64``).
* Kernels launch on the current device: ``device_guard`` makes it the tensors' device. ``device_sms`` is the one
  question the launchers ask about the GPU's size (the offline compile check, tests/backends/triton/offline_compile.py,
  replaces it to take the GPU-only paths without a GPU).
* float32 dots follow PyTorch's TF32 rule (``dot_precision``); bfloat16 tiles are upcast before ``tl.dot`` only under
  the interpreter (``dot_flags``).
* Autotuning: GEMM configs from a tile table (``gemm_configs``), pruned per problem to what fits the GPU's shared
  memory and registers (``gemm_prune``); ``HYPERKERNELS_TRITON_AUTOTUNE=0`` keeps the first config of every pruned list
  (``autotune_keep``).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
import triton
from torch import Tensor

from .. import _precision
from . import _config
from ._config import INTERPRET

MAX_GRID = 2**31 - 1  # programs on grid axis 0
INT32_MAX = 2**31 - 1  # the largest offset int32 index arithmetic holds (tests lower it to force INDEX64)

# ------------------------------------------------------------------------------------------------------
# Grid and index rules
# ------------------------------------------------------------------------------------------------------


def check_grid(programs: int) -> int:
    if programs > MAX_GRID:
        raise ValueError(f"problem too large for one launch: {programs} programs > {MAX_GRID}")
    return programs


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def n_bucket(n: int) -> int:
    """A row count as an autotune key: powers of two, capped, so that every N does not retune."""
    return min(next_pow2(n), 8192)


def _span(t: Tensor, dims) -> int:
    """The largest element offset spanned by the dims ``dims`` of ``t`` (sizes times strides)."""
    return sum((t.shape[d] - 1) * abs(t.stride(d)) for d in dims)


def sample_index64(*views: Tensor) -> bool:
    """Whether offsets inside one sample of a batched view (batch dim excluded) may pass int32."""
    return any(_span(v, range(1, v.dim())) > INT32_MAX for v in views)


def index64(*tensors: Optional[Tensor]) -> bool:
    """Whether offsets into an unbatched operand (every dim; None for an absent one) may pass int32."""
    return any(_span(t, range(t.dim())) > INT32_MAX for t in tensors if t is not None)


# ------------------------------------------------------------------------------------------------------
# The device
# ------------------------------------------------------------------------------------------------------


def device_guard(t: Tensor):
    """Kernels launch on the current device: make it the tensors' device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def device_sms(device: torch.device) -> Optional[int]:
    """The SM count of a CUDA device; None elsewhere (CPU tensors under the interpreter, where parallelism is moot).
    Every decision below that depends on the GPU's size calls it through this module's globals."""
    if device.type != "cuda":
        return None
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def programs_to_fill(device: torch.device) -> int:
    """Programs that keep every SM busy with a few resident each; on CPU (the interpreter) parallelism is moot."""
    sms = device_sms(device)
    return 1 if sms is None else 4 * sms


# Rows below which an extra split of a reduction is not worth its float32 partial-sum traffic.
MIN_ROWS_PER_SPLIT = 512


def split_count(tiles: int, rows: int, device: torch.device) -> int:
    """How many slices of its ``rows`` a reduction whose output has ``tiles`` 64x64 tiles splits into: more than one
    only when one program per output tile would leave most of the GPU idle and there are rows enough to share."""
    sms = device_sms(device)
    if sms is None or rows < 2 * MIN_ROWS_PER_SPLIT:
        return 1
    if tiles >= 2 * sms:
        return 1
    return max(1, min(triton.cdiv(4 * sms, tiles), rows // MIN_ROWS_PER_SPLIT))


def split_rows(rows: int, splits: int) -> tuple[int, int]:
    """``(splits, rows per split)`` for ``splits`` wanted: slices of a multiple of 128 rows (whole tiles of every
    row block the autotuner may pick), so the count may come out smaller."""
    per_split = triton.cdiv(triton.cdiv(rows, splits), 128) * 128 if splits > 1 else rows
    return triton.cdiv(rows, per_split), per_split


def sum_splits(partials: Tensor, out: Tensor, dim: int) -> None:
    """``out`` = the float32 partial sums added over ``dim`` (in place for a float32 ``out``)."""
    if out.dtype == torch.float32:
        torch.sum(partials, dim=dim, out=out)
    else:
        out.copy_(partials.sum(dim))


# ------------------------------------------------------------------------------------------------------
# Dot precision
# ------------------------------------------------------------------------------------------------------


def dot_precision(dtype: torch.dtype) -> str:
    """float32 dots: ``tf32`` exactly when PyTorch's own matmuls may use it, else ``tf32x3``; other dtypes ignore it.

    ``tf32x3`` splits each operand into a TF32 high part and a TF32 remainder and sums three tensor-core products
    (dropping low x low): float32 accuracy at tensor-core speed. Measured against a float64 reference by emulating
    the rounding on CPU (``test_tf32x3_is_as_accurate_as_ieee``, tests/backends/triton/test_triton_launch.py):
    1.0-1.4x the error of an ieee float32 matmul for depths 16-1024, where one TF32 product is ~1000x worse.
    ``ieee`` runs on CUDA cores with the whole tile's operands in registers: the tiles tuned for tensor cores spilled
    kilobytes there (sm_90 builds, tests/backends/triton/offline_compile.py), and CUDA-core FMA has a fraction of the
    tensor cores' throughput (not yet measured here). The interpreter computes every precision in float32."""
    if dtype != torch.float32:
        return "ieee"
    return "tf32" if _precision.tf32_allowed() else "tf32x3"


def upcast(dtype: torch.dtype) -> bool:
    """bfloat16 ``tl.dot`` is wrong under the interpreter (Triton issue 11584: bf16 kept as raw bits): the kernels
    upcast their tiles to float32 there. On a GPU bfloat16 dots are fine and nothing is upcast."""
    return INTERPRET and dtype == torch.bfloat16


def dot_flags(dtype: torch.dtype) -> dict:
    """The constexprs of every kernel with a ``tl.dot`` on operands of ``dtype``."""
    return dict(DOT_PRECISION=dot_precision(dtype), UPCAST=upcast(dtype))


# ------------------------------------------------------------------------------------------------------
# Autotune configs and their pruning
# ------------------------------------------------------------------------------------------------------


def autotune_keep(kept: list, most: Optional[int] = None) -> list:
    """The configs a pruning hands the autotuner: up to ``most``, or only the first with autotuning off."""
    if not _config.AUTOTUNE:
        return kept[:1]
    return kept if most is None else kept[:most]


# The interpreter runs one program at a time in numpy: few, large programs are fastest there. Autotuning with
# more than one config cannot run on CPU at all (it benchmarks with a GPU timer), so it gets this one.
INTERPRETER_GEMM_TILE = (32, 32, 32, 4, 1)


def gemm_configs(tiles, rows: str, cols: str, red: str, interpret: bool = INTERPRET) -> list[triton.Config]:
    """One config per ``(rows, cols, reduction, num_warps, num_stages)`` tile, its block sizes named by the kernel's
    own roles; the interpreter's one tile when interpreting."""
    tiles = [INTERPRETER_GEMM_TILE] if interpret else tiles
    return [
        triton.Config({rows: r, cols: c, red: k}, num_warps=w, num_stages=s) for r, c, k, w, s in tiles
    ]


# Shared memory a GEMM config may ask for per program: below the 164 KiB of an A100 and the 227 KiB of an
# H100, with room for the epilogue's layout conversion.
SMEM_BUDGET = 160 * 1024

# Registers per thread a GEMM config may need, estimated as its float32 accumulator plus one stage of its operand
# tiles: 16-bit operands pack two to a register, float32 ones take two (tf32x3 holds a TF32 high part and a
# remainder of each; tf32 holds one, but counted so its tiles spilled 40-244 B at unaligned shapes on sm_90, so
# float32 gets the same tiles at either precision). Read off sm_90 builds (tests/backends/triton/offline_compile.py):
# float32 tiles above it spilled with gelu on unaligned shapes (tf32x3: 64x128x32 on 4 warps 364 B, 64x64x64
# 600-1950 B, the dW kernel's 64x64x32 on 4 warps, at 128, 12 B; ieee likewise); every 16-bit tile of linear's table
# is within it where rows are aligned. At odd strides, 16-bit tiles hold every pipeline stage in registers
# (bfloat16, 33 x 65 x 33: 64x128x32 on 4 warps and 4 stages 200 B, the dx and dW kernels' 64-deep tiles 1-2.4 KB),
# which the estimate counts.
REGISTER_BUDGET = 112

GEMM_MAX_CONFIGS = 8  # benchmarked per shape on first use


def operand_registers(elem: int) -> float:
    """Registers per operand element in a tensor-core dot, as ``REGISTER_BUDGET`` counts them."""
    return 0.5 if elem == 2 else 2.0


def gemm_prune(rows: str, cols: str, red: str, dims: dict[str, str], dtype_arg: str, forms_dz: bool = False,
               operand_strides: tuple = (), not_16bit: frozenset = frozenset()):
    """An ``early_config_prune`` for a GEMM kernel; ``dims`` maps each block name to the size argument it
    tiles. Keeps the configs that fit in shared memory, whose tiles overshoot the problem least (sizes rounded
    up to a power of two, at least 16, tl.dot's smallest), and, among those, whose output tile is not needlessly
    small (at least 64 wide where the problem is) so that few configs are benchmarked.

    ``forms_dz``: the kernel's left operand is dz = grad_y * f'(.), a (rows x red) tile streamed from grad_y and
    from y or preact and turned into dz in registers. That costs a second pipelined tile of shared memory, and
    more than 32 of its elements per thread spill registers (seen in sm_90 builds with gelu), so both are
    bounded. Every config must also fit ``REGISTER_BUDGET`` at the kernel's dot precision, counting every pipeline
    stage when a 16-bit operand's ``operand_strides`` (stride argument names) are odd. (The autotune key holds the
    sizes, not the strides: a process that meets one layer's sizes at two alignments keeps the first one's pick.)
    ``not_16bit``: tiles (as in ``gemm_configs``) never offered to 16-bit operands."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        elem = args[dtype_arg].element_size()
        need = {name: max(16, next_pow2(args[size])) for name, size in dims.items()}
        second = 1 if forms_dz and (args.get("LOAD_Y") or args.get("LOAD_Z")) else 0
        per_element = operand_registers(elem)
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
            if elem == 2 and (kw[rows], kw[cols], kw[red], cfg.num_warps, cfg.num_stages) in not_16bit:
                return False
            operands = (kw[rows] * (1 + second) + kw[cols]) * kw[red]
            smem = cfg.num_stages * operands * elem
            threads = 32 * cfg.num_warps
            in_flight = operands * per_element * (cfg.num_stages if staged else 1)
            registers = (kw[rows] * kw[cols] + in_flight) / threads <= REGISTER_BUDGET
            dz_tile = not forms_dz or kw[rows] * kw[red] <= 32 * threads
            return smem <= SMEM_BUDGET and registers and dz_tile

        def big_enough(cfg):
            kw = cfg.kwargs
            return (kw[rows] >= min(64, need[rows]) and kw[cols] >= min(64, need[cols])
                    and kw[red] >= min(32, need[red]))

        kept = [c for c in configs if fits(c)] or list(configs)
        least = min(overshoot(c) for c in kept)
        kept = [c for c in kept if overshoot(c) == least]
        kept = [c for c in kept if big_enough(c)] or kept
        return autotune_keep(kept, GEMM_MAX_CONFIGS)

    return prune
