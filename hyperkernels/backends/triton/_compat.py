"""What differs between a compiled kernel and the same kernel under Triton's interpreter.

``loop_bound(n)``: the bound of a ``range`` loop whose bound is a run-time value (a tensor). Compiled, it is ``n``
itself (an inlined identity). Interpreted, the interpreter turns a tensor bound into a Python int through
``tensor.__index__``, which triton 3.6 implements as ``int(array_of_shape_(1,))``: numpy >= 2.4 refuses that
(``TypeError: only 0-dimensional arrays can be converted to Python scalars``), so every kernel with such a loop
fails under triton 3.6 with numpy >= 2.4 (triton 3.9 squeezes the array first). Here the bound is handed over as
a Python int already, which works with every triton and numpy version.
"""
from __future__ import annotations

import triton

from ._config import INTERPRET

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
