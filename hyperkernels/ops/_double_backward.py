"""Double backward for every op, whatever backend ran the first two passes.

A backward op maps ``(grad_y, inputs)`` to the input gradients. Its own derivative is taken by
differentiating the op's pure-PyTorch forward twice: recompute ``y = forward(inputs)``, take
``g = d<y, grad_y>/d inputs`` with ``create_graph=True``, then differentiate ``<g, grad_g>``. One
function serves every op; it only needs the op's differentiable reference forward.

Second order only: the results carry no graph, so a third derivative raises instead of being silently wrong.
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
    with torch.enable_grad():
        # Partial derivatives: fresh leaves, so that autograd does not also follow grad_y's own history back
        # to the inputs (grad_y = 2 y for a squared loss); the caller's graph adds those paths itself.
        leaves = [None if t is None else t.detach().requires_grad_() for t in (grad_y, *inputs)]
        g_y, *ins = leaves
        present = [t for t in ins if t is not None]
        y = reference_forward(*ins)
        first = torch.autograd.grad(y, present, g_y, create_graph=True, allow_unused=True)
        pairs = [(g, gg) for g, gg in zip(first, [gg for t, gg in zip(ins, grad_of_grads) if t is not None])
                 if g is not None and gg is not None and g.requires_grad]
        if not pairs:
            return [None] * len(leaves)
        wrt = [t for t in leaves if t is not None]
        second = torch.autograd.grad([g for g, _ in pairs], wrt, [gg for _, gg in pairs], allow_unused=True)
    by_leaf = iter(second)
    return [None if t is None else next(by_leaf) for t in leaves]
