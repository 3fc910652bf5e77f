"""``hyperkernels::hyper_linear`` and its backward, registered with ``torch.library``.

The op takes the hypernetwork's last hidden state ``h (B, K)`` and its head ``head_weight (P, K)``,
``head_bias (P,)`` or None (``P = out*in + out*bias``, rows ordered like ``parameters_to_vector(nn.Linear(in,
out, bias))``) in place of per-sample weights, and ``x (B, N, in)``. The forward returns ``(y, preact)`` like
``hyperkernels::batched_linear``: the pre-activation only when the activation's derivative needs it and a
gradient will be asked for (else an empty tensor; the backward recomputes it if needed).

:func:`apply_hyper_linear` is how the layers above call it: it resolves the backend and runs the op, PyTorch's own
composition, or (where ``backend="auto"`` and the cost model in ``_dispatch.py`` says so) generate-then-apply.

Double backward: the backward op's autograd formula differentiates the generate-then-apply PyTorch composition
twice (``_double_backward.py``), whatever backend ran the first two passes.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from .._dispatch import HyperShape, generate_is_better, get_backend, resolve_backend, runs_as_composition
from ..activations import Activation, get_activation
from ..backends.torch import hyper_linear as torch_hyper
from ._double_backward import backward_of_backward
from ._grad import grad_will_be_needed
from .linear import apply_linear

__all__ = ["apply_hyper_linear", "HyperLinearWay", "hyper_linear_way", "hyper_linear_op", "hyper_linear_backward_op"]


def apply_hyper_linear(x: Tensor, h: Tensor, head_weight: Tensor, head_bias: Optional[Tensor], out_features: int,
                       bias: bool, act: Activation, w0: float, backend: str) -> Tensor:
    """hyper_linear on validated inputs, ``x (B, N, in)``: the fused op, its PyTorch composition, or, under "auto"
    where the cost model prefers it, generate-then-apply (the weights materialised by one GEMM, then
    :func:`apply_linear`)."""
    batch, n, in_features = x.shape
    grad = grad_will_be_needed(x, h, head_weight, head_bias)
    layer = HyperShape(batch, n, in_features, out_features, h.shape[1], bias, head_bias is not None,
                       x.element_size(), grad, grad and x.requires_grad)
    way = hyper_linear_way(backend, x.device, x.dtype, [layer], may_generate=backend == "auto",
                           empty=x.numel() == 0 or h.numel() == 0)
    if way.generate:
        weight, c = torch_hyper.generate(h, head_weight, head_bias, out_features, in_features, bias)
        return apply_linear(x, weight, c, act, w0, False, "auto")
    impl = way.backend
    if runs_as_composition(impl, "hyper_linear", n):
        return torch_hyper.reference_forward(x, h, head_weight, head_bias, out_features, bias, act, w0)
    save_preact = act.needs_preactivation and grad
    return hyper_linear_op(x, h, head_weight, head_bias, out_features, bias, act.name, w0, save_preact, impl)[0]


class HyperLinearWay(NamedTuple):
    """How generated layers run: ``generate`` their weights (one GEMM) and apply them, or fused by ``backend``."""

    generate: bool
    backend: str


def hyper_linear_way(backend: str, device: torch.device, dtype: torch.dtype, layers: Sequence[HyperShape], *,
                     may_generate: bool, empty: bool = False) -> HyperLinearWay:
    """How ``layers`` (run one after the other) run: fused by the backend ``backend`` resolves to, or, only where
    ``may_generate`` and the cost model says it is better, generate-then-apply."""
    impl = resolve_backend(backend, op="hyper_linear", device=device, dtype=dtype, empty=empty)
    return HyperLinearWay(may_generate and not empty and generate_is_better(device, dtype, layers, impl), impl)


@torch.library.custom_op("hyperkernels::hyper_linear", mutates_args=())
def hyper_linear_op(
    x: Tensor, h: Tensor, head_weight: Tensor, head_bias: Optional[Tensor], out_features: int, bias: bool,
    activation: str, w0: float, save_preact: bool, backend: str,
) -> tuple[Tensor, Tensor]:
    return get_backend(backend).hyper_linear_forward(
        x, h, head_weight, head_bias, out_features, bias, get_activation(activation), w0, save_preact
    )


@hyper_linear_op.register_fake
def _(x, h, head_weight, head_bias, out_features, bias, activation, w0, save_preact, backend):
    shape = (x.shape[0], x.shape[1], out_features)
    keep = save_preact and get_activation(activation).needs_preactivation
    return x.new_empty(shape), x.new_empty(shape if keep else (0,))


@torch.library.custom_op("hyperkernels::hyper_linear_backward", mutates_args=())
def hyper_linear_backward_op(
    grad_y: Tensor, x: Tensor, h: Tensor, head_weight: Tensor, head_bias: Optional[Tensor], y: Tensor,
    preact: Tensor, out_features: int, bias: bool, activation: str, w0: float, output_mask: Sequence[bool],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grads = get_backend(backend).hyper_linear_backward(
        grad_y, x, h, head_weight, head_bias, y, preact, out_features, bias, get_activation(activation), w0,
        tuple(output_mask),
    )
    # A custom op cannot return None: an empty tensor stands for "not asked for".
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@hyper_linear_backward_op.register_fake
def _(grad_y, x, h, head_weight, head_bias, y, preact, out_features, bias, activation, w0, output_mask, backend):
    shapes = (x.shape, h.shape, head_weight.shape, head_weight.shape[:1])
    need = list(output_mask)
    need[3] = need[3] and head_bias is not None
    return tuple(x.new_empty(s if n else (0,)) for s, n in zip(shapes, need))


# -- autograd of the forward ---------------------------------------------------------------------

def _forward_setup_context(ctx, inputs, output):
    x, h, head_weight, head_bias, out_features, bias, activation, w0, save_preact, backend = inputs
    y, preact = output
    ctx.save_for_backward(x, h, head_weight, head_bias, y, preact)
    ctx.attrs = (out_features, bias, activation, w0, backend)


def _forward_backward(ctx, grad_y, grad_preact):
    x, h, head_weight, head_bias, y, preact = ctx.saved_tensors
    out_features, bias, activation, w0, backend = ctx.attrs
    mask = list(ctx.needs_input_grad[:4])
    if head_bias is None:
        mask[3] = False
    grads = hyper_linear_backward_op(
        grad_y, x, h, head_weight, head_bias, y, preact, out_features, bias, activation, w0, mask, backend
    )
    return (*(g if need else None for g, need in zip(grads, mask)), None, None, None, None, None, None)


hyper_linear_op.register_autograd(_forward_backward, setup_context=_forward_setup_context)


# -- autograd of the backward (double backward) --------------------------------------------------

def _backward_setup_context(ctx, inputs, output):
    (grad_y, x, h, head_weight, head_bias, y, preact, out_features, bias, activation, w0, output_mask,
     backend) = inputs
    ctx.save_for_backward(grad_y, x, h, head_weight, head_bias)
    ctx.attrs = (out_features, bias, activation, w0, tuple(output_mask))


def _backward_backward(ctx, grad_dx, grad_dh, grad_dhead_weight, grad_dhead_bias):
    grad_y, x, h, head_weight, head_bias = ctx.saved_tensors
    out_features, bias, activation, w0, output_mask = ctx.attrs
    act = get_activation(activation)

    def reference_forward(x, h, head_weight, head_bias):
        return torch_hyper.reference_forward(x, h, head_weight, head_bias, out_features, bias, act, w0)

    # Gradients that were not asked for came out as empty tensors: nothing flows back through them.
    grad_of_grads = [g if need else None
                     for g, need in zip((grad_dx, grad_dh, grad_dhead_weight, grad_dhead_bias), output_mask)]
    grads = backward_of_backward(reference_forward, grad_y, (x, h, head_weight, head_bias), grad_of_grads)
    grads = [g if need else None for g, need in zip(grads, ctx.needs_input_grad)]
    # Inputs: grad_y, x, h, head_weight, head_bias, then y, preact and 6 non-tensors.
    return (*grads, None, None, None, None, None, None, None, None)


hyper_linear_backward_op.register_autograd(_backward_backward, setup_context=_backward_setup_context)
