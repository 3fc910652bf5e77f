from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..activations import DEFAULT_SINE_W0
from ..functional import batched_linear, batched_mlp, mlp_op_available
from ._base import BatchedLayer, Params


class BatchedLinear(BatchedLayer):
    """A per-sample ``nn.Linear``: ``y[b] = act(x[b] @ weight[b].T + bias[b])``.

    It owns no weights. ``forward(x, weight, bias)`` takes them explicitly (``(B, out, in)`` and
    ``(B, out)``), or ``forward(x, params)`` takes a flat ``(B, P)`` tensor or a dict
    ``{"weight": ..., "bias": ...}``; ``.layout`` says where each piece sits in the flat row (the order of
    ``nn.Linear(in_features, out_features).parameters()``).

    >>> layer = BatchedLinear(3, 4, activation="relu")
    >>> layer(torch.randn(8, 3), torch.randn(8, layer.num_params)).shape
    torch.Size([8, 4])
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: Optional[str] = None,
                 w0: float = DEFAULT_SINE_W0, backend: str = "auto"):
        super().__init__((out_features, in_features), out_features, bias, activation, w0, backend)
        self.in_features, self.out_features = in_features, out_features

    def _shape_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"

    def forward(self, x: Tensor, weight_or_params: Params, bias: Optional[Tensor] = None) -> Tensor:
        if self._runs_as_mlp(x, weight_or_params, bias):
            # Flat params: the one-layer fused MLP writes their gradient as one (B, P) tensor, where views of
            # them would each get a zero-filled (B, P) gradient buffer.
            return batched_mlp(x, weight_or_params, self.layout, activation=None, output_activation=self.activation,
                               w0=self.w0, backend=self.backend)
        weight, bias = self.weight_and_bias(weight_or_params, bias)
        return batched_linear(x, weight, bias, activation=self.activation, w0=self.w0, backend=self.backend)

    def _runs_as_mlp(self, x, params, bias) -> bool:
        if not (isinstance(params, Tensor) and params.dim() == 2 and bias is None and isinstance(x, Tensor)
                and x.dim() in (2, 3) and x.shape[0] > 0):
            return False
        return mlp_op_available(self.backend, x.device, x.dtype)
