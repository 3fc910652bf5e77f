from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..activations import DEFAULT_SINE_W0
from ..functional import batched_conv1x1
from ._base import BatchedLayer, Params


class BatchedConv1x1(BatchedLayer):
    """A per-sample 1x1 ``nn.Conv{1,2,3}d``: ``y[b] = act(weight[b] @ x[b] + bias[b])`` at every position.

    Like :class:`BatchedLinear`, it owns no weights: ``forward(x, weight, bias)`` or ``forward(x, params)``
    with flat ``(B, P)`` or dict params. ``x`` is ``(B, C_in, *spatial)``; the layout's weight has shape
    ``(out_channels, in_channels)`` (the flattening of any 1x1 ``nn.ConvNd.weight``).
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True, activation: Optional[str] = None,
                 w0: float = DEFAULT_SINE_W0, backend: str = "auto"):
        super().__init__((out_channels, in_channels), out_channels, bias, activation, w0, backend)
        self.in_channels, self.out_channels = in_channels, out_channels

    def _shape_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}"

    def forward(self, x: Tensor, weight_or_params: Params, bias: Optional[Tensor] = None) -> Tensor:
        weight, bias = self.weight_and_bias(weight_or_params, bias)
        return batched_conv1x1(x, weight, bias, activation=self.activation, w0=self.w0, backend=self.backend)
