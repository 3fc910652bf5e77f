"""Double backward for every op, whatever backend ran the first two passes.

A backward op maps ``(grad_y, inputs)`` to the input gradients. Its own derivative is taken by
differentiating the op's pure-PyTorch forward twice: recompute ``y = forward(inputs)``, take
``g = d<y, grad_y>/d inputs`` with ``create_graph=True``, then differentiate ``<g, grad_g>``. One
function serves every op; it only needs the op's differentiable reference forward.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor


def backward_of_backward(
    reference_forward: Callable[..., Tensor],
    grad_y: Tensor,
    inputs: Sequence[Optional[Tensor]],
    grad_of_grads: Sequence[Optional[Tensor]],
) -> list[Optional[Tensor]]:
    """Gradients with respect to ``(grad_y, *inputs)`` of ``sum_i <d<y, grad_y>/d inputs[i], grad_of_grads[i]>``.

    ``inputs`` may hold None (an absent optional tensor); its entry in the result is None too.
    """
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        # Tensors that need no gradient become leaves so that autograd.grad can still see them.
        leaves = [t if t is None or t.requires_grad else t.detach().requires_grad_() for t in (grad_y, *inputs)]
        g_y, *ins = leaves
        present = [t for t in ins if t is not None]
        y = reference_forward(*ins)
        first = torch.autograd.grad(y, present, g_y, create_graph=True, allow_unused=True)
        pairs = [(g, gg) for g, gg in zip(first, [gg for t, gg in zip(ins, grad_of_grads) if t is not None])
                 if g is not None and gg is not None and g.requires_grad]
        wrt = [t for t in leaves if t is not None]
        if not pairs:
            return [None] * len(leaves)
        # retain_graph: grad_y can be a non-leaf of the caller's graph (e.g. 2*y from y**2) whose saved
        # values the caller still needs; without it this inner call frees them.
        second = torch.autograd.grad([g for g, _ in pairs], wrt, [gg for _, gg in pairs],
                                     create_graph=create_graph, retain_graph=True, allow_unused=True)
    by_leaf = iter(second)
    return [None if t is None else next(by_leaf) for t in leaves]
