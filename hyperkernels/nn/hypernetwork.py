"""``HyperNetwork``: an MLP from a condition to the weights of a per-sample target network."""
from __future__ import annotations

import math
from typing import Callable, Sequence, Union

import torch
from torch import Tensor, nn

from .._dispatch import GENERATE, resolve_backend
from .._validate import check_tensor
from .batched import BatchedSequential, batched

__all__ = ["HyperNetwork"]

# The hypernetwork's own (trunk) activations, by name.
_TRUNK_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}

# Conditions drawn to measure E||trunk(cond)||^2 at initialisation: enough that the estimate of the
# generated variance is within about 1% (the contract allows a factor of 2), cheap for any trunk.
_INIT_SAMPLES = 4096
# Generated biases get this fraction of their layer's default bias variance (see the class docstring).
_BIAS_VARIANCE_FRACTION = 0.5


class HyperNetwork(nn.Module):
    r"""An MLP that maps a condition ``(B, cond_features)`` to the flat parameters ``(B, P)`` of a per-sample
    copy of ``target``, and runs that copy.

    ``generate(cond) = head(trunk(cond))``: ``trunk`` is ``Linear -> activation`` for each size in ``hidden``
    (``nn.Identity`` when ``hidden`` is empty) and ``head`` one ``nn.Linear(hidden[-1], P)``.
    ``forward(cond, x) = target(x, generate(cond))``.

    Args:
        target: the target network, an ``nn.Module`` that :func:`batched` accepts (``nn.Sequential`` of
            ``nn.Linear``, 1x1 convs and activations), or an already built ``batched(...)`` module. It is only a
            template: its own parameters are not parameters of the hypernetwork and are not trained (those named
            in ``shared`` are copied into ``self.target`` and trained there, shared by every sample).
        cond_features: the size of a condition.
        hidden: the trunk's hidden sizes.
        activation: the trunk's activation: "relu", "gelu", "silu", "tanh", "sigmoid", or a callable returning an
            ``nn.Module``.
        init: "hyperfan" (below) or "default" (PyTorch's plain ``nn.Linear`` initialisation everywhere, for
            comparison).
        shared: names of ``target``'s parameters shared by every sample instead of generated (see :func:`batched`).
        backend: as in :func:`hyperkernels.batched_linear`.
        fused: how ``forward`` runs the head. ``False``: generate the flat params, then run the target on them.
            ``True``: never materialise the target's weights: each target layer runs through
            :func:`hyperkernels.hyper_linear` straight from the trunk's output and its rows of the head.
            ``None``: choose by shape (fused for few points per sample, the rule of ``hyper_linear``'s
            ``backend="auto"``). It changes only how ``forward`` computes: the parameters, the ``state_dict``,
            the outputs and the gradients are the same; ``self.fused`` may be changed at any time.

    Attributes:
        target: the per-sample target, ``batched(target, shared)``; ``layout``: its :class:`ParamLayout`;
        trunk, head: the two parts of the hypernetwork.

    Initialisation ("hyperfan", after Chang, Flokas & Lipson, *Principled weight initialization for
    hypernetworks*, ICLR 2020): a hypernetwork initialised like an ordinary network generates target weights
    whose scale has nothing to do with the target layer's fan-in, so deep targets start exploding or vanishing.
    Hyperfan instead initialises the head so that, at initialisation and for ``cond ~ N(0, I)``, the generated
    weights of every target layer have the variance that layer would get from its own default PyTorch
    initialisation: ``1 / (3 fan_in)`` for ``nn.Linear`` and for 1x1 convs (``kaiming_uniform_(a=sqrt(5))``
    gives ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``; a 1x1 conv's ``fan_in`` is ``in_channels``). The trunk keeps
    PyTorch's default initialisation; then

    * ``m = E ||trunk(cond)||^2`` is measured once, on 4096 conditions from a fixed-seed generator (exact
      when ``hidden`` is empty: ``m = cond_features``);
    * a generated entry is ``p_j = head.weight[j] . h + head.bias[j]``; with ``head.bias = 0`` and the rows
      ``head.weight[j] ~ U(-a, a)`` independent of ``h``, ``Var(p_j)`` pooled over samples and entries is
      ``a^2 / 3 * m``;
    * so the rows of the head that generate layer ``l``'s weight get ``a^2 = 3 v_l / m`` with ``v_l`` the layer's
      default weight variance, and those that generate its bias ``a^2 = 3 (v_l / 2) / m``: the generated biases
      get half their default variance (the hyperfan-in scheme keeps the bias share of a layer's output variance
      small too).

    ``tests/test_hypernetwork.py`` measures this contract: per layer, the pooled variance of the generated
    weights within a factor 2 of the default variance, that of the biases at most the default.
    Shared parameters keep ``target``'s values.

    Example::

        >>> target = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 3))
        >>> hnet = HyperNetwork(target, cond_features=16)
        >>> hnet(torch.randn(8, 16), torch.randn(8, 1024, 2)).shape
        torch.Size([8, 1024, 3])
    """

    def __init__(self, target: Union[nn.Module, BatchedSequential], cond_features: int,
                 hidden: Sequence[int] = (128, 128), activation: Union[str, Callable[[], nn.Module]] = "relu",
                 init: str = "hyperfan", shared: Sequence[str] = (), backend: str = "auto",
                 fused: Union[bool, None] = None):
        super().__init__()
        if isinstance(target, BatchedSequential):
            if shared:
                raise ValueError("shared: target is already a batched(...) module; give shared= to batched() instead")
            self.target = target
        else:
            self.target = batched(target, shared, backend=backend)
        if isinstance(cond_features, bool) or not isinstance(cond_features, int) or cond_features < 1:
            raise ValueError(f"cond_features: expected a positive int, got {cond_features!r}")
        if isinstance(hidden, int):
            hidden = (hidden,)
        hidden = tuple(hidden)
        if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
            raise ValueError(f"hidden: expected a sequence of positive ints, got {hidden!r}")
        if isinstance(activation, str):
            if activation not in _TRUNK_ACTIVATIONS:
                raise ValueError(f"activation: expected one of {sorted(_TRUNK_ACTIVATIONS)} or a callable returning "
                                 f"an nn.Module, got {activation!r}")
            make_act = _TRUNK_ACTIVATIONS[activation]
        elif callable(activation):
            make_act = activation
        else:
            raise TypeError(f"activation: expected a string or a callable returning an nn.Module, got "
                            f"{type(activation).__name__}")
        if init not in ("hyperfan", "default"):
            raise ValueError(f"init: expected 'hyperfan' or 'default', got {init!r}")
        self.cond_features = cond_features
        self.hidden = hidden
        self.init = init
        self.fused = fused

        layers = []
        width = cond_features
        for h in hidden:
            layers += [nn.Linear(width, h), make_act()]
            width = h
        self.trunk = nn.Sequential(*layers) if layers else nn.Identity()
        # The head is its own attribute: generate() is head(trunk(cond)).
        self.head = nn.Linear(width, self.target.num_params)
        if init == "hyperfan":
            self.reset_head_hyperfan()

    # -- initialisation ---------------------------------------------------------------------------
    @torch.no_grad()
    def trunk_second_moment(self, samples: int = _INIT_SAMPLES) -> float:
        """``E ||trunk(cond)||^2`` for ``cond ~ N(0, I)``, measured on a fixed-seed sample (the user's RNG
        stream is left alone)."""
        if isinstance(self.trunk, nn.Identity):
            return float(self.cond_features)
        p = self.head.weight
        gen = torch.Generator().manual_seed(0)
        cond = torch.randn(samples, self.cond_features, generator=gen).to(device=p.device, dtype=p.dtype)
        return float(self.trunk(cond).double().square().sum(1).mean())

    @torch.no_grad()
    def reset_head_hyperfan(self) -> None:
        """(Re-)initialise the head as the class docstring says."""
        m = max(self.trunk_second_moment(), 1e-12)
        self.head.bias.zero_()
        layout = self.target.layout
        for name, v in self.target.default_init_variance().items():
            is_bias = name.rpartition(".")[2] == "bias"
            var = v * (_BIAS_VARIANCE_FRACTION if is_bias else 1.0)
            a = math.sqrt(3.0 * var / m)
            start, n = layout.offset(name), math.prod(layout.shapes[name])
            self.head.weight[start:start + n].uniform_(-a, a)

    # -- description ------------------------------------------------------------------------------
    @property
    def layout(self):
        """The :class:`~hyperkernels.ParamLayout` of the generated parameters (that of ``self.target``)."""
        return self.target.layout

    @property
    def num_params(self) -> int:
        """P: how many numbers ``generate`` returns per sample."""
        return self.target.num_params

    def extra_repr(self) -> str:
        return f"cond_features={self.cond_features}, hidden={self.hidden}, init={self.init!r}, fused={self.fused}"

    # -- forward ----------------------------------------------------------------------------------
    def _check_cond(self, cond: Tensor) -> None:
        check_tensor("cond", cond, f"(B, {self.cond_features})")
        if cond.dim() != 2 or cond.shape[1] != self.cond_features:
            raise ValueError(f"cond: expected shape (B, {self.cond_features}) (B conditions of cond_features="
                             f"{self.cond_features}), got shape {tuple(cond.shape)}")
        p = self.head.weight
        if cond.dtype != p.dtype:
            raise TypeError(f"cond: expected dtype {p.dtype} (the hypernetwork's parameters), got {cond.dtype}")
        if cond.device != p.device:
            raise ValueError(f"cond: expected device {p.device} (the hypernetwork's parameters), got {cond.device}")

    def generate(self, cond: Tensor) -> Tensor:
        """The flat per-sample parameters ``(B, P)`` for conditions ``cond (B, cond_features)``; ``self.layout``
        names the pieces of a row."""
        self._check_cond(cond)
        return self.head(self.trunk(cond))

    def forward(self, cond: Tensor, x: Tensor) -> Tensor:
        """``target(x, generate(cond))``: ``x`` has one leading batch dim of size B (see :func:`batched`)."""
        self._check_cond(cond)
        p = self.head.weight
        self.target._check_x(x, cond.shape[0], p.dtype, p.device, "cond and the hypernetwork's parameters")
        fused_backend = self._fused_backend(x)
        if fused_backend is None:
            return self.target(x, self.head(self.trunk(cond)))
        return self.target.forward_from_head(x, self.trunk(cond), self.head.weight, self.head.bias, fused_backend)

    def _fused_backend(self, x: Tensor):
        """The hyper_linear backend that runs the head fused, or None to generate-then-apply."""
        if self.fused not in (True, False, None):
            raise TypeError(f"fused: expected True, False or None, got {self.fused!r}")
        if self.fused is False:
            return None
        backend = self.target.backend
        if self.fused is True and backend != "auto":
            return backend  # what the user named, fused whatever the shape
        n = max(1, x[:1].numel() // max(1, self.target.layout_in_features))
        p = self.head.weight
        # fused=True asks hyper_linear's "auto" for its fused backend (the choice at one point per sample);
        # fused=None takes its choice at this many points, which may be to generate.
        impl = resolve_backend("auto" if backend == "auto" else backend, op="hyper_linear", device=p.device,
                               dtype=p.dtype, batch=x.shape[0], n=1 if self.fused else n,
                               k=self.target.layout_in_features, m=1)
        return None if impl == GENERATE else impl
