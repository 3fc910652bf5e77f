r"""The fused per-sample MLP in Triton: every layer of ``h_l = act(h_{l-1} W_l[b]^T + b_l[b])`` in one kernel,
forward and backward, reading each sample's weights in place from the flat ``(B, P)`` hypernetwork output.

The backend's entry points: they allocate, pick the regime and its modes, and hand over to the launchers of
``mlp_gemv.py`` (``N == 1``, a chain of batched GEMVs on CUDA cores) and ``mlp_gemm.py`` (``N > 1``, ``tl.dot`` on
tiles of points); the configs and weight chunks are ``mlp_tiles.py``'s, grids and index widths ``_launch.py``'s.

Specialisation. A kernel is compiled per network: the widths ``SIZES``, their padded widths ``PADS`` (powers of two,
at least 16, tl.dot's smallest), the weight and bias offsets in a row ``WOFF`` / ``BOFF`` and the activation of
each layer ``ACTS`` are constexpr tuples, and the layers are unrolled with ``tl.static_range``, so every layer's
tiles have their own compile-time shape and the activations of one layer feed the next in registers. Widths up to
``TritonBackend.mlp_max_width``; wider layers are cut into chunks of rows (``CHUNKS``, per layer) so that no tile
outgrows the registers (``_jit.py``'s chunked rows), compiled only for layers that need it.

What the backward needs, recompute or keep (``TritonBackend.mlp_saves_layers``: keep for ``N == 1`` only):

* ``N > 1``: the backward kernel recomputes the forward of its tile in registers (each layer's input in the input
  dtype, and the pre-activation where the activation's derivative needs it), then runs the backward. Keeping would
  write ``B * N * sum(hidden)`` values in the forward and read them in the backward; recomputing costs the forward's
  ``2 * B * N * sum(K * M)`` FLOPs on tensor cores instead. Per point and hidden unit that is ``2 * K`` FLOPs against
  4 bytes (bfloat16, written once and read once): recomputing wins while ``K < 2 * FLOP/s / (bytes/s)``, about 200
  on an H100 reaching 300 TFLOP/s (under half its bfloat16 peak), which covers the widths of neural fields
  (64-128); and it saves that memory, which dominates a field's training footprint.
* ``N == 1``: the activations are tiny (``B * sum(hidden)``) but recomputing them means reading every weight again,
  so the forward keeps what ``MLPSpec.saved_kinds`` says (3 passes over the weights per training step
  instead of 4). A backward that finds nothing kept (the forward ran without grad mode) first reruns the forward
  kernel to store them. When asked to keep (``save_layers``) the ``N > 1`` forward writes them too, and its
  backward recomputes anyway.

The dW reduction for ``N > 1`` (``_dw_mode``; the modes are ``mlp_gemm.py``'s): per tile with float32 atomics when
there are too few samples to fill the GPU; per split (deterministic) when the samples alone fill it (one split: each
program owns a sample, no partial buffer), and when ``torch.use_deterministic_algorithms(True)`` is on (then a
``(B, SPLITS, P)`` buffer).
"""
from __future__ import annotations

import torch
import triton
from torch import Tensor

from ...activations import Activation
from ...layout import MLPSpec
from . import mlp_gemm, mlp_gemv
from ._launch import device_guard, dot_flags, programs_to_fill
from .mlp_tiles import pad

# What the forward stores of each layer when asked to keep (``MLPSpec.saved_kinds``), as the kernels'
# KIND codes (``_jit.save_layer``).
_KIND_CODES = {"-": 0, "h": 1, "z": 2}

# Points per program below which splitting a sample's tiles over more programs is not worth a float32 partial row.
_MIN_POINTS_PER_SPLIT = 128


def _net_constexprs(spec: MLPSpec, act: Activation, out_act: Activation) -> dict:
    layers = spec.num_layers
    return dict(
        SIZES=tuple(int(s) for s in spec.sizes),
        PADS=tuple(pad(s) for s in spec.sizes),
        WOFF=tuple(int(o) for o in spec.weight_offsets),
        BOFF=tuple(int(o) for o in spec.bias_offsets),
        ACTS=tuple([act.code] * (layers - 1) + [out_act.code]),
        NUM_LAYERS=layers,
    )


def _kinds(spec: MLPSpec, act: Activation, out_act: Activation) -> tuple:
    return tuple(_KIND_CODES[k] for k in spec.saved_kinds(act, out_act))


def _keep_z(spec: MLPSpec, act: Activation, out_act: Activation) -> tuple:
    return tuple(a.needs_preactivation for a in [act] * (spec.num_layers - 1) + [out_act])


def _fold_shared(x: Tensor, params: Tensor) -> bool:
    """One point per sample and one parameter row shared by all (batch stride 0): the B points are the rows of one
    sample's GEMM, which runs on tensor cores instead of B GEMVs over the same weights."""
    return x.shape[1] == 1 and params.stride(0) == 0 and x.shape[0] > 1


def _launch_forward(x: Tensor, params: Tensor, y: Tensor, saved, spec: MLPSpec, act: Activation,
                    out_act: Activation, w0: float) -> None:
    """Writes the output into ``y`` (contiguous (B, N, out)) and, when ``saved`` is a list, each layer's kept value
    into it (contiguous (B, N, M_l), an empty tensor where nothing is kept)."""
    save = saved is not None
    saved_args = tuple(s if s.numel() else y for s in saved) if save else (y,) * spec.num_layers
    net = dict(**_net_constexprs(spec, act, out_act), KINDS=_kinds(spec, act, out_act), SAVE=save)
    if _fold_shared(x, params):
        # (B, 1, in) -> (1, B, in): contiguous (B, 1, M) outputs are the same memory as (1, B, M) ones.
        x = x.as_strided((1, x.shape[0], x.shape[2]), (0, x.stride(0), x.stride(2)))
    if x.shape[1] == 1:
        mlp_gemv.launch_forward(x, params, y, saved_args, w0, net)
    else:
        mlp_gemm.launch_forward(x, params, y, saved_args, w0, net, dot_flags(x.dtype))


def _saved_buffers(x: Tensor, batch: int, n: int, spec: MLPSpec, act: Activation, out_act: Activation) -> list:
    """One contiguous (B, N, M_l) tensor per layer that keeps something, an empty one per layer that does not."""
    kinds = spec.saved_kinds(act, out_act)
    return [x.new_empty((batch, n, m)) if k != "-" else x.new_empty(0) for m, k in zip(spec.sizes[1:], kinds)]


def mlp_forward(x: Tensor, params: Tensor, spec: MLPSpec, act: Activation, out_act: Activation, w0: float,
                save_layers: bool):
    """See ``hyperkernels/backends/__init__.py``: ``(y, saved)``, y contiguous ``(B, N, out)``."""
    batch, n, _ = x.shape
    y = x.new_empty((batch, n, spec.sizes[-1]))
    saved = _saved_buffers(x, batch, n, spec, act, out_act) if save_layers else None
    with device_guard(x):
        _launch_forward(x, params, y, saved, spec, act, out_act, w0)
    return y, (saved if save_layers else [])


def _programs_wanted(device: torch.device) -> int:
    """Programs that fill the device: the dW reduction's measure of too few samples (its own name, so that the tests
    and bench/gpu_smoke.py can take the GPU's modes on CPU by replacing it)."""
    return programs_to_fill(device)


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


def mlp_backward(grad_y: Tensor, x: Tensor, params: Tensor, y: Tensor, saved, spec: MLPSpec, act: Activation,
                 out_act: Activation, w0: float, output_mask):
    """See ``hyperkernels/backends/__init__.py``: ``(dx, dparams)``, contiguous, None where not asked for."""
    need_dx, need_dw = output_mask
    batch, n, _ = x.shape
    dx = x.new_empty(x.shape) if need_dx else None
    # Every entry of a row belongs to exactly one layer's weight or bias (MLPSpec tiles [0, P)): no zero fill.
    dparams = params.new_empty((batch, spec.numel)) if need_dw else None
    if not (need_dx or need_dw):
        return dx, dparams
    net = _net_constexprs(spec, act, out_act)
    with device_guard(x):
        if n == 1:
            if not saved:  # rerun the forward, keeping each layer's value (B * sum(M_l) elements: small)
                saved = _saved_buffers(x, batch, 1, spec, act, out_act)
                _launch_forward(x, params, torch.empty_like(y, memory_format=torch.contiguous_format), saved, spec,
                                act, out_act, w0)
            saved_args = tuple(s.contiguous() if s.numel() else y for s in saved)
            mlp_gemv.launch_backward(grad_y, x, params, y.contiguous(), saved_args, dx, dparams, w0,
                                     dict(**net, KINDS=_kinds(spec, act, out_act)))
        else:
            atomic, splits = _dw_mode(batch, n, need_dw, x.device)
            mlp_gemm.launch_backward(grad_y, x, params, dx, dparams, atomic, splits, w0,
                                     dict(**net, KEEP_Z=_keep_z(spec, act, out_act)), dot_flags(x.dtype))
    return dx, dparams
