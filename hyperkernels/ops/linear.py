"""``hyperkernels::batched_linear`` and its backward, registered with ``torch.library``.

Both linear (token-major) and 1x1 conv (channel-major) layouts go through this one op pair; the
``channel_major`` flag tells the backend which one it is looking at. :func:`apply_linear` is how the layers above
call it: it resolves the backend and runs the op, or PyTorch's own composition where the op would buy nothing.

The forward returns ``(y, preact)``: the pre-activation is kept only when the activation's derivative
needs it and a gradient will be asked for (otherwise it is an empty tensor, and the backward
recomputes it if it turns out to be needed after all).

Double backward: the backward op's own autograd formula differentiates the pure-PyTorch forward
twice (``_double_backward.py``), whatever backend ran the first two passes.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .._dispatch import get_backend, resolve_backend, runs_as_composition
from ..activations import Activation, get_activation
from ..backends.torch import linear as torch_linear
from ._double_backward import backward_of_backward
from ._grad import grad_will_be_needed

__all__ = ["apply_linear", "linear_runs_as_composition", "batched_linear_op", "batched_linear_backward_op"]


def apply_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: Activation, w0: float, channel_major: bool,
                 backend: str) -> Tensor:
    """The per-sample linear layer on validated inputs: ``x (B, N, in)``, or ``(B, in, S)`` when ``channel_major``
    (the 1x1 conv layout); ``weight (B, out, in)``, ``bias (B, out)`` or None, any strides. Returns ``y`` contiguous
    in ``x``'s layout."""
    op = "batched_conv1x1" if channel_major else "batched_linear"
    impl = resolve_backend(backend, op=op, device=x.device, dtype=x.dtype,
                           empty=x.numel() == 0 or weight.numel() == 0)
    if runs_as_composition(impl, op, x.shape[2] if channel_major else x.shape[1]):
        formulation = "conv" if impl == "torch_conv" else "bmm"
        return torch_linear.linear_forward(x, weight, bias, act, w0, channel_major, False, formulation)[0]
    save_preact = act.needs_preactivation and grad_will_be_needed(x, weight, bias)
    # A custom op's schema holds tensors, numbers and strings: the activation crosses it by name, and the op's
    # implementations look the Activation up again on the other side.
    return batched_linear_op(x, weight, bias, act.name, w0, channel_major, save_preact, impl)[0]


def linear_runs_as_composition(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :func:`apply_linear` runs PyTorch's own composition (bmm, bias, activation: the torch backend) on
    non-empty tensors of this device and dtype, which is also what vmap runs for ``F.linear``."""
    if torch._C._are_functorch_transforms_active():
        return True
    return _runs_as_composition_here(backend, device, dtype)


@torch.compiler.assume_constant_result
def _runs_as_composition_here(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    key = (backend, device, dtype)
    if key not in _COMPOSITION:  # linear layers are decided by device and dtype alone: one lookup per kind
        impl = resolve_backend(backend, op="batched_linear", device=device, dtype=dtype)
        _COMPOSITION[key] = runs_as_composition(impl, "batched_linear", 1)  # for linear, whatever the points
    return _COMPOSITION[key]


_COMPOSITION: dict = {}


def _output_shape(x: Tensor, weight: Tensor, channel_major: bool) -> tuple[int, int, int]:
    if channel_major:
        return (x.shape[0], weight.shape[1], x.shape[2])
    return (x.shape[0], x.shape[1], weight.shape[1])


@torch.library.custom_op("hyperkernels::batched_linear", mutates_args=())
def batched_linear_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str, w0: float, channel_major: bool,
    save_preact: bool, backend: str,
) -> tuple[Tensor, Tensor]:
    return get_backend(backend).linear_forward(
        x, weight, bias, get_activation(activation), w0, channel_major, save_preact
    )


@batched_linear_op.register_fake
def _(x, weight, bias, activation, w0, channel_major, save_preact, backend):
    shape = _output_shape(x, weight, channel_major)
    keep = save_preact and get_activation(activation).needs_preactivation
    return x.new_empty(shape), x.new_empty(shape if keep else (0,))


@torch.library.custom_op("hyperkernels::batched_linear_backward", mutates_args=())
def batched_linear_backward_op(
    grad_y: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], y: Tensor, preact: Tensor,
    activation: str, w0: float, channel_major: bool, output_mask: Sequence[bool], backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    grads = get_backend(backend).linear_backward(
        grad_y, x, weight, bias, y, preact, get_activation(activation), w0, channel_major, tuple(output_mask)
    )
    # A custom op cannot return None: an empty tensor stands for "not asked for".
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@batched_linear_backward_op.register_fake
def _(grad_y, x, weight, bias, y, preact, activation, w0, channel_major, output_mask, backend):
    shapes = (x.shape, weight.shape, weight.shape[:2])
    return tuple(x.new_empty(s if need else (0,)) for s, need in zip(shapes, output_mask))


# -- autograd of the forward ---------------------------------------------------------------------

def _forward_setup_context(ctx, inputs, output):
    x, weight, bias, activation, w0, channel_major, save_preact, backend = inputs
    y, preact = output
    ctx.save_for_backward(x, weight, bias, y, preact)
    ctx.attrs = (activation, w0, channel_major, backend)


def _forward_backward(ctx, grad_y, grad_preact):
    x, weight, bias, y, preact = ctx.saved_tensors
    activation, w0, channel_major, backend = ctx.attrs
    mask = list(ctx.needs_input_grad[:3])
    if bias is None:
        mask[2] = False
    dx, dw, db = batched_linear_backward_op(
        grad_y, x, weight, bias, y, preact, activation, w0, channel_major, mask, backend
    )
    return (dx if mask[0] else None, dw if mask[1] else None, db if mask[2] else None,
            None, None, None, None, None)


batched_linear_op.register_autograd(_forward_backward, setup_context=_forward_setup_context)


# -- autograd of the backward (double backward) --------------------------------------------------

def _backward_setup_context(ctx, inputs, output):
    grad_y, x, weight, bias, y, preact, activation, w0, channel_major, output_mask, backend = inputs
    ctx.save_for_backward(grad_y, x, weight, bias)
    ctx.attrs = (activation, w0, channel_major, tuple(output_mask))


def _backward_backward(ctx, grad_dx, grad_dw, grad_db):
    grad_y, x, weight, bias = ctx.saved_tensors
    activation, w0, channel_major, output_mask = ctx.attrs
    act = get_activation(activation)

    def reference_forward(x, weight, bias):
        return act.forward(torch_linear.preactivation(x, weight, bias, channel_major, "bmm"), w0)

    # Gradients that were not asked for came out as empty tensors: nothing flows back through them.
    grad_of_grads = [g if need else None for g, need in zip((grad_dx, grad_dw, grad_db), output_mask)]
    grads = backward_of_backward(reference_forward, grad_y, (x, weight, bias), grad_of_grads)
    grads = [g if need else None for g, need in zip(grads, ctx.needs_input_grad)]
    return (*grads, None, None, None, None, None, None, None)


batched_linear_backward_op.register_autograd(_backward_backward, setup_context=_backward_setup_context)
