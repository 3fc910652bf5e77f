"""``batched(module)``: the per-sample version of an ordinary ``nn.Sequential``.

The returned module runs one copy of ``module`` per sample, each with its own weights, and computes what
``torch.func.vmap(torch.func.functional_call(module, ...))`` computes on the same parameters, through
hyperkernels' ops:

* The module is read once, at construction, into a plan of *segments*. A maximal run of ``nn.Linear``
  layers whose parameters are all per-sample, with one activation between layers (any one after the
  last), is one segment and runs as one fused ``batched_mlp`` op where the backend has it. It reads the
  flat ``(B, P)`` params through ``narrow`` (no copy) with an ``MLPSpec`` rebased to its range, so its
  backward writes one ``(B, segment length)`` gradient; a segment that covers the whole row gets the flat
  tensor itself, so the gradient arrives as one ``(B, P)`` tensor.
* 1x1 convolutions, layers with shared parameters, and linear runs on a backend without a fused MLP run
  layer by layer through ``batched_linear`` / ``batched_conv1x1``, with bias and activation fused.
* Shared parameters (``shared=``) are trainable ``nn.Parameter`` s of the returned module, handed to every
  sample as an ``expand`` (batch stride 0, never copied ``B`` times); their gradient is the sum over samples.

Everything that cannot be run this way is refused by ``batched(...)`` itself, with the layer's index and
type and what is supported.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .. import _validate
from .._dispatch import BACKEND_NAMES, implements, resolve_backend
from ..activations import DEFAULT_SINE_W0, get_activation
from ..functional import batched_conv1x1, batched_linear, hyper_linear, run_mlp
from ..layout import MLPSpec, ParamLayout
from .activations import Sine

__all__ = ["batched", "BatchedSequential", "SUPPORTED"]

Params = Union[Tensor, Mapping[str, Tensor]]

_CONV_TYPES = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
# Activation modules and the name of their entry in the one activation table (hyperkernels/activations.py).
_ACTIVATION_TYPES = {nn.ReLU: "relu", nn.GELU: "gelu", nn.SiLU: "silu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid",
                     nn.Identity: "none", Sine: "sine"}

SUPPORTED = (
    "nn.Linear; nn.Conv1d / nn.Conv2d / nn.Conv3d with kernel size 1 (stride 1, no padding, groups 1); "
    "the activations nn.ReLU, nn.GELU (approximate='none'), nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity and "
    "hyperkernels.nn.Sine; and nn.Sequential of these"
)


# -- the plan ------------------------------------------------------------------------------------

@dataclass
class _Layer:
    """One linear layer or 1x1 conv of the module, with the activation fused after it."""

    index: str              # where it sits in the module, e.g. "2" (or "1.0" in a nested Sequential)
    type_name: str
    conv_dims: int          # 0 for nn.Linear, else the number of spatial dims of the nn.ConvNd
    weight: str             # the parameter names, as in module.state_dict()
    bias: Optional[str]
    out_features: int
    in_features: int
    activation: str = "none"
    w0: float = DEFAULT_SINE_W0
    shared: frozenset = frozenset()  # which of weight / bias are shared by every sample

    @property
    def names(self) -> list[str]:
        return [self.weight] + ([self.bias] if self.bias else [])

    def describe(self) -> str:
        return f"layer {self.index} ({self.type_name})"


@dataclass
class _Activation:
    """An activation that could not be fused into the layer before it (e.g. the first module)."""

    index: str
    activation: str
    w0: float


@dataclass
class _Segment:
    """Consecutive per-sample nn.Linear layers: one fused batched_mlp op, or layer by layer."""

    layers: list
    start: int = 0          # where its parameters start in the flat row, and how many there are
    length: int = 0
    spec: Optional[MLPSpec] = None
    activation: str = "none"
    output_activation: str = "none"
    w0: float = DEFAULT_SINE_W0
    names: list = field(default_factory=list)


def _same_act(a: tuple, b: tuple) -> bool:
    """(name, w0) pairs: the same activation (w0 matters only for "sine")."""
    return a[0] == b[0] and (a[0] != "sine" or a[1] == b[1])


def _check_forward_not_overridden(child: nn.Module, base: type, where: str) -> None:
    # A subclass that keeps the base forward computes the same thing (e.g. torch's
    # NonDynamicallyQuantizableLinear); one with its own forward could compute anything.
    if type(child).forward is not base.forward:
        raise ValueError(
            f"module: {where} ({type(child).__name__}) subclasses nn.{base.__name__} but overrides forward(), "
            f"which batched() cannot run per sample. Supported: {SUPPORTED}"
        )


def _walk(module: nn.Module, prefix: str = "") -> Iterable[tuple[str, str, nn.Module]]:
    """(index, parameter-name prefix, child) for the leaves of a (nested) nn.Sequential, in order."""
    for name, child in module._modules.items():  # not named_children(), which hides a module used twice
        if child is None:
            continue
        if isinstance(child, nn.Sequential):
            _check_forward_not_overridden(child, nn.Sequential, f"layer {prefix}{name}")
            yield from _walk(child, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", f"{prefix}{name}.", child


def _read_layer(index: str, prefix: str, child: nn.Module) -> _Layer:
    where = f"layer {index}"
    kind = type(child).__name__
    conv_dims = next((d for t, d in _CONV_TYPES.items() if isinstance(child, t)), 0)
    _check_forward_not_overridden(child, next(t for t in (nn.Linear, *_CONV_TYPES) if isinstance(child, t)), where)
    if torch.nn.utils.parametrize.is_parametrized(child):
        raise ValueError(
            f"module: {where} ({kind}) has parametrizations (torch.nn.utils.parametrize, e.g. weight_norm or "
            "spectral_norm); batched() needs plain parameters: remove them (parametrize.remove_parametrizations) "
            "or generate the parametrized weight yourself"
        )
    if isinstance(getattr(child, "weight", None), nn.parameter.UninitializedParameter):
        raise ValueError(f"module: {where} ({kind}) is a lazy module whose shapes are not known yet: run it once or "
                         "give its sizes")
    if child._forward_hooks or child._forward_pre_hooks:
        raise ValueError(f"module: {where} ({kind}) has forward hooks, which batched() cannot run per sample")
    names = [n for n, p in child._parameters.items() if p is not None]
    if "weight" not in names:
        hint = ("it was converted in place by HyperLight's hypernetize(): build batched() from the model as it was "
                "before (a copy.deepcopy made before hypernetize), with shared= the names still in "
                "model.named_parameters()" if hasattr(child, "_external_parameters") else
                "is its weight a buffer or a plain attribute? was the module already converted in place by "
                "another library?")
        raise ValueError(f"module: {where} ({kind}) has no parameter 'weight': {hint}")
    extra = [n for n in names if n not in ("weight", "bias")]
    if extra:
        raise ValueError(
            f"module: {where} ({kind}) has parameters {extra} besides weight and bias (old-style weight_norm?); "
            "batched() needs a plain layer"
        )
    weight = child.weight
    if conv_dims:
        problems = []
        if any(k != 1 for k in child.kernel_size):
            problems.append(f"kernel_size={tuple(child.kernel_size)}")
        if any(s != 1 for s in child.stride):
            problems.append(f"stride={tuple(child.stride)}")
        if not (child.padding in ("valid", "same") or all(p == 0 for p in child.padding)):
            problems.append(f"padding={child.padding}")
        if child.groups != 1:
            problems.append(f"groups={child.groups}")
        if problems:
            raise ValueError(
                f"module: {where} ({kind}) has {', '.join(problems)}: batched() runs convolutions with kernel size 1, "
                f"stride 1, no padding and groups 1 only. Supported: {SUPPORTED}"
            )
    has_bias = "bias" in names
    return _Layer(index, kind, conv_dims, f"{prefix}weight", f"{prefix}bias" if has_bias else None,
                  int(weight.shape[0]), int(weight.shape[1]))


def _read_activation(index: str, child: nn.Module) -> Optional[tuple[str, float]]:
    """(table name, w0) of an activation module, None if it is not one."""
    for t, name in _ACTIVATION_TYPES.items():
        if type(child) is t or (isinstance(child, t) and type(child).forward is t.forward):
            if isinstance(child, nn.GELU) and child.approximate != "none":
                raise ValueError(
                    f"module: layer {index} (GELU) has approximate={child.approximate!r}; the fused kernels compute "
                    "the exact erf form only: use nn.GELU() (approximate='none')"
                )
            return name, (child.w0 if isinstance(child, Sine) else DEFAULT_SINE_W0)
    return None


def _unsupported(index: str, child: nn.Module) -> ValueError:
    return ValueError(f"module: layer {index} ({type(child).__name__}) is not supported by batched(). "
                      f"Supported: {SUPPORTED}")


class BatchedSequential(nn.Module):
    """The per-sample version of a module, built by :func:`batched`: see there."""

    def __init__(self, module: nn.Module, shared: Sequence[str] = (), backend: str = "auto"):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module: expected an nn.Module, got {type(module).__name__}")
        if isinstance(shared, str):
            shared = (shared,)
        shared = tuple(shared)
        if not isinstance(backend, str) or backend not in BACKEND_NAMES:
            raise ValueError(f"backend: expected one of {list(BACKEND_NAMES)}, got {backend!r}")
        self.backend = backend
        self.module_type = type(module).__name__

        # 1. The leaves, in order.
        if isinstance(module, nn.Sequential):
            _check_forward_not_overridden(module, nn.Sequential, "the module")
            leaves = list(_walk(module))
        elif isinstance(module, (nn.Linear, *_CONV_TYPES)):
            leaves = [("0", "", module)]
        else:
            hint = (" (a hypnettorch main network: batched() the equivalent nn.Sequential, whose parameters "
                    "follow its param_shapes)" if hasattr(module, "param_shapes") else "")
            raise ValueError(f"module: expected an nn.Linear, a 1x1 nn.ConvNd or an nn.Sequential, got "
                             f"{type(module).__name__}{hint}. Supported: {SUPPORTED}")
        seen = {}
        for index, _, child in leaves:
            if id(child) in seen and any(True for _ in child.parameters()):
                raise ValueError(f"module: layer {index} is the same module object as layer {seen[id(child)]} "
                                 "(tied weights), which batched() does not support")
            seen[id(child)] = index
        all_params = OrderedDict(module.named_parameters(remove_duplicate=False))
        if len(all_params) != len(OrderedDict(module.named_parameters())):
            raise ValueError("module: some parameters are tied (one tensor under several names), which batched() "
                             "does not support")

        # 2. Layers with their fused activations, and the activations left standing alone.
        steps: list = []
        for index, prefix, child in leaves:
            if isinstance(child, (nn.Linear, *_CONV_TYPES)):
                steps.append(_read_layer(index, prefix, child))
                continue
            act = _read_activation(index, child)
            if act is None:
                raise _unsupported(index, child)
            if any(True for _ in child.parameters()):
                raise _unsupported(index, child)
            if act[0] == "none":
                continue
            last = steps[-1] if steps else None
            if isinstance(last, _Layer) and last.activation == "none":
                last.activation, last.w0 = act
            else:
                steps.append(_Activation(index, *act))
        layers = [s for s in steps if isinstance(s, _Layer)]
        for prev, layer in zip(layers, layers[1:]):
            if bool(prev.conv_dims) == bool(layer.conv_dims) and layer.in_features != prev.out_features:
                raise ValueError(f"module: {layer.describe()} takes {layer.in_features} inputs but {prev.describe()} "
                                 f"gives {prev.out_features}")
        if not layers:
            raise ValueError(f"module: {type(module).__name__} has no nn.Linear or 1x1 conv layer, so nothing to run "
                             f"per sample. Supported: {SUPPORTED}")

        # 3. Shared parameters: trainable parameters of this module, initialised from the template's values.
        names = list(all_params)
        unknown = [n for n in shared if n not in all_params]
        if unknown:
            raise ValueError(f"shared: {unknown} are not parameters of the module; its parameters are {names}")
        if len(set(shared)) != len(shared):
            raise ValueError(f"shared: names repeat in {list(shared)}")
        self.shared_names = tuple(n for n in names if n in shared)  # in module order
        self.shared = nn.ParameterDict(OrderedDict(  # an OrderedDict: a plain dict's keys would be sorted
            (self._key(n), nn.Parameter(all_params[n].detach().clone())) for n in self.shared_names))
        for layer in layers:
            layer.shared = frozenset(n for n in layer.names if n in shared)

        # 4. The per-sample layout: the module's parameters minus the shared ones, in module order.
        per_sample = OrderedDict((n, tuple(p.shape)) for n, p in all_params.items() if n not in shared)
        if not per_sample:
            why = ("every parameter is in shared=" if shared else
                   "it has no parameters: was it already converted in place by another library?")
            raise ValueError(f"module: no per-sample parameters left ({why}); batched() needs at least one parameter "
                             "generated per sample")
        self.layout = ParamLayout(per_sample)

        # 5. Segments: maximal runs of per-sample nn.Linear layers that the fused MLP can run.
        self._steps: list = []
        run: list = []
        for step in steps:
            if isinstance(step, _Layer) and not step.conv_dims and not step.shared:
                if run and self._extends(run, step):
                    run.append(step)
                    continue
                self._flush(run)
                run = [step]
                continue
            self._flush(run)
            run = []
            self._steps.append(step)
        self._flush(run)
        self._layers = layers
        self._first = layers[0]

    # -- construction helpers ---------------------------------------------------------------------
    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "_")  # ParameterDict keys cannot hold dots

    @staticmethod
    def _extends(run: list, layer: _Layer) -> bool:
        """Whether ``layer`` can join ``run``: the run's activations so far all become hidden activations, which
        the fused op needs to be one and the same; the newcomer's becomes the output activation (one w0 for both)."""
        hidden = (run[0].activation, run[0].w0)
        if not all(_same_act((l.activation, l.w0), hidden) for l in run):
            return False
        if layer.in_features != run[-1].out_features:
            return False
        if layer.activation == "sine" and hidden[0] == "sine" and layer.w0 != hidden[1]:
            return False
        return True

    def _flush(self, run: list) -> None:
        if not run:
            return
        names = [n for layer in run for n in layer.names]
        start = self.layout.offset(names[0])
        offsets = [self.layout.offset(n) - start for n in names]
        numels = [math.prod(self.layout.shapes[n]) for n in names]
        assert all(o == sum(numels[:i]) for i, o in enumerate(offsets)), "segment parameters are not contiguous"
        sizes = [run[0].in_features] + [layer.out_features for layer in run]
        w_off = tuple(self.layout.offset(layer.weight) - start for layer in run)
        b_off = tuple(self.layout.offset(layer.bias) - start if layer.bias else -1 for layer in run)
        length = sum(numels)
        hidden = run[0].activation if len(run) > 1 else "none"
        out = run[-1]
        w0 = out.w0 if out.activation == "sine" else run[0].w0
        self._steps.append(_Segment(run, start, length, MLPSpec(tuple(sizes), w_off, b_off, length), hidden,
                                    out.activation, w0, names))

    # -- description ------------------------------------------------------------------------------
    @property
    def layout_in_features(self) -> int:
        """The first layer's in_features (in_channels for a 1x1 conv)."""
        return self._first.in_features

    @property
    def num_params(self) -> int:
        """P: the number of per-sample parameters (the width of the flat params)."""
        return self.layout.numel

    def shared_parameters(self) -> "OrderedDict[str, nn.Parameter]":
        """The shared parameters by their names in the original module ("0.weight", ...)."""
        return OrderedDict((n, self.shared[self._key(n)]) for n in self.shared_names)

    def default_init_variance(self) -> "OrderedDict[str, float]":
        """For every per-sample parameter, the variance of PyTorch's default initialisation of its layer:
        ``nn.Linear`` and ``nn.ConvNd`` draw weight and bias from ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``
        (``kaiming_uniform_(a=sqrt(5))`` for the weight), variance ``1 / (3 fan_in)``, with
        ``fan_in = in_features`` (for a 1x1 conv, ``in_channels * 1``)."""
        out = OrderedDict()
        for layer in self._layers:
            for name in layer.names:
                if name in self.layout:
                    out[name] = 1.0 / (3.0 * layer.in_features)
        return out

    def plan(self) -> list[str]:
        """How forward runs, one line per step (for reading; the exact wording may change)."""
        lines = []
        for step in self._steps:
            if isinstance(step, _Segment):
                idx = ", ".join(l.index for l in step.layers)
                lines.append(f"per-sample linear layers [{idx}] {step.spec.sizes}: fused batched_mlp where the backend "
                             f"has it (activation={step.activation!r}, output_activation={step.output_activation!r}), "
                             f"params[:, {step.start}:{step.start + step.length}]")
            elif isinstance(step, _Layer):
                op = "batched_conv1x1" if step.conv_dims else "batched_linear"
                extra = f", shared {sorted(step.shared)}" if step.shared else ""
                lines.append(f"{step.describe()}: {op} {step.in_features}->{step.out_features}, "
                             f"activation={step.activation!r}{extra}")
            else:
                lines.append(f"layer {step.index}: activation {step.activation!r}")
        return lines

    def extra_repr(self) -> str:
        lines = [f"{self.module_type}, num_params={self.num_params}, shared={list(self.shared_names)}, "
                 f"backend={self.backend!r}"]
        return "\n".join(lines + [f"  {line}" for line in self.plan()])

    # -- forward ----------------------------------------------------------------------------------
    def _check_params(self, params: Params, x: Tensor) -> tuple[Optional[Tensor], Mapping[str, Tensor], int]:
        """(flat or None, name -> (B, *shape) tensors, B), or a clear error."""
        P = self.layout.numel
        shared_note = (f" (the module's parameters minus the shared {list(self.shared_names)})"
                       if self.shared_names else "")
        if isinstance(params, Tensor):
            _validate.check_tensor("params", params, f"(B, {P})")
            if params.dim() != 2 or params.shape[1] != P:
                hint = ""
                if params.dim() == 1 and params.shape[0] == P:
                    hint = "; for one weight set used by every sample, pass params.expand(B, -1) (no copy)"
                elif params.dim() == 2 and params.shape[1] > P:
                    hint = (f"; if the extra {params.shape[1] - P} entries are padding (hyper-nn pads its output to "
                            f"a whole number of chunks), pass params[:, :{P}]")
                elif params.dim() > 2:
                    hint = "; flatten it to (B, P), or pass a dict like module.state_dict() with a leading batch dim"
                raise ValueError(f"params: expected flat per-sample parameters of shape (B, {P}){shared_note}, "
                                 f"got shape {tuple(params.shape)}{hint}")
            views = self.layout.unflatten(params)
            return params, views, params.shape[0]
        if isinstance(params, tuple) and len(params) == 2 and all(isinstance(p, Mapping) for p in params):
            raise TypeError("params: got a tuple of two dicts; torch.func.stack_module_state returns "
                            "(params, buffers): pass its first element")
        if isinstance(params, (list, tuple)):
            raise TypeError(f"params: expected a flat (B, {P}) tensor or a dict name -> (B, *shape) tensor, got a "
                            f"{type(params).__name__} (hypnettorch: use ret_format='flattened')")
        if not isinstance(params, Mapping):
            raise TypeError(f"params: expected a flat (B, {P}) tensor or a dict name -> (B, *shape) tensor, got "
                            f"{type(params).__name__}")
        missing = [n for n in self.layout.names if n not in params]
        extra = [n for n in params if n not in self.layout]
        if missing or extra:
            shared_extra = [n for n in extra if n in self.shared_names]
            note = (f"; {shared_extra} are shared (held by the module itself): leave them out of params"
                    if shared_extra else "")
            raise ValueError(f"params: keys do not match the per-sample parameters: missing {missing}, unexpected "
                             f"{extra} (expected exactly {self.layout.names}){note}")
        for name, shape in self.layout.shapes.items():
            t = params[name]
            if isinstance(t, Tensor) and tuple(t.shape) == shape and len(shape) >= 1:
                raise ValueError(f"params[{name!r}]: expected shape (B, {', '.join(map(str, shape))}), got "
                                 f"{tuple(t.shape)}: the batch dim is missing (HyperLight's HyperNet drops it when B "
                                 "is 1): add it with .unsqueeze(0)")
        batch = self.layout.check_dict(params)
        for name in self.layout.names:
            _validate.check_tensor(f"params[{name!r}]", params[name], "(B, *shape)")
        return None, params, batch

    def _check_x(self, x: Tensor, batch: int, params_dtype: torch.dtype, params_device: torch.device,
                 what: str) -> None:
        first = self._first
        if first.conv_dims:
            d = first.conv_dims
            hint = f"(B, C_in, {', '.join('LHW'[-d:] if d < 3 else 'DHW')}) or (B, N, C_in, ...)"
            _validate.check_tensor("x", x, hint)
            if x.dim() not in (d + 2, d + 3):
                raise ValueError(f"x: expected shape {hint} for {first.describe()}, got {x.dim()}-D shape "
                                 f"{tuple(x.shape)}")
            channels = x.shape[1] if x.dim() == d + 2 else x.shape[2]
            if channels != first.in_features:
                raise ValueError(f"x: expected {first.in_features} channels (in_channels of {first.describe()}), got "
                                 f"{channels} in shape {tuple(x.shape)}")
        else:
            hint = f"(B, {first.in_features}) or (B, N, {first.in_features})"
            _validate.check_tensor("x", x, hint)
            if x.dim() < 2:
                raise ValueError(f"x: expected shape {hint}, got {x.dim()}-D shape {tuple(x.shape)}")
            if x.shape[-1] != first.in_features:
                raise ValueError(f"x: expected in_features (last dim) {first.in_features} ({first.describe()}), "
                                 f"got {x.shape[-1]} in shape {tuple(x.shape)}")
        if x.shape[0] != batch:
            raise ValueError(f"x: expected batch size (dim 0) {batch} (the batch of {what}), got {x.shape[0]}")
        if x.dtype != params_dtype:
            raise TypeError(f"x: expected dtype {params_dtype} (the dtype of {what}), got {x.dtype}")
        if x.device != params_device:
            raise ValueError(f"x: expected device {params_device} (the device of {what}), got {x.device}")
        for name in self.shared_names:
            p = self.shared[self._key(name)]
            if p.dtype != x.dtype:
                raise TypeError(f"shared parameter {name!r} is {p.dtype} but x is {x.dtype}: convert the module "
                                "with .to(dtype)")
            if p.device != x.device:
                raise ValueError(f"shared parameter {name!r} is on {p.device} but x is on {x.device}: move the "
                                 "module with .to(device)")

    def forward(self, x: Tensor, params: Params) -> Tensor:
        """Run every sample's copy of the module on its input.

        Args:
            x: what the module takes, with a leading batch dim: ``(B, in)`` or ``(B, *, in)`` for a leading
                ``nn.Linear``; ``(B, C_in, *spatial)`` (or ``(B, N, C_in, *spatial)``) for a leading 1x1 conv.
                ``x.expand(B, ...)`` of one input shared by every sample is read in place.
            params: the per-sample parameters: a flat ``(B, P)`` tensor laid out like ``self.layout`` (read
                in place), or a dict keyed like ``module.state_dict()`` (per-sample names only) of
                ``(B, *shape)`` tensors, e.g. the first element of ``torch.func.stack_module_state(models)``.

        Returns:
            what ``vmap(functional_call(module, ...))`` returns on the same parameters.
        """
        flat, views, batch = self._check_params(params, x)
        if flat is not None:
            self._check_x(x, batch, flat.dtype, flat.device, "params")
        else:
            name = self.layout.names[0]
            first = views[name]
            for other in self.layout.names[1:]:
                _validate.check_same_dtype_device([(f"params[{name!r}]", first), (f"params[{other!r}]", views[other])])
            self._check_x(x, batch, first.dtype, first.device, f"params[{name!r}]")
        h = x
        for step in self._steps:
            if isinstance(step, _Segment):
                h = self._run_segment(step, h, flat, views, batch)
            elif isinstance(step, _Layer):
                h = self._run_layer(step, h, views, batch)
            else:
                h = get_activation(step.activation).forward(h, step.w0)
        return h

    def forward_from_head(self, x: Tensor, h: Tensor, head_weight: Tensor, head_bias: Optional[Tensor],
                          backend: str) -> Tensor:
        """``forward(x, F.linear(h, head_weight, head_bias))`` without materialising the per-sample parameters:
        each layer runs through :func:`hyperkernels.hyper_linear` on its rows of the head (``backend`` is the
        hyper_linear backend). A layer with a shared parameter generates just its own per-sample rows."""
        batch = h.shape[0]
        self._check_x(x, batch, head_weight.dtype, head_weight.device, "the hypernetwork's parameters")
        layers = [l for step in self._steps for l in (step.layers if isinstance(step, _Segment) else [step])]
        for step in layers:
            if isinstance(step, _Activation):
                x = get_activation(step.activation).forward(x, step.w0)
            elif step.shared or (step.conv_dims and x.dim() != step.conv_dims + 2):
                views = {name: self._generate_rows(name, h, head_weight, head_bias) for name in step.names
                         if name not in step.shared}
                x = self._run_layer(step, x, views, batch)
            else:
                x = self._hyper_layer(step, x, h, head_weight, head_bias, backend)
        return x

    def _rows(self, name: str) -> slice:
        start = self.layout.offset(name)
        return slice(start, start + math.prod(self.layout.shapes[name]))

    def _generate_rows(self, name: str, h: Tensor, head_weight: Tensor, head_bias: Optional[Tensor]) -> Tensor:
        rows = self._rows(name)
        piece = torch.nn.functional.linear(h, head_weight[rows], None if head_bias is None else head_bias[rows])
        return piece.view(h.shape[0], *self.layout.shapes[name])

    def _hyper_layer(self, layer: _Layer, x: Tensor, h: Tensor, head_weight: Tensor, head_bias: Optional[Tensor],
                     backend: str) -> Tensor:
        # A layer's weight and bias are adjacent in the layout (named_parameters order): one slice of head rows.
        rows = slice(self._rows(layer.weight).start, self._rows(layer.bias or layer.weight).stop)
        kw = dict(out_features=layer.out_features, bias=layer.bias is not None, activation=layer.activation,
                  w0=layer.w0, backend=backend)
        hb = None if head_bias is None else head_bias[rows]
        if layer.conv_dims:  # (B, C, *spatial) -> points-major (B, S, C), a view; and back
            y = hyper_linear(x.flatten(2).transpose(1, 2), h, head_weight[rows], hb, **kw)
            return y.transpose(1, 2).unflatten(2, x.shape[2:])
        x3 = x if x.dim() in (2, 3) else x.reshape(x.shape[0], -1, x.shape[-1])
        y = hyper_linear(x3, h, head_weight[rows], hb, **kw)
        return y if x.dim() in (2, 3) else y.reshape(*x.shape[:-1], layer.out_features)

    def _weight_bias(self, layer: _Layer, views: Mapping[str, Tensor], batch: int) -> tuple[Tensor, Optional[Tensor]]:
        def get(name):
            if name in layer.shared:
                p = self.shared[self._key(name)]
                return p.unsqueeze(0).expand(batch, *p.shape)  # batch stride 0: one copy for every sample
            return views[name]
        weight = get(layer.weight)
        weight = weight.reshape(batch, layer.out_features, layer.in_features)  # (B, out, in[, 1...]): a view
        return weight, (get(layer.bias) if layer.bias else None)

    def _run_layer(self, layer: _Layer, h: Tensor, views: Mapping[str, Tensor], batch: int) -> Tensor:
        weight, bias = self._weight_bias(layer, views, batch)
        kw = dict(activation=layer.activation, w0=layer.w0, backend=self.backend)
        if layer.conv_dims:
            d = layer.conv_dims
            if h.dim() == d + 2:  # each sample's input is (C, *spatial)
                return batched_conv1x1(h, weight, bias, **kw)
            # each sample's input is a batch (N, C, *spatial): channels first, N becomes one more spatial dim
            if h.dim() != d + 3:
                raise ValueError(f"{layer.describe()}: expected its input to be (B, C, *spatial) or "
                                 f"(B, N, C, *spatial) "
                                 f"with {d} spatial dims, got shape {tuple(h.shape)}")
            n, spatial = h.shape[1], h.shape[3:]
            y = batched_conv1x1(h.movedim(1, 2).flatten(2), weight, bias, **kw)
            return y.unflatten(2, (n, *spatial)).movedim(2, 1)
        if h.dim() == 2 or h.dim() == 3:
            return batched_linear(h, weight, bias, **kw)
        y = batched_linear(h.reshape(batch, -1, h.shape[-1]), weight, bias, **kw)
        return y.reshape(*h.shape[:-1], layer.out_features)

    def _run_segment(self, seg: _Segment, h: Tensor, flat: Optional[Tensor], views: Mapping[str, Tensor],
                     batch: int) -> Tensor:
        first, last = seg.layers[0], seg.layers[-1]
        n = math.prod(h.shape[1:-1]) if h.dim() > 2 else 1
        dims = dict(device=h.device, dtype=h.dtype, batch=batch, n=n, k=first.in_features, m=last.out_features)
        linear_impl = resolve_backend(self.backend, op="batched_linear", **dims)
        if not implements(linear_impl, "batched_mlp"):
            for layer in seg.layers:
                h = self._run_layer(layer, h, views, batch)
            return h
        if flat is not None:
            whole = seg.start == 0 and seg.length == flat.shape[1]
            seg_flat = flat if whole else flat.narrow(1, seg.start, seg.length)  # a view: no copy
        else:  # dict params: the segment's pieces in one (B, length) tensor (one copy, like batched_mlp does)
            seg_flat = torch.cat([views[name].reshape(batch, -1) for name in seg.names], dim=1)
        x3 = h.reshape(batch, -1, h.shape[-1]) if h.dim() != 3 else h
        act, out_act = get_activation(seg.activation), get_activation(seg.output_activation)
        y = run_mlp(x3, seg_flat, seg.spec, act, out_act, seg.w0, self.backend)
        if h.dim() == 3:
            return y
        return y.reshape(*h.shape[:-1], last.out_features)


def batched(module: nn.Module, shared: Sequence[str] = (), *, backend: str = "auto") -> BatchedSequential:
    r"""The per-sample version of ``module``: one copy of it per sample, each with its own weights.

    Args:
        module: an ``nn.Linear``, a 1x1 ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` (stride 1, no padding,
            groups 1), or an ``nn.Sequential`` (nested ones too) of these and the activations ``nn.ReLU``,
            ``nn.GELU()`` (exact form), ``nn.SiLU``, ``nn.Tanh``, ``nn.Sigmoid``, ``nn.Identity`` and
            :class:`hyperkernels.nn.Sine`. Anything else is a ``ValueError`` naming the layer and its index.
            ``module`` is only a template: the returned module keeps its structure, not its parameters.
        shared: names of parameters (as in ``module.state_dict()``) that every sample shares. They become
            trainable parameters of the returned module, initialised from ``module``'s values and handed to
            every sample as an ``expand`` (never copied ``B`` times); their gradient is the sum over samples.
        backend: as in :func:`hyperkernels.batched_linear`.

    Returns:
        a :class:`BatchedSequential` ``m``: ``m(x, params)`` equals
        ``vmap(lambda p, xb: functional_call(module, p, (xb,)))(params, x)`` on the same parameters.
        ``m.layout`` is the :class:`~hyperkernels.ParamLayout` of the per-sample parameters: the order and
        flattening of ``parameters_to_vector`` of the module's non-shared parameters; ``m.num_params`` its size.

    Example::

        >>> net = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 3))
        >>> per_sample = batched(net)
        >>> per_sample(torch.randn(8, 100, 2), torch.randn(8, per_sample.num_params)).shape
        torch.Size([8, 100, 3])
    """
    return BatchedSequential(module, shared, backend)
