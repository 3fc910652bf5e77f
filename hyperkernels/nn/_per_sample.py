"""The per-sample steps of a ``batched()`` plan: a module run per sample by ``torch.func.vmap(functional_call)``,
with its ``nn.Linear`` / 1x1-conv / RNN-cell submodules on the kernels.

Running the module's own forward per sample under vmap is what makes any forward correct. For the layers that
hyperkernels has kernels for, ``batched()``'s private copy of the module (never the user's) holds the subclasses
below instead of the torch classes. While :func:`run_per_sample` runs a module under its vmap, such a layer takes
its input and per-sample weights out of vmap's wrappers (the physical ``(B, ...)`` tensors), runs hyperkernels'
op on them with vmap's interpreter popped (so the op runs as it would outside any transform: the custom op, the
Triton kernels on a GPU) and wraps the result again; autograd records the op on the physical tensors like any
other. Anywhere else (a vmap the user's forward opens inside, ``torch.compile``, a ``torch.func`` transform of the
user's around ``batched()``, a weight every sample shares) the layer computes what its torch class computes, as
vmap runs it.

When a layer leaves vmap, measured on this project's 2-core CPU (``python bench/batched_models.py --mechanisms``,
table with its date and command in ``bench/results/cpu_batched_models.md``; forward+backward, every way fed the
same split of the flat params):

* 1x1 convs always: vmap runs a per-sample conv as one grouped conv (groups = B), ``batched_conv1x1`` as bmm:
  1.3-1.6x faster (two 1x1 convs, B, C, L = 64, 16, 64 and 32, 64, 256).
* ``nn.Linear`` and the cells' linear maps only where the backend is not PyTorch's own composition: there
  ``batched_linear`` is the bmm vmap's rule for ``F.linear`` runs too, and leaving vmap only adds dispatch
  (a residual MLP: 0.96x at width 16, B=64, one point; 0.92x at width 64, B=256, 16 points, a noisy row).

Why this mechanism (same table): unwrapping vmap's tensors in a swapped class is the cheapest way out of vmap;
on the small residual MLP an ``autograd.Function`` with a ``vmap`` staticmethod runs at 0.56x of plain vmap, a
``torch.library`` op with ``register_vmap`` at 0.68x, and a ``TorchFunctionMode`` (which intercepts every op of
the forward, not only the layers) at 0.51x. The unwrapping uses the functions ``torch.func.vmap`` and torch's
higher-order ops are built on (``torch._C._functorch``, ``torch._functorch.pyfunctorch``); where they are missing
every layer runs as vmap would.
"""
from __future__ import annotations

import functools
import threading
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.utils._pytree import tree_map

from ..activations import DEFAULT_SINE_W0
from ._kernels import run_kernel_layer

try:
    from torch._C._functorch import _add_batch_dim, _unwrap_batched, maybe_current_level
    from torch._functorch.pyfunctorch import temporarily_pop_interpreter_stack
    ESCAPE_AVAILABLE = True
except ImportError:  # pragma: no cover - a torch without them: every layer runs as vmap would
    ESCAPE_AVAILABLE = False

__all__ = ["run_per_sample", "escaping_kinds", "swap_kernel_layers", "kernel_layer_names", "kernel_kinds",
           "is_kernel_conv", "ESCAPE_AVAILABLE"]

# While run_per_sample's vmap runs: .level, its vmap level; .backend; .kinds, the kinds of layer ("linear",
# "conv") that leave vmap for the kernels. .level is None outside, or where no layer may leave.
_state = threading.local()


def escaping_kinds(present: frozenset, linear_composition: bool) -> frozenset:
    """Which of the kinds of layer ``present`` in a module ("linear", "conv") leave vmap for the kernels in a call
    where linear layers would run as PyTorch's composition or not (see the module docstring)."""
    if not present or not ESCAPE_AVAILABLE or torch.compiler.is_compiling() \
            or torch._C._are_functorch_transforms_active():
        return frozenset()
    return present - {"linear"} if linear_composition else present


def run_per_sample(module: nn.Module, per_sample: Mapping[str, Tensor], unbatched: Mapping[str, Tensor],
                   inputs: Sequence, backend: str, kinds: frozenset = frozenset()) -> object:
    """``vmap(functional_call(module, {**per_sample, **unbatched}, inputs))`` over dim 0 of the ``per_sample``
    tensors and of every tensor in ``inputs``, with per-sample randomness (``Dropout`` draws a mask per sample).
    ``kinds``: the kinds of layer that leave vmap for the kernels (:func:`escaping_kinds`, decided before our own
    vmap makes a transform active)."""

    def body(p, *xs):
        if not kinds:
            return functional_call(module, {**p, **unbatched}, xs)
        saved = (getattr(_state, "level", None), getattr(_state, "backend", None), getattr(_state, "kinds", None))
        _state.level, _state.backend, _state.kinds = maybe_current_level(), backend, kinds
        try:
            return functional_call(module, {**p, **unbatched}, xs)
        finally:
            _state.level, _state.backend, _state.kinds = saved

    # Unbatched tensors (shared parameters, buffers) are closed over: vmap reads them as they are. A plain 0 for
    # in_dims where every input is a tensor: vmap flattens a nested in_dims on every call.
    in_dims = 0 if all(isinstance(x, Tensor) for x in inputs) else \
        (0, *(tree_map(lambda t: 0 if isinstance(t, Tensor) else None, x) for x in inputs))
    return vmap(body, in_dims=in_dims, randomness="different")(per_sample, *inputs)


def _level_for(kind: str, *weights: Optional[Tensor]) -> Optional[int]:
    """Our vmap level, if a layer of ``kind`` called now leaves vmap: our vmap is the innermost transform, this
    kind leaves in this call, and one of ``weights`` is batched by our vmap (a per-sample weight)."""
    if torch.compiler.is_compiling():
        return None
    level = getattr(_state, "level", None)
    if level is None or kind not in _state.kinds or maybe_current_level() != level:
        return None
    if any(w is not None and _unwrap_batched(w, level)[1] is not None for w in weights):
        return level
    return None


def _outside(level: int, fn: Callable, *tensors: Optional[Tensor]):
    """``fn`` on the physical tensors (batch dim first; unbatched ones as an expand, never copied) with vmap's
    interpreter popped, its outputs wrapped back into vmap's level."""
    unwrapped = [None if t is None else _unwrap_batched(t, level) for t in tensors]
    batch = next(v.shape[d] for v, d in (u for u in unwrapped if u is not None) if d is not None)
    physical = [None if u is None else u[0].expand(batch, *u[0].shape) if u[1] is None else
                u[0] if u[1] == 0 else u[0].movedim(u[1], 0) for u in unwrapped]
    with temporarily_pop_interpreter_stack():
        out = fn(*physical)
    if isinstance(out, tuple):
        return tuple(_add_batch_dim(o, 0, level) for o in out)
    return _add_batch_dim(out, 0, level)


def _kernel_linear(backend: str) -> Callable:
    return lambda h, w, b: run_kernel_layer(h, w, b, 0, "none", DEFAULT_SINE_W0, backend)


# -- the swapped layers ----------------------------------------------------------------------------

class KernelLinear(nn.Linear):
    """``nn.Linear``, on ``batched_linear`` when called per sample inside ``batched()``'s vmap."""

    def forward(self, x: Tensor) -> Tensor:
        level = _level_for("linear", self.weight)
        if level is None:
            return super().forward(x)
        return _outside(level, _kernel_linear(_state.backend), x, self.weight, self.bias)


class _KernelConv:
    """A 1x1 ``nn.ConvNd`` (stride 1, no padding, groups 1), on ``batched_conv1x1`` per sample."""

    _dims = 0

    def forward(self, x: Tensor) -> Tensor:
        level = _level_for("conv", self.weight)
        if level is None or x.dim() not in (self._dims + 1, self._dims + 2):
            return super().forward(x)
        backend, dims = _state.backend, self._dims
        return _outside(level, lambda h, w, b: run_kernel_layer(h, w, b, dims, "none", DEFAULT_SINE_W0, backend),
                        x, self.weight, self.bias)


class KernelConv1d(_KernelConv, nn.Conv1d):
    _dims = 1


class KernelConv2d(_KernelConv, nn.Conv2d):
    _dims = 2


class KernelConv3d(_KernelConv, nn.Conv3d):
    _dims = 3


# The cells are computed from their formulas (those of the torch docs), with two linear ops: vmap has no batching
# rule for aten::gru_cell (it loops over the samples) nor for aten::lstm_cell (it fails), so these run the
# formula under vmap too, where there is no per-sample weight to put on the kernels.

def gru_cell(x, h, w_ih, w_hh, b_ih, b_hh, linear=F.linear):
    i_r, i_z, i_n = linear(x, w_ih, b_ih).chunk(3, -1)
    h_r, h_z, h_n = linear(h, w_hh, b_hh).chunk(3, -1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return n + z * (h - n)


def lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh, linear=F.linear):
    i, f, g, o = (linear(x, w_ih, b_ih) + linear(h, w_hh, b_hh)).chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def rnn_cell(x, h, w_ih, w_hh, b_ih, b_hh, linear=F.linear, nonlinearity="tanh"):
    z = linear(x, w_ih, b_ih) + linear(h, w_hh, b_hh)
    return torch.tanh(z) if nonlinearity == "tanh" else torch.relu(z)


class _KernelCell:
    _formula: Callable

    def _run(self, x: Tensor, states: tuple, **kw):
        weights = (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        level = _level_for("linear", self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        formula = functools.partial(type(self)._formula, **kw)
        if level is None:
            return formula(x, *states, *weights)
        linear = _kernel_linear(_state.backend)
        return _outside(level, lambda *t: formula(*t, linear=linear), x, *states, *weights)

    def _zeros(self, x: Tensor) -> Tensor:
        return x.new_zeros(*x.shape[:-1], self.hidden_size)


class KernelGRUCell(_KernelCell, nn.GRUCell):
    _formula = staticmethod(gru_cell)

    def forward(self, x: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        return self._run(x, (self._zeros(x) if hx is None else hx,))


class KernelLSTMCell(_KernelCell, nn.LSTMCell):
    _formula = staticmethod(lstm_cell)

    def forward(self, x: Tensor, hx: Optional[tuple] = None) -> tuple:
        if hx is None:
            hx = (self._zeros(x), self._zeros(x))
        return self._run(x, tuple(hx))


class KernelRNNCell(_KernelCell, nn.RNNCell):
    _formula = staticmethod(rnn_cell)

    def forward(self, x: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        return self._run(x, (self._zeros(x) if hx is None else hx,), nonlinearity=self.nonlinearity)


def is_kernel_conv(m: nn.Module) -> bool:
    """A conv that is a per-sample matrix product: kernel size 1, stride 1, no padding, groups 1."""
    return (all(k == 1 for k in m.kernel_size) and all(s == 1 for s in m.stride) and m.groups == 1
            and (m.padding in ("valid", "same") or all(p == 0 for p in m.padding)))


_SWAPS = {nn.Linear: KernelLinear, nn.GRUCell: KernelGRUCell, nn.LSTMCell: KernelLSTMCell, nn.RNNCell: KernelRNNCell,
          nn.Conv1d: KernelConv1d, nn.Conv2d: KernelConv2d, nn.Conv3d: KernelConv3d}


def swap_kernel_layers(module: nn.Module) -> list[str]:
    """Give the layers of ``module`` (a private copy) that have kernels their kernel class, in place; return their
    names. Only exact torch classes are swapped: a subclass may rely on its own methods."""
    swapped = []
    for name, m in module.named_modules():
        new = _SWAPS.get(type(m))
        if new is None or (isinstance(m, nn.modules.conv._ConvNd) and not is_kernel_conv(m)):
            continue
        m.__class__ = new
        swapped.append(name)
    return swapped


def kernel_layer_names(module: nn.Module) -> list[str]:
    """The layers of ``module`` that run on the kernels when called per sample (after swap_kernel_layers)."""
    kinds = (KernelLinear, _KernelConv, _KernelCell)
    return [f"{name or 'the module'} ({type(m).__mro__[1 if isinstance(m, KernelLinear) else 2].__name__})"
            for name, m in module.named_modules() if isinstance(m, kinds)]


def kernel_kinds(module: nn.Module) -> frozenset:
    """The kinds of swapped layer ("linear", "conv") in ``module``."""
    kinds = set()
    for m in module.modules():
        if isinstance(m, (KernelLinear, _KernelCell)):
            kinds.add("linear")
        elif isinstance(m, _KernelConv):
            kinds.add("conv")
    return frozenset(kinds)
