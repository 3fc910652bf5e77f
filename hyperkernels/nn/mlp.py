from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor, nn

from .._validate import check_w0
from ..activations import DEFAULT_SINE_W0, get_activation
from ..functional import batched_mlp
from ..layout import ParamLayout
from ._base import Params


class BatchedMLP(nn.Module):
    """A per-sample MLP ``sizes[0] -> sizes[1] -> ... -> sizes[-1]``, all layers in one op.

    Its layout is that of ``nn.Sequential(Linear, act, Linear, act, ..., Linear)`` (names "0.weight",
    "0.bias", "2.weight", ...), so ``parameters_to_vector`` of that Sequential is a valid row of params.

    >>> mlp = BatchedMLP([16, 64, 64, 3])
    >>> mlp(torch.randn(8, 16), torch.randn(8, mlp.num_params)).shape
    torch.Size([8, 3])
    """

    def __init__(self, sizes: Sequence[int], activation: Optional[str] = "relu", output_activation: Optional[str] = None,
                 bias: bool = True, w0: float = DEFAULT_SINE_W0, backend: str = "auto"):
        super().__init__()
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2 or any(s < 1 for s in sizes):
            raise ValueError(f"sizes: expected [in, hidden..., out] with at least two positive sizes, got {sizes}")
        self.sizes = sizes
        self.activation = get_activation(activation).name
        self.output_activation = get_activation(output_activation).name
        self.w0 = check_w0(w0)
        self.backend = backend
        shapes = {}
        for i, (k, m) in enumerate(zip(sizes[:-1], sizes[1:])):
            shapes[f"{2 * i}.weight"] = (m, k)
            if bias:
                shapes[f"{2 * i}.bias"] = (m,)
        self.layout = ParamLayout(shapes)

    @property
    def num_params(self) -> int:
        return self.layout.numel

    def forward(self, x: Tensor, params: Params) -> Tensor:
        return batched_mlp(x, params, self.layout, activation=self.activation,
                           output_activation=self.output_activation, w0=self.w0, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"sizes={self.sizes}, activation={self.activation!r}, output_activation={self.output_activation!r}, "
                f"bias={'0.bias' in self.layout}")
