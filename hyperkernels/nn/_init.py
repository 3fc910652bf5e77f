"""Initialisation: the default statistics of a module's parameters, and the "hyperfan" head that generates
parameters at those statistics (derived in :class:`~hyperkernels.nn.HyperNetwork`'s docstring)."""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
from torch import Tensor, nn

from ..layout import ParamLayout

__all__ = ["default_init_stats", "hyperfan_init_"]

# Generated biases get this fraction of their layer's default bias variance (see HyperNetwork's docstring).
_BIAS_VARIANCE_FRACTION = 0.5


@torch.no_grad()
def hyperfan_init_(head: nn.Linear, layout: ParamLayout, variances: Mapping[str, float], second_moment: float,
                   means: Optional[Mapping[str, float]] = None) -> None:
    """Initialise a hypernetwork head in place so that the parameters it generates start at their target layers'
    default scale ("hyperfan", after Chang, Flokas & Lipson, ICLR 2020; the derivation is in
    :class:`HyperNetwork`'s docstring): the rows that generate the parameter ``name`` of ``layout`` uniform in
    ``+-a`` with ``a^2 = 3 v / m``, ``v = variances[name]`` (half of it for a bias), ``m = second_moment =
    E||h||^2`` of the head's input; ``head.bias`` at ``means[name]`` on those rows (0 without ``means``: the
    default of linear layers and convs; e.g. 1 for a norm's weight)."""
    m = max(float(second_moment), 1e-12)
    if head.bias is not None:
        head.bias.zero_()
    for name, v in variances.items():
        is_bias = name.rpartition(".")[2] == "bias"
        a = math.sqrt(3.0 * v * (_BIAS_VARIANCE_FRACTION if is_bias else 1.0) / m)
        rows = slice(layout.offset(name), layout.offset(name) + math.prod(layout.shapes[name]))
        head.weight[rows].uniform_(-a, a)
        if means is not None and head.bias is not None:
            head.bias[rows] = means[name]


def default_init_stats(module: nn.Module, params: Mapping[str, Tensor]) -> dict:
    """name -> (mean, variance) of each parameter's default initialisation (see
    ``BatchedSequential.default_init_variance``)."""
    name_of = {id(p): n for n, p in params.items()}
    stats = {}
    for m in module.modules():
        for pname, p in m._parameters.items():
            if p is None or id(p) not in name_of:
                continue
            fan_in = None
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and pname in ("weight", "bias"):
                fan_in = m.weight.shape[1] * math.prod(m.weight.shape[2:])
            elif isinstance(m, nn.RNNCellBase):
                fan_in = m.hidden_size
            if fan_in is not None:
                stats.setdefault(name_of[id(p)], (0.0, 1.0 / (3.0 * fan_in)))
            else:
                v = p.detach().double()
                stats.setdefault(name_of[id(p)], (float(v.mean()), float(v.var(unbiased=False))))
    return stats
