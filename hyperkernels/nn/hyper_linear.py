from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from .._validate import check_w0
from ..activations import DEFAULT_SINE_W0, get_activation
from ..functional import hyper_linear
from ..layout import ParamLayout
from ._init import hyperfan_init_


class HyperLinear(nn.Module):
    """A hypernetwork head and the per-sample ``nn.Linear(in_features, out_features)`` it generates, run fused:
    ``y[b] = act(W[b] x[b] + c[b])`` with ``[W[b], c[b]] = head(h[b])``, and ``W`` never materialised.

    ``.head`` is an ``nn.Linear(cond_features, out*in + out*bias)`` whose output rows are ordered like
    ``parameters_to_vector(nn.Linear(in_features, out_features, bias))``; ``.layout`` names them ("weight",
    "bias"). ``forward(x, h)`` takes ``x (B, in)`` or ``(B, N, in)`` and ``h (B, cond_features)``;
    ``generate(h)`` returns the materialised ``(B, P)`` parameters (for export and comparison): ``forward(x, h)``
    equals ``BatchedLinear(in, out)(x, generate(h))``.

    The head starts like ``HyperNetwork``'s "hyperfan" head (Chang, Flokas & Lipson, ICLR 2020), taking
    ``E||h||^2 = cond_features`` (``h ~ N(0, I)``): the generated weights get the variance of a default
    ``nn.Linear(in_features, out_features)``, ``1 / (3 in)`` (head rows uniform in ``+-1/sqrt(in * cond_features)``),
    the generated biases half of it, and the head's bias is zero.

    >>> layer = HyperLinear(16, 3, 4, activation="relu")
    >>> layer(torch.randn(8, 100, 3), torch.randn(8, 16)).shape
    torch.Size([8, 100, 4])
    """

    def __init__(self, cond_features: int, in_features: int, out_features: int, bias: bool = True,
                 activation: Optional[str] = None, w0: float = DEFAULT_SINE_W0, backend: str = "auto"):
        super().__init__()
        for name, value in (("cond_features", cond_features), ("in_features", in_features),
                            ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        self.cond_features, self.in_features, self.out_features = cond_features, in_features, out_features
        self.activation = get_activation(activation).name
        self.w0 = check_w0(w0)
        self.backend = backend
        shapes = {"weight": (out_features, in_features)}
        if bias:
            shapes["bias"] = (out_features,)
        self.layout = ParamLayout(shapes)
        self.head = nn.Linear(cond_features, self.layout.numel)
        self.reset_parameters()

    @property
    def bias(self) -> bool:
        """Whether the generated layer has a bias."""
        return "bias" in self.layout

    @property
    def num_params(self) -> int:
        """P: the generated parameters per sample."""
        return self.layout.numel

    def reset_parameters(self) -> None:
        """The "hyperfan" head of :class:`HyperNetwork` for one ``nn.Linear(in_features, out_features)`` target,
        with ``E||h||^2 = cond_features``."""
        variance = 1.0 / (3 * self.in_features)  # nn.Linear's default: uniform in +-1/sqrt(in)
        hyperfan_init_(self.head, self.layout, {name: variance for name in self.layout.names}, self.cond_features)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        return hyper_linear(x, h, self.head.weight, self.head.bias, out_features=self.out_features, bias=self.bias,
                            activation=self.activation, w0=self.w0, backend=self.backend)

    def generate(self, h: Tensor) -> Tensor:
        """The per-sample parameters ``(B, P)``, materialised (``self.layout`` names their pieces)."""
        return F.linear(h, self.head.weight, self.head.bias)

    def extra_repr(self) -> str:
        act = "" if self.activation == "none" else f", activation={self.activation!r}"
        if self.activation == "sine":
            act += f", w0={self.w0}"
        return (f"cond_features={self.cond_features}, in_features={self.in_features}, "
                f"out_features={self.out_features}, bias={self.bias}{act}")
