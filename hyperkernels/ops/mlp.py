"""``hyperkernels::batched_mlp`` and its backward, registered with ``torch.library``.

The op takes the flat ``(B, P)`` parameters and where each layer sits in them (an ``MLPSpec`` passed as
int lists), so its backward writes one ``(B, P)`` gradient instead of one zero-filled ``(B, P)`` buffer
per layer view.

The forward returns ``(y, saved)``: when asked to save each layer's values for the backward (``save_layers``),
``saved[l]`` is layer l's pre- or post-activation ``(B, N, sizes[l+1])`` as ``MLPSpec.saved_kinds`` says (an empty
tensor where nothing is saved); otherwise ``saved`` is an empty list and the backward recomputes what it needs.
:func:`apply_mlp` is how the layers above call it: it resolves the backend, decides whether saving pays, and runs
the op, or PyTorch's own composition where the op would buy nothing.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .._dispatch import get_backend, implements, mlp_saves_layers, resolve_backend, runs_as_composition
from ..activations import Activation, get_activation
from ..backends.torch import mlp as torch_mlp
from ..layout import MLPSpec
from ._double_backward import backward_of_backward
from ._grad import grad_will_be_needed

__all__ = ["apply_mlp", "mlp_op_runs", "mlp_op_available", "batched_mlp_op", "batched_mlp_backward_op"]


def apply_mlp(x: Tensor, params: Tensor, spec: MLPSpec, act: Activation, out_act: Activation, w0: float,
              backend: str) -> Tensor:
    """The per-sample MLP on validated inputs: ``x (B, N, in)``, ``params (B, spec.numel)`` (read in place)."""
    impl = resolve_backend(backend, op="batched_mlp", device=x.device, dtype=x.dtype, widths=spec.sizes,
                           empty=x.numel() == 0 or params.shape[0] == 0 or 0 in spec.sizes)
    single_point = x.shape[1] == 1
    if runs_as_composition(impl, "batched_mlp", x.shape[1]):
        return torch_mlp.reference_forward(x, params, spec, act, out_act, w0)
    save_layers = grad_will_be_needed(x, params) and mlp_saves_layers(impl, single_point)
    return batched_mlp_op(x, params, spec.sizes, spec.weight_offsets, spec.bias_offsets, act.name, out_act.name, w0,
                          save_layers, impl)[0]


def mlp_op_available(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the backend that runs per-sample linear layers here also has a fused MLP op."""
    return implements(resolve_backend(backend, op="batched_linear", device=device, dtype=dtype), "batched_mlp")


def mlp_op_runs(backend: str, device: torch.device, dtype: torch.dtype, n: int, sizes: Sequence[int]) -> bool:
    """Whether :func:`apply_mlp` on ``n`` points per sample through layers ``sizes`` runs the fused op (rather than
    the plain composition the torch backend runs at many points per sample, ``_dispatch.runs_as_composition``),
    on a backend that has one."""
    if not mlp_op_available(backend, device, dtype):
        return False
    impl = resolve_backend(backend, op="batched_mlp", device=device, dtype=dtype, widths=tuple(sizes))
    return not runs_as_composition(impl, "batched_mlp", n)


def _spec(sizes, weight_offsets, bias_offsets, numel) -> MLPSpec:
    return MLPSpec(tuple(sizes), tuple(weight_offsets), tuple(bias_offsets), int(numel))


@torch.library.custom_op("hyperkernels::batched_mlp", mutates_args=())
def batched_mlp_op(
    x: Tensor, params: Tensor, sizes: Sequence[int], weight_offsets: Sequence[int], bias_offsets: Sequence[int],
    activation: str, output_activation: str, w0: float, save_layers: bool, backend: str,
) -> tuple[Tensor, list[Tensor]]:
    spec = _spec(sizes, weight_offsets, bias_offsets, params.shape[1])
    return get_backend(backend).mlp_forward(
        x, params, spec, get_activation(activation), get_activation(output_activation), w0, save_layers
    )


@batched_mlp_op.register_fake
def _(x, params, sizes, weight_offsets, bias_offsets, activation, output_activation, w0, save_layers, backend):
    batch, n = x.shape[:2]
    y = x.new_empty((batch, n, sizes[-1]))
    if not save_layers:
        return y, []
    spec = _spec(sizes, weight_offsets, bias_offsets, params.shape[1])
    kinds = spec.saved_kinds(get_activation(activation), get_activation(output_activation))
    return y, [x.new_empty((batch, n, m) if kind != "-" else (0,)) for m, kind in zip(sizes[1:], kinds)]


@torch.library.custom_op("hyperkernels::batched_mlp_backward", mutates_args=())
def batched_mlp_backward_op(
    grad_y: Tensor, x: Tensor, params: Tensor, y: Tensor, saved: Sequence[Tensor], sizes: Sequence[int],
    weight_offsets: Sequence[int], bias_offsets: Sequence[int], activation: str, output_activation: str, w0: float,
    output_mask: Sequence[bool], backend: str,
) -> tuple[Tensor, Tensor]:
    spec = _spec(sizes, weight_offsets, bias_offsets, params.shape[1])
    grads = get_backend(backend).mlp_backward(
        grad_y, x, params, y, list(saved), spec, get_activation(activation), get_activation(output_activation), w0,
        tuple(output_mask),
    )
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@batched_mlp_backward_op.register_fake
def _(grad_y, x, params, y, saved, sizes, weight_offsets, bias_offsets, activation, output_activation, w0,
      output_mask, backend):
    return tuple(t.new_empty(t.shape if need else (0,)) for t, need in zip((x, params), output_mask))


# -- autograd of the forward ---------------------------------------------------------------------

def _forward_setup_context(ctx, inputs, output):
    x, params, sizes, w_offs, b_offs, activation, output_activation, w0, save_layers, backend = inputs
    y, saved = output
    ctx.save_for_backward(x, params, y, *saved)
    ctx.attrs = (tuple(sizes), tuple(w_offs), tuple(b_offs), activation, output_activation, w0, backend)


def _forward_backward(ctx, grad_y, grad_saved):
    x, params, y, *saved = ctx.saved_tensors
    sizes, w_offs, b_offs, activation, output_activation, w0, backend = ctx.attrs
    mask = list(ctx.needs_input_grad[:2])
    dx, dparams = batched_mlp_backward_op(
        grad_y, x, params, y, saved, sizes, w_offs, b_offs, activation, output_activation, w0, mask, backend
    )
    return (dx if mask[0] else None, dparams if mask[1] else None) + (None,) * 8


batched_mlp_op.register_autograd(_forward_backward, setup_context=_forward_setup_context)


# -- autograd of the backward (double backward) --------------------------------------------------

def _backward_setup_context(ctx, inputs, output):
    (grad_y, x, params, y, saved, sizes, w_offs, b_offs, activation, output_activation, w0, output_mask,
     backend) = inputs
    ctx.save_for_backward(grad_y, x, params)
    ctx.num_saved = len(saved)
    ctx.attrs = (_spec(sizes, w_offs, b_offs, params.shape[1]), activation, output_activation, w0,
                 tuple(output_mask))


def _backward_backward(ctx, grad_dx, grad_dparams):
    grad_y, x, params = ctx.saved_tensors
    spec, activation, output_activation, w0, output_mask = ctx.attrs
    act, out_act = get_activation(activation), get_activation(output_activation)

    def reference_forward(x, params):
        return torch_mlp.reference_forward(x, params, spec, act, out_act, w0)

    grad_of_grads = [g if need else None for g, need in zip((grad_dx, grad_dparams), output_mask)]
    grads = backward_of_backward(reference_forward, grad_y, (x, params), grad_of_grads)
    grads = [g if need else None for g, need in zip(grads, ctx.needs_input_grad)]
    # Inputs: grad_y, x, params, y, saved (a list), then 8 non-tensors.
    return (*grads, None, [None] * ctx.num_saved, None, None, None, None, None, None, None, None)


batched_mlp_backward_op.register_autograd(_backward_backward, setup_context=_backward_setup_context)
