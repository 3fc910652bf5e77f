"""What every per-sample layer module shares: a layout, and turning forward's arguments into
(weight, bias) views."""
from __future__ import annotations

from typing import Mapping, Optional, Union

from torch import Tensor, nn

from ..activations import get_activation
from .._validate import check_w0
from ..layout import ParamLayout

Params = Union[Tensor, Mapping[str, Tensor]]


class BatchedLayer(nn.Module):
    """A layer with per-sample ``weight`` (and ``bias``) that it does not own: they come with each call."""

    def __init__(self, weight_shape: tuple[int, ...], out_features: int, bias: bool, activation: Optional[str],
                 w0: float, backend: str):
        super().__init__()
        self.activation = get_activation(activation).name
        self.w0 = check_w0(w0)
        self.backend = backend
        shapes = {"weight": weight_shape}
        if bias:
            shapes["bias"] = (out_features,)
        self.layout = ParamLayout(shapes)

    @property
    def num_params(self) -> int:
        return self.layout.numel

    def weight_and_bias(self, weight_or_params: Params, bias: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """``(weight, bias)`` from either explicit tensors or flat ``(B, P)`` / dict params."""
        has_bias = "bias" in self.layout
        is_explicit = isinstance(weight_or_params, Tensor) and weight_or_params.dim() != 2
        if is_explicit:
            if bias is not None and not has_bias:
                raise ValueError("bias: this layer was built with bias=False, but a bias was given")
            if bias is None and has_bias:
                raise ValueError("bias: this layer was built with bias=True: pass bias, or flat/dict params")
            return weight_or_params, bias
        if bias is not None:
            raise ValueError("bias: give it inside params (flat or dict), not next to them")
        if isinstance(weight_or_params, Tensor):
            views = self.layout.unflatten(weight_or_params)
        else:
            self.layout.check_dict(weight_or_params)
            views = weight_or_params
        return views["weight"], views.get("bias")

    def extra_repr(self) -> str:
        act = "" if self.activation == "none" else f", activation={self.activation!r}"
        if self.activation == "sine":
            act += f", w0={self.w0}"
        return f"{self._shape_repr()}, bias={'bias' in self.layout}{act}"
