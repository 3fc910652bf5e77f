"""``HyperNetwork``: a hypernetwork (built here, or the user's own module) from a condition to the weights of a
per-sample target network, and the target run on them."""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .._validate import check_same_dtype_device, check_tensor
from ..functional import HyperShape, hyper_linear_way
from ._batched_checks import check_params
from ._init import hyperfan_init_
from .batched import BatchedSequential, batched

__all__ = ["HyperNetwork", "BoundTarget", "hyperfan_init_"]

# The hypernetwork's own (trunk) activations, by name.
_TRUNK_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
_DEFAULT_HIDDEN = (128, 128)
_DEFAULT_ACTIVATION = "relu"
_DEFAULT_INIT = "hyperfan"

# Conditions drawn to measure E||trunk(cond)||^2 at initialisation: enough that the estimate of the
# generated variance is within about 1% (the contract allows a factor of 2), cheap for any trunk.
_INIT_SAMPLES = 4096
class BoundTarget:
    """The per-sample target bound to parameters generated once: ``bound(x) = target(x, params)``; see
    :meth:`HyperNetwork.bind`. ``params`` is the flat ``(B, P)`` tensor, still attached to the hypernetwork's
    autograd graph: every call reads it in place, and the gradients of all calls reach the hypernetwork
    through it.

    Where the target's linear layers run as PyTorch's composition (the torch backend, e.g. on CPU), ``params`` is
    cut into per-layer views once, at the first call, and every call runs the layers one by one on those views:
    each call's gradients then accumulate in the views' own ``(B, *shape)`` buffers and reach the ``(B, P)``
    gradient once per backward (one ``cat``, the backward of the split), where the fused ``batched_mlp`` op on the
    flat params would write, and autograd sum, one ``(B, P)`` gradient per call, each call also paying the custom
    op's dispatch. A training step of ``examples/conditional_ode.py`` (88 calls of a 2-32-32-2 MLP, one point per
    sample), ``OMP_NUM_THREADS=1 python examples/conditional_ode.py --compare --batch B`` on a 2-core CPU,
    2026-11-30, against ``vmap(functional_call)`` interleaved: 1.43x at B = 64 (54.1 vs 78.8 ms), 1.22x at B = 512
    (211.0 vs 260.6 ms); through the op it was 0.79x and 0.92x. For a single call at large B the op is still the
    faster (its backward writes ``dW`` untransposed; here autograd transposes it once per backward): call
    ``hnet(cond, x)`` then. Elsewhere (the Triton kernels) each call runs the fused MLP as one launch on its range
    of the flat params, which the views are cut from and which it reads in place
    (:meth:`BatchedSequential.forward_views`)."""

    def __init__(self, target: BatchedSequential, params: Tensor):
        self.target = target
        self.params = params
        self._views: Optional[dict] = None

    @property
    def batch_size(self) -> int:
        return self.params.shape[0]

    def __call__(self, x: Tensor) -> Tensor:
        if self._views is None:  # cut once: every call's graph then starts at these views
            self._views = self.target.split_params(self.params)
        return self.target.forward_views(x, self._views)

    def __repr__(self) -> str:
        return f"BoundTarget(batch_size={self.batch_size}, num_params={self.params.shape[1]})"


def _first_tensor(x) -> Optional[Tensor]:
    """``x``, or the first tensor of a tuple of inputs."""
    if isinstance(x, Tensor):
        return x
    return next((t for t in x if isinstance(t, Tensor)), None) if isinstance(x, (tuple, list)) else None


def _split_head(module: nn.Module, num_params: int) -> tuple[Optional[nn.Module], Optional[nn.Linear], str]:
    """``(trunk, head, "")`` when ``module`` computes ``head(trunk(cond))`` with ``head`` an ``nn.Linear`` of
    ``num_params`` outputs (``module`` itself, or the last layer of a possibly nested ``nn.Sequential``);
    ``trunk`` is built from the same layer objects (no copy). Else ``(None, None, why not)``."""

    def hooked(m: nn.Module) -> bool:
        return bool(m._forward_hooks or m._forward_pre_hooks)

    if hooked(module):
        return None, None, f"{type(module).__name__} has forward hooks, which a fused head would skip"
    if type(module) is nn.Linear or (isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward):
        if module.out_features != num_params:
            return None, None, (f"its output nn.Linear has out_features={module.out_features}, not P={num_params}")
        return nn.Identity(), module, ""
    if not isinstance(module, nn.Sequential) or type(module).forward is not nn.Sequential.forward:
        return None, None, (f"{type(module).__name__} is not an nn.Linear or an nn.Sequential ending in one, so "
                            "its last layer is unknown")
    children = list(module)
    if not children:
        return None, None, "it is an empty nn.Sequential"
    inner_trunk, head, why = _split_head(children[-1], num_params)
    if head is None:
        return None, None, why
    layers = children[:-1] + ([] if isinstance(inner_trunk, nn.Identity) else [inner_trunk])
    return (nn.Sequential(*layers) if layers else nn.Identity()), head, ""


class HyperNetwork(nn.Module):
    r"""A hypernetwork that maps a condition to the flat parameters ``(B, P)`` of a per-sample copy of
    ``target``, and runs that copy: ``forward(cond, x) = target(x, generate(cond))``.

    The hypernetwork is either built here, an MLP ``generate(cond) = head(trunk(cond))`` (``trunk`` is
    ``Linear -> activation`` for each size in ``hidden``, ``nn.Identity`` when ``hidden`` is empty, and
    ``head`` one ``nn.Linear(hidden[-1], P)``), or the user's own module, ``hypernet=``, used as is.

    Args:
        target: the target network, any ``nn.Module`` that :func:`batched` accepts, or an already built
            ``batched(...)`` module. It is only a template: its own parameters are not parameters of the
            hypernetwork and are not trained (those named in ``shared`` are copied into ``self.target`` and trained
            there, shared by every sample).
        cond_features: the size of a condition ``(B, cond_features)``. Required unless ``hypernet`` is given;
            with ``hypernet``, optional, and then checked on every ``cond``.
        hidden: the trunk's hidden sizes (default ``(128, 128)``).
        activation: the trunk's activation: "relu" (default), "gelu", "silu", "tanh", "sigmoid", or a callable
            returning an ``nn.Module``.
        init: "hyperfan" (default; below) or "default" (PyTorch's plain ``nn.Linear`` initialisation everywhere,
            for comparison).
        shared: names of ``target``'s parameters shared by every sample instead of generated (see :func:`batched`).
        backend: as in :func:`hyperkernels.batched_linear`.
        fused: how ``forward`` runs the head. ``False``: generate the flat params, then run the target on them.
            ``True``: never materialise the target's weights: each target layer runs through
            :func:`hyperkernels.hyper_linear` straight from the trunk's output and its rows of the head.
            ``None`` (default): whichever the cost model of ``hyper_linear``'s ``backend="auto"``
            (``hyperkernels/_dispatch.py``), summed over the target's generated layers, says is faster (the
            smaller in memory where they are about even), for this batch, points per sample, dtype and device.
            It changes only how ``forward`` computes: the parameters, the ``state_dict``, the outputs and the
            gradients are the same; ``self.fused`` may be changed at any time.
        hypernet: the user's own hypernetwork, any ``nn.Module`` mapping a condition ``(B, ...)`` to either a
            ``(B, P)`` tensor laid out like ``self.layout`` (``parameters_to_vector`` order of the target's
            per-sample parameters) or a dict ``{name: (B, *shape)}`` keyed like ``target.state_dict()`` (the
            per-sample names). It is kept as is, as ``self.hypernet``: its parameters, its ``state_dict``
            (``hnet.hypernet.load_state_dict(...)`` takes a checkpoint of the module unchanged) and its
            initialisation are its own, so ``hidden``, ``activation`` and ``init`` are refused with it. Its
            output is checked on every call (type, shape, dtype, keys). When its last layer is an ``nn.Linear``
            with ``P`` outputs (the module itself, or an ``nn.Sequential`` ending in one), the fused head path is
            available: ``trunk`` is everything before that layer and ``head`` that layer, the same objects
            (nothing copied; they are not registered twice, so the ``state_dict`` is the module's).

    Attributes:
        target: the per-sample target, ``batched(target, shared)``; ``layout``: its :class:`ParamLayout`;
        trunk, head: the two parts of the hypernetwork (``None`` for a ``hypernet`` without a fused head);
        hypernet: the user's module, or ``None`` for the MLP built here.

    Generating once, running many times (:meth:`bind`): ``bound = hnet.bind(cond)`` generates the parameters
    once and returns the target bound to them; ``bound(x)`` equals ``hnet(cond, x)`` in value and gradient, and
    ``bound.params`` is the ``(B, P)`` tensor. Inside a solver loop (an ODE integrator evaluates the dynamics
    many times per forward pass) the hypernetwork then runs once per pass, not once per evaluation, and the
    gradients of every evaluation flow back to it through ``bound.params``::

        >>> target = nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 2))  # dynamics: (z, t) -> dz/dt
        >>> hnet = HyperNetwork(target, cond_features=8, hidden=(64,))
        >>> cond, z = torch.randn(16, 8), torch.randn(16, 2)
        >>> f = hnet.bind(cond)                      # one hypernetwork pass: f.params is (16, P)
        >>> dt = 0.1
        >>> for step in range(22):                   # RK4: 4 evaluations per step, 88 in all
        ...     t = torch.full((16, 1), step * dt)
        ...     k1 = f(torch.cat([z, t], 1))
        ...     k2 = f(torch.cat([z + dt / 2 * k1, t + dt / 2], 1))
        ...     k3 = f(torch.cat([z + dt / 2 * k2, t + dt / 2], 1))
        ...     k4 = f(torch.cat([z + dt * k3, t + dt], 1))
        ...     z = z + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        >>> z.square().mean().backward()             # reaches hnet's parameters through f.params

    Initialisation ("hyperfan", after Chang, Flokas & Lipson, *Principled weight initialization for
    hypernetworks*, ICLR 2020; for the MLP built here): a hypernetwork initialised like an ordinary network
    generates target weights whose scale has nothing to do with the target layer's fan-in, so deep targets
    start exploding or vanishing. Hyperfan instead initialises the head so that, at initialisation and for
    ``cond ~ N(0, I)``, the generated weights of every target layer have the variance that layer would get from
    its own default PyTorch initialisation: ``1 / (3 fan_in)`` for ``nn.Linear`` and for convs
    (``kaiming_uniform_(a=sqrt(5))`` gives ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``; a 1x1 conv's ``fan_in`` is
    ``in_channels``), and the mean and variance of the template's own values for other parameters (e.g. a
    norm's weight: mean 1, variance 0), as ``target.default_init_variance()`` / ``default_init_mean()`` say. The
    trunk keeps PyTorch's default initialisation; then

    * ``m = E ||trunk(cond)||^2`` is measured once, on 4096 conditions from a fixed-seed generator (exact
      when ``hidden`` is empty: ``m = cond_features``);
    * a generated entry is ``p_j = head.weight[j] . h + head.bias[j]``; with ``head.bias[j]`` the default mean
      (0 for linear layers and convs) and the rows ``head.weight[j] ~ U(-a, a)`` independent of ``h``,
      ``Var(p_j)`` pooled over samples and entries is ``a^2 / 3 * m``;
    * so the rows of the head that generate layer ``l``'s weight get ``a^2 = 3 v_l / m`` with ``v_l`` the layer's
      default weight variance, and those that generate its bias ``a^2 = 3 (v_l / 2) / m``: the generated biases
      get half their default variance (the hyperfan-in scheme keeps the bias share of a layer's output variance
      small too).

    ``tests/nn/test_hypernetwork_init.py`` measures this contract: per layer, the pooled variance of the generated
    weights within a factor 2 of the default variance, that of the biases at most the default.
    Shared parameters keep ``target``'s values.

    Example::

        >>> target = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 3))
        >>> hnet = HyperNetwork(target, cond_features=16)
        >>> hnet(torch.randn(8, 16), torch.randn(8, 1024, 2)).shape
        torch.Size([8, 1024, 3])
        >>> mine = nn.Sequential(nn.Linear(16, 100), nn.ReLU(), nn.Linear(100, hnet.num_params))
        >>> hnet = HyperNetwork(target, hypernet=mine)          # mine.state_dict() loads into hnet.hypernet
        >>> hnet(torch.randn(8, 16), torch.randn(8, 1024, 2)).shape
        torch.Size([8, 1024, 3])
    """

    def __init__(self, target: Union[nn.Module, BatchedSequential], cond_features: Optional[int] = None,
                 hidden: Optional[Sequence[int]] = None,
                 activation: Union[str, Callable[[], nn.Module], None] = None, init: Optional[str] = None,
                 shared: Sequence[str] = (), backend: str = "auto", fused: Union[bool, None] = None, *,
                 hypernet: Optional[nn.Module] = None):
        super().__init__()
        if isinstance(target, BatchedSequential):
            if shared:
                raise ValueError("shared: target is already a batched(...) module; give shared= to batched() instead")
            self.target = target
        else:
            self.target = batched(target, shared, backend=backend)
        if cond_features is not None or hypernet is None:
            if isinstance(cond_features, bool) or not isinstance(cond_features, int) or cond_features < 1:
                needed = "" if hypernet is not None else " (required unless hypernet= is given)"
                raise ValueError(f"cond_features: expected a positive int{needed}, got {cond_features!r}")
        self.cond_features = cond_features
        self.fused = fused
        if hypernet is not None:
            self._use_hypernet(hypernet, hidden=hidden, activation=activation, init=init)
        else:
            self._build_mlp(hidden, activation, init)

    # -- construction -----------------------------------------------------------------------------
    def _use_hypernet(self, hypernet: nn.Module, **not_allowed) -> None:
        if not isinstance(hypernet, nn.Module):
            raise TypeError(f"hypernet: expected an nn.Module mapping cond (B, ...) to (B, {self.num_params}) or to a "
                            f"dict like target.state_dict(), got {type(hypernet).__name__}")
        given = [name for name, value in not_allowed.items() if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: not used with hypernet=, which is used as is (its layers, "
                             "activations and initialisation are its own); leave them out")
        self.hypernet = hypernet
        self.hidden = None
        self.init = None
        trunk, head, why = _split_head(hypernet, self.num_params)
        # Plain attributes, not submodules: the same layer objects as in self.hypernet, which alone holds them
        # in parameters() and state_dict().
        object.__setattr__(self, "trunk", trunk)
        object.__setattr__(self, "head", head)
        self._no_head_reason = why
        if self.fused is True and head is None:
            raise ValueError(self._fused_refusal())

    def _build_mlp(self, hidden, activation, init) -> None:
        hidden = _DEFAULT_HIDDEN if hidden is None else hidden
        activation = _DEFAULT_ACTIVATION if activation is None else activation
        init = _DEFAULT_INIT if init is None else init
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
        self.hypernet = None
        self.hidden = hidden
        self.init = init
        self._no_head_reason = ""
        layers = []
        width = self.cond_features
        for h in hidden:
            layers += [nn.Linear(width, h), make_act()]
            width = h
        self.trunk = nn.Sequential(*layers) if layers else nn.Identity()
        # The head is its own attribute: generate() is head(trunk(cond)).
        self.head = nn.Linear(width, self.target.num_params)
        if init == "hyperfan":
            self.reset_head_hyperfan()

    # -- initialisation ---------------------------------------------------------------------------
    def _own_mlp_only(self, what: str) -> None:
        if self.hypernet is not None:
            raise ValueError(f"{what}: only for the MLP that HyperNetwork builds; hypernet= "
                             f"({type(self.hypernet).__name__}) is used as is, with its own initialisation")

    @torch.no_grad()
    def trunk_second_moment(self, samples: int = _INIT_SAMPLES) -> float:
        """``E ||trunk(cond)||^2`` for ``cond ~ N(0, I)``, measured on a fixed-seed sample (the user's RNG
        stream is left alone)."""
        self._own_mlp_only("trunk_second_moment")
        if isinstance(self.trunk, nn.Identity):
            return float(self.cond_features)
        p = self.head.weight
        gen = torch.Generator().manual_seed(0)
        cond = torch.randn(samples, self.cond_features, generator=gen).to(device=p.device, dtype=p.dtype)
        return float(self.trunk(cond).double().square().sum(1).mean())

    @torch.no_grad()
    def reset_head_hyperfan(self) -> None:
        """(Re-)initialise the head as the class docstring says."""
        self._own_mlp_only("reset_head_hyperfan")
        hyperfan_init_(self.head, self.target.layout, self.target.default_init_variance(), self.trunk_second_moment(),
                       self.target.default_init_mean())

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
        if self.hypernet is None:
            return (f"cond_features={self.cond_features}, hidden={self.hidden}, init={self.init!r}, "
                    f"fused={self.fused}")
        head = "fused head: the last nn.Linear" if self.head is not None else f"no fused head: {self._no_head_reason}"
        return f"cond_features={self.cond_features}, fused={self.fused} ({head})"

    # -- generating -------------------------------------------------------------------------------
    def _check_cond(self, cond: Tensor) -> None:
        if self.hypernet is not None:
            if not isinstance(cond, Tensor):
                raise TypeError(f"cond: expected a Tensor (B, ...) for hypernet, got {type(cond).__name__}")
            if cond.dim() < 1:
                raise ValueError("cond: expected a leading batch dim (B, ...), got a 0-D tensor")
            if self.cond_features is not None and (cond.dim() != 2 or cond.shape[1] != self.cond_features):
                raise ValueError(f"cond: expected shape (B, {self.cond_features}) (cond_features="
                                 f"{self.cond_features}), got shape {tuple(cond.shape)}")
            return
        check_tensor("cond", cond, f"(B, {self.cond_features})")
        if cond.dim() != 2 or cond.shape[1] != self.cond_features:
            raise ValueError(f"cond: expected shape (B, {self.cond_features}) (B conditions of cond_features="
                             f"{self.cond_features}), got shape {tuple(cond.shape)}")
        check_same_dtype_device([("the hypernetwork's parameters", self.head.weight), ("cond", cond)])

    def _check_generated(self, out, batch: int, x=None):
        """The user's hypernet output, checked like ``target``'s params (a ``(B, P)`` tensor or a dict of
        ``(B, *shape)`` tensors), of one dtype and device: those of ``x`` when given."""
        what = f"hypernet output ({type(self.hypernet).__name__})"
        flat, given, _ = check_params(out, self.layout, self.target.shared_names, what, batch)
        pieces = [(what, flat)] if flat is not None else [(f"{what}[{n!r}]", given[n]) for n in self.layout.names]
        first = _first_tensor(x) if x is not None else None
        check_same_dtype_device(([("x", first)] if first is not None else []) + pieces)
        return out

    def _generate(self, cond: Tensor, x: Optional[Tensor] = None):
        if self.hypernet is None:
            return self.head(self.trunk(cond))
        return self._check_generated(self.hypernet(cond), cond.shape[0], x)

    def generate(self, cond: Tensor):
        """The per-sample parameters for conditions ``cond``: the flat ``(B, P)`` tensor (``self.layout`` names
        the pieces of a row), or, for a ``hypernet`` that returns a dict, that dict."""
        self._check_cond(cond)
        return self._generate(cond)

    def bind(self, cond: Tensor) -> BoundTarget:
        """The target bound to parameters generated once from ``cond``: ``bound(x)`` equals ``self(cond, x)``, in
        value and gradient, for any number of calls (see the class docstring). ``bound.params`` is the flat
        ``(B, P)`` tensor (a dict from ``hypernet`` is flattened once, here)."""
        params = self.generate(cond)
        if not isinstance(params, Tensor):
            params = self.layout.flatten(params, "hypernet output")
        return BoundTarget(self.target, params)

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, cond: Tensor, x: Tensor) -> Tensor:
        """``target(x, generate(cond))``: ``x`` has one leading batch dim of size B (see :func:`batched`)."""
        self._check_cond(cond)
        batch = cond.shape[0]
        if self.hypernet is None:
            p = self.head.weight
            self.target.check_x(x, batch, p.dtype, p.device, "cond and the hypernetwork's parameters")
        else:  # the output's dtype and device are known once the module has run; the shapes now
            first = _first_tensor(x)
            if first is not None:
                self.target.check_x(x, batch, first.dtype, first.device, "cond")
        fused_backend = self._fused_backend(x)
        if fused_backend is None:
            return self.target(x, self._generate(cond, x))
        if self.hypernet is not None:
            p = self.head.weight
            self.target.check_x(x, batch, p.dtype, p.device, "the hypernetwork's last nn.Linear")
        return self.target.forward_from_head(x, self.trunk(cond), self.head.weight, self.head.bias, fused_backend)

    def _fused_refusal(self) -> str:
        return (f"fused=True: the head of hypernet ({type(self.hypernet).__name__}) cannot run fused: "
                f"{self._no_head_reason}. The fused path needs its last layer to be an nn.Linear with P="
                f"{self.num_params} outputs (e.g. an nn.Sequential ending in one); use fused=None or False")

    def _hyper_layers(self, x: Tensor) -> list:
        """The layers ``forward_from_head`` runs through hyper_linear, as the cost model's HyperShape s, at the
        points per sample of ``x``. Read from the layout: every generated weight of an nn.Linear or a 1x1 conv
        (``(out, in)`` or ``(out, in, 1, ...)``); other parameters are generated either way and cost the same."""
        p = self.head.weight
        n = max(1, x[:1].numel() // max(1, self.target.layout_in_features))
        grad = torch.is_grad_enabled() and any(q.requires_grad for q in self.parameters())
        # weights that generate-then-apply runs inside a fused batched_mlp op: the cost model prices their
        # backward as that op's, one (B, P) gradient written once
        in_mlp_op = self.target.fused_mlp_weights(x)
        shapes = self.layout.shapes
        layers = []
        for name, shape in shapes.items():
            prefix, _, leaf = name.rpartition(".")
            if leaf != "weight" or len(shape) < 2 or any(d != 1 for d in shape[2:]):
                continue
            bias_name = f"{prefix}.bias" if prefix else "bias"
            first = not layers
            layers.append(HyperShape(x.shape[0], n, shape[1], shape[0], p.shape[1], bias_name in shapes,
                                     self.head.bias is not None, p.element_size(), grad,
                                     grad and (x.requires_grad if first else True), name in in_mlp_op))
        return layers

    def _fused_backend(self, x: Tensor):
        """The hyper_linear backend that runs the head fused, or None to generate-then-apply."""
        if self.fused not in (True, False, None):
            raise TypeError(f"fused: expected True, False or None, got {self.fused!r}")
        if self.fused is False:
            return None
        if self.head is None:
            if self.fused:
                raise ValueError(self._fused_refusal())
            return None
        if not isinstance(x, Tensor):  # several inputs: a target with its own forward, run per sample
            if self.fused:
                raise ValueError("fused=True: the head runs fused into the target's linear layers from one input "
                                 f"tensor x; got a {type(x).__name__} of inputs: use fused=None or False")
            return None
        p = self.head.weight
        # One decision for the whole network: the cost model of both ways summed over the generated layers.
        layers = [] if self.fused else self._hyper_layers(x)
        way = hyper_linear_way(self.target.backend, p.device, p.dtype, layers, may_generate=self.fused is None)
        return None if way.generate else way.backend
