"""Jitted helpers the kernels of this backend share (inlined into each kernel that calls them).

``loop_bound(n)``: the bound of a ``range`` loop whose bound is a run-time value (a tensor). Compiled, it is ``n``
itself (an inlined identity). Interpreted, the interpreter turns a tensor bound into a Python int through
``tensor.__index__``, which triton 3.6 implements as ``int(array_of_shape_(1,))``: numpy >= 2.4 refuses that
(``TypeError: only 0-dimensional arrays can be converted to Python scalars``), so every kernel with such a loop
fails under triton 3.6 with numpy >= 2.4 (triton 3.9 squeezes the array first). Here the bound is handed over as
a Python int already, which works with every triton and numpy version.

Chunked rows: a layer too wide for one register tile is computed in ``C`` chunks of ``ROWS`` rows. ``tl.dot`` and
``tl.sum`` produce one chunk at a time, and a tile's columns cannot be indexed by a run-time chunk number, so a
chunk's values are put into, or taken out of, a ``(rows, C, ROWS)`` view of the whole layer with a select over the
chunk axis (``put_chunk`` / ``take_chunk``; the chunk's row indices are ``block_offsets(c, ROWS, INDEX64)``): ``C``
selects per element against the layer's ``K`` multiply-adds.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._config import INTERPRET
from .activations import activation_grad

if INTERPRET:

    def loop_bound(n):
        # Interpreted scalars are tensors over a one-element numpy array (``handle.data``); anything else (a
        # Python int, e.g. a constexpr) is already a valid bound.
        data = getattr(getattr(n, "handle", None), "data", None)
        return n if data is None else data.item()

else:

    @triton.jit
    def loop_bound(n):
        return n


@triton.jit
def tile_coords(pid, rows, cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """(sample, row tile, column tile) of program ``pid`` in a 1-D grid of samples of ``cdiv(rows, BLOCK_ROWS) x
    cdiv(cols, BLOCK_COLS)`` tiles each, column tiles innermost: a sample's tiles are adjacent in the grid, so they run
    side by side and share its operands in L2. The sample is int64: it scales the per-sample strides."""
    tiles_c = tl.cdiv(cols, BLOCK_COLS)
    tiles = tl.cdiv(rows, BLOCK_ROWS) * tiles_c
    return (pid // tiles).to(tl.int64), (pid % tiles) // tiles_c, pid % tiles_c


@triton.jit
def block_offsets(index, BLOCK: tl.constexpr, INDEX64: tl.constexpr):
    """The ``BLOCK`` consecutive indices of block ``index`` (a tile of a grid axis, or a chunk of a layer's rows),
    int64 where INDEX64."""
    offs = index * BLOCK + tl.arange(0, BLOCK)
    if INDEX64:
        offs = offs.to(tl.int64)
    return offs


@triton.jit
def load_dz(g_ptrs, y_ptrs, z_ptrs, mask, w0,
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


# -- chunked rows ------------------------------------------------------------------------------------------


@triton.jit
def put_chunk(whole, part, c, C: tl.constexpr):
    """``whole`` (R, C, ROWS) with chunk ``c`` replaced by ``part`` (R, ROWS)."""
    return tl.where((tl.arange(0, C) == c)[None, :, None], part[:, None, :], whole)


@triton.jit
def take_chunk(whole, c, C: tl.constexpr):
    """Chunk ``c`` (R, ROWS) of ``whole`` (R, C, ROWS)."""
    return tl.sum(tl.where((tl.arange(0, C) == c)[None, :, None], whole, 0.0), axis=1)


# -- per-layer rows of the fused MLP -----------------------------------------------------------------------


@triton.jit
def store_rows(ptr, rows, mask_r, v, M: tl.constexpr, MP: tl.constexpr):
    """v (R, MP) into rows ``rows`` (int64 row indices) of a contiguous (rows, M) tensor."""
    om = tl.arange(0, MP)
    tl.store(ptr + rows[:, None] * M + om[None, :], v.to(ptr.dtype.element_ty),
             mask=mask_r[:, None] & (om < M)[None, :])


@triton.jit
def save_layer(ptr, rows, mask_r, z, h, M: tl.constexpr, MP: tl.constexpr, KIND: tl.constexpr):
    """What the forward keeps of a layer (KIND 1: its output h, 2: its pre-activation z, 0: nothing)."""
    if KIND == 2:
        store_rows(ptr, rows, mask_r, z, M, MP)
    elif KIND == 1:
        store_rows(ptr, rows, mask_r, h, M, MP)
