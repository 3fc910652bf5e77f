"""``batched(module)``: the per-sample version of any module that ``torch.func.vmap`` runs, faster.

The returned module computes what ``vmap(functional_call(module, ...))`` computes on the same parameters:

* The module is read once, at construction, into a plan (``_plan.py``). In an ``nn.Sequential``, runs of
  ``nn.Linear`` layers become one fused ``batched_mlp`` op, other linear layers and 1x1 convs run on
  ``batched_linear`` / ``batched_conv1x1`` with their activation fused (``_kernels.py``), parameter-free
  elementwise layers act on the whole batch, and every other layer runs per sample through ``torch.func.vmap``
  (``_per_sample.py``). A module with its own ``forward`` runs per sample under vmap, with its ``nn.Linear`` /
  1x1-conv / RNN-cell submodules on the kernels. ``print(net)`` shows the plan.
* Flat ``(B, P)`` params are split once into what each step reads (one ``split``: its backward writes the
  ``(B, P)`` gradient once, where a view per parameter would each write a zero-filled ``(B, P)`` buffer); fused
  runs read their range of it in place. Dict params are read as given, never concatenated
  (:meth:`BatchedSequential.forward_views`).
* Shared parameters (``shared=``) are trainable ``nn.Parameter`` s of the returned module, handed to every
  sample without a copy (batch stride 0, or unbatched in vmap); their gradient is the sum over samples. The
  module's buffers (e.g. an eval-mode BatchNorm's running statistics) are buffers of the returned module, shared
  by every sample.

What cannot run per sample is refused with the layer's name (``_batched_checks.py``).
"""
from __future__ import annotations

import math
import traceback
from collections import OrderedDict
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validate import check_backend
from ..activations import get_activation
from ..functional import hyper_linear
from ..layout import ParamLayout
from ._batched_checks import check_inputs, check_module, check_params, check_state
from ._init import default_init_stats
from ._kernels import (flat_buffer_range, fused_mlp_worth_it, linear_is_composition, run_fused_mlp,
                       run_kernel_layer)
from ._per_sample import escaping_kinds, kernel_kinds, kernel_layer_names, run_per_sample, swap_kernel_layers
from ._plan import (Activation, Elementwise, FusedRun, Layer, PerSample, chunks, compile_steps, fuse_runs,
                    kernel_layer, plain_sequential, private_copy, walk, whole_module_step)

__all__ = ["batched", "BatchedSequential"]

Params = Union[Tensor, Mapping[str, Tensor]]


class BatchedSequential(nn.Module):
    """The per-sample version of a module, built by :func:`batched`: see there."""

    def __init__(self, module: nn.Module, shared: Sequence[str] = (), backend: str = "auto"):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module: expected an nn.Module, got {type(module).__name__}")
        shared = (shared,) if isinstance(shared, str) else tuple(shared)
        self.backend = check_backend(backend)
        self.module_type = type(module).__name__
        check_module(module, list(walk(module)) if plain_sequential(module) else None)

        template, canonical, buffer_names, params, buffers = private_copy(module)
        self._type_names = {n: type(m).__name__ for n, m in template.named_modules()}  # before the kernel swap
        if not params:
            hint = (" (a hypnettorch main network built with no_weights=True: batched() the equivalent "
                    "nn.Sequential, whose parameters follow its param_shapes)" if hasattr(module, "param_shapes")
                    else ": was it already converted in place by another library?")
            raise ValueError(f"module: {type(module).__name__} has no parameters{hint}; batched() needs at least one "
                             "parameter generated per sample")

        # Shared parameters: trainable parameters of this module, initialised from the template's values. Any name
        # of a tied tensor names it.
        aliases = {n: canonical[id(p)] for n, p in template.named_parameters(remove_duplicate=False)}
        unknown = [n for n in shared if n not in aliases]
        if unknown:
            raise ValueError(f"shared: {unknown} are not parameters of the module; its parameters are {list(params)}")
        if len(set(shared)) != len(shared):
            raise ValueError(f"shared: names repeat in {list(shared)}")
        shared_set = {aliases[n] for n in shared}
        self.shared_names = tuple(n for n in params if n in shared_set)  # in module order
        self.shared = nn.ParameterDict(OrderedDict(  # an OrderedDict: a plain dict's keys would be sorted
            (self._key(n), nn.Parameter(params[n].detach().clone())) for n in self.shared_names))
        self.template_buffers = nn.Module()  # the module's buffers, by their names in it (see buffer_names)
        self.buffer_names = tuple(buffers)
        self._names_by_key = {self._key(n): n for n in (*buffers, *params)}  # for messages
        persistent = {n for n, _ in module.state_dict(keep_vars=True).items()}
        for name, b in buffers.items():
            if hasattr(self.template_buffers, self._key(name)):
                raise ValueError(f"module: buffer names {name!r} and another one both map to {self._key(name)!r}")
            self.template_buffers.register_buffer(self._key(name), b.detach().clone(), persistent=name in persistent)

        # The per-sample layout: the module's parameters minus the shared ones, in module order.
        per_sample = OrderedDict((n, tuple(p.shape)) for n, p in params.items() if n not in shared_set)
        if not per_sample:
            raise ValueError("module: no per-sample parameters left (every parameter is in shared=); batched() needs "
                             "at least one parameter generated per sample")
        self.layout = ParamLayout(per_sample)
        self._init_stats = default_init_stats(module, params)

        # The plan.
        if plain_sequential(template):
            steps = compile_steps(list(walk(template)), canonical, buffer_names)
        else:
            layer = kernel_layer("0", template, canonical)
            steps = [layer] if layer is not None else [whole_module_step(template, canonical, buffer_names)]
        swap_kernel_layers(template)
        self.__dict__["_template"] = template  # not a submodule: its placeholders are no state of this module
        for step in steps:
            if isinstance(step, Layer):
                step.shared = frozenset(n for n in step.names if n in shared_set)
            elif isinstance(step, PerSample):
                step.kernel_layers, step.kernel_kinds = kernel_layer_names(step.module), kernel_kinds(step.module)
        _check_layer_sizes(steps)
        # A Sequential with layers that run per sample through vmap also runs as a whole under one vmap, where its
        # linear layers would only run PyTorch's composition: there, kernel layers between per-sample layers
        # would cost every per-sample stretch a vmap call of its own and gain nothing over vmap's rule for
        # F.linear (measured on CPU: slower forward, the same forward+backward, against one vmap fed by the same
        # split of the flat params). Where linear layers have kernels, the steps run one by one.
        self._whole = (whole_module_step(template, canonical, buffer_names)
                       if len(steps) > 1 and any(isinstance(s, PerSample) for s in steps) else None)
        if self._whole is not None:
            self._whole.kernel_layers, self._whole.kernel_kinds = kernel_layer_names(template), kernel_kinds(template)
        self._steps = fuse_runs(steps, self.layout)
        self._chunks = chunks(self._steps, self.layout)
        self._several_inputs = len(self._steps) == 1 and isinstance(self._steps[0], PerSample)
        self._norms = [(n, m) for n, m in template.named_modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
        run_names = {n for s in self._steps if isinstance(s, FusedRun) for n in s.names}
        # names inside a fused run that another step reads too (tied weights): handed out as views as well
        self._tied_in_runs = run_names & {c for s in self._steps if not isinstance(s, FusedRun)
                                          for c in _reads(s)}

    # -- description --------------------------------------------------------------------------------
    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "_")  # ParameterDict keys and buffer names cannot hold dots

    @property
    def layout_in_features(self) -> int:
        """in_features (in_channels) of the first kernel layer, 1 if there is none: with ``x.shape``, the number
        of points each sample's weights see (``HyperNetwork`` chooses its head's path by it)."""
        layer = self._first_kernel_layer(anywhere=True)
        return layer.in_features if layer is not None else 1

    @property
    def num_params(self) -> int:
        """P: the number of per-sample parameters (the width of the flat params)."""
        return self.layout.numel

    def shared_parameters(self) -> "OrderedDict[str, nn.Parameter]":
        """The shared parameters by their names in the original module ("0.weight", ...)."""
        return OrderedDict((n, self.shared[self._key(n)]) for n in self.shared_names)

    def default_init_variance(self) -> "OrderedDict[str, float]":
        """For every per-sample parameter, the variance of its layer's default initialisation: ``nn.Linear`` and
        ``nn.ConvNd`` draw weight and bias from ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, variance ``1 / (3 fan_in)``
        (``fan_in = in_features``, or ``in_channels / groups * prod(kernel_size)``); the RNN cells likewise with
        ``fan_in = hidden_size``; any other parameter (a norm's weight, PReLU's slope...) the variance of the
        template's own values. :meth:`default_init_mean` gives the means (0 for the layers named above)."""
        return OrderedDict((n, self._init_stats[n][1]) for n in self.layout.names)

    def default_init_mean(self) -> "OrderedDict[str, float]":
        """For every per-sample parameter, the mean of its default initialisation (see
        :meth:`default_init_variance`): 0 for linear layers, convs and RNN cells, e.g. 1 for a norm's weight."""
        return OrderedDict((n, self._init_stats[n][0]) for n in self.layout.names)

    def plan(self) -> list[str]:
        """How forward runs, one line per step (for reading; the exact wording may change)."""
        lines = [_describe(step, self) for step in self._steps]
        if self._whole is not None:
            lines = ["where the backend has kernels for linear layers (not PyTorch's composition):"] + \
                    [f"  {line}" for line in lines] + \
                    ["elsewhere (PyTorch's composition, e.g. on CPU): " + _describe(self._whole, self)]
        return lines

    def extra_repr(self) -> str:
        lines = [f"{self.module_type}, num_params={self.num_params}, shared={list(self.shared_names)}, "
                 f"backend={self.backend!r}"]
        return "\n".join(lines + [f"  {line}" for line in self.plan()])

    def train(self, mode: bool = True) -> "BatchedSequential":
        super().train(mode)
        self._template.train(mode)  # Dropout and the norms read their own flag
        return self

    # -- forward ----------------------------------------------------------------------------------
    def _first_kernel_layer(self, anywhere: bool = False) -> Optional[Layer]:
        for step in self._steps:
            if isinstance(step, FusedRun):
                return step.layers[0]
            if isinstance(step, Layer):
                return step
            if not anywhere and not isinstance(step, (Activation, Elementwise)):
                return None
        return None

    def check_x(self, x, batch: int, dtype: torch.dtype, device: torch.device, what: str) -> None:
        """A clear error unless ``x`` is an input ``forward`` can run with parameters of this batch size, dtype and
        device (``what`` names where they come from, for the message), and the shared state matches them."""
        check_inputs(x, batch, dtype, device, what, self._first_kernel_layer(), self._several_inputs)
        check_state(self._norms, self.shared, self.template_buffers._buffers, dtype, device, self._names_by_key)

    def forward(self, x: Union[Tensor, tuple], params: Params) -> Tensor:
        """Run every sample's copy of the module on its input.

        Args:
            x: what the module takes, with a leading batch dim (``x.expand(B, ...)`` of one input shared by every
                sample is read in place). A module with its own forward taking several inputs gets a tuple of them
                (each with a leading batch dim; ``None`` passes through), e.g. ``(x_t, h)`` for an ``nn.GRUCell``.
            params: the per-sample parameters: a flat ``(B, P)`` tensor laid out like ``self.layout`` (read in
                place), or a dict keyed like ``module.state_dict()`` (per-sample names only) of ``(B, *shape)``
                tensors, e.g. the first element of ``torch.func.stack_module_state(models)``, read as given (see
                :meth:`forward_views`).

        Returns:
            what ``vmap(functional_call(module, ...), randomness="different")`` returns on the same parameters.
        """
        flat, given, batch = check_params(params, self.layout, self.shared_names)
        if flat is None:
            return self._forward_tensors(x, given, batch)
        self.check_x(x, batch, flat.dtype, flat.device, "params")
        composition = linear_is_composition(self.backend, flat)
        if self._whole is not None and composition:
            return self._run_per_sample(self._whole, x, self._views(flat, self.layout.names), composition)
        tensors, pieces = self._hand_out(flat)
        h = x
        for i, step in enumerate(self._steps):
            h = self._run_step(i, step, h, tensors, pieces, composition)
        return h

    def split_params(self, params: Tensor) -> "OrderedDict[str, Tensor]":
        """The flat ``(B, P)`` params as ``{name: (B, *shape) view}``, cut with one ``split`` (its backward writes
        the ``(B, P)`` gradient once; a view per parameter would each write a zero-filled ``(B, P)`` buffer).
        Cut once for a loop of :meth:`forward_views` calls, the views collect all their gradients."""
        flat, _, _ = check_params(params, self.layout, self.shared_names)
        if flat is None:
            raise TypeError(f"params: expected a flat (B, {self.num_params}) tensor, got a {type(params).__name__}")
        return OrderedDict(self._views(flat, self.layout.names))

    def forward_views(self, x: Union[Tensor, tuple], params: Mapping[str, Tensor]) -> Tensor:
        """``forward(x, params)`` for one ``(B, *shape)`` tensor per name (e.g. from :meth:`split_params`), read as
        given: nothing is copied or concatenated.

        Where the linear layers run as PyTorch's composition (the torch backend, e.g. on CPU), runs of linear
        layers run layer by layer on these tensors, so each layer's gradient lands in its own tensor's buffer: a
        solver loop calling the target many times on views cut once from the flat params sums its calls'
        gradients per layer and reaches the ``(B, P)`` gradient once per backward, where the fused op on the flat
        params would write, and autograd sum, one ``(B, P)`` gradient per call. Where a kernel backend runs the
        fused op (Triton), a run whose tensors are views of one flat buffer in the layout's order reads that
        buffer's range in place (its gradient reaches that buffer directly); other tensors run layer by layer."""
        if not isinstance(params, Mapping):
            raise TypeError(f"params: expected a dict name -> (B, *shape) tensor, got {type(params).__name__}")
        _, given, batch = check_params(params, self.layout, self.shared_names)
        return self._forward_tensors(x, given, batch)

    def fused_mlp_weights(self, x: Union[Tensor, tuple]) -> frozenset:
        """The names of the per-sample weights that ``forward(x, flat params)`` runs inside a fused ``batched_mlp``
        op (runs of ``nn.Linear`` layers, where the backend runs that op at the points per sample of ``x``); the
        other linear layers run one by one. For cost models: that op's backward writes the run's gradient once."""
        like = x if isinstance(x, Tensor) else next((t for t in x if isinstance(t, Tensor)), None)
        if like is None or (self._whole is not None and linear_is_composition(self.backend, like)):
            return frozenset()  # the whole module runs per sample (vmap), its linear layers as the composition
        return frozenset(layer.weight for step in self._steps if isinstance(step, FusedRun)
                         and fused_mlp_worth_it(self.backend, like, step.spec.sizes) for layer in step.layers)

    def _forward_tensors(self, x, given: Mapping[str, Tensor], batch: int) -> Tensor:
        first = given[self.layout.names[0]]
        self.check_x(x, batch, first.dtype, first.device, f"params[{self.layout.names[0]!r}]")
        composition = linear_is_composition(self.backend, first)
        if self._whole is not None and composition:
            return self._run_per_sample(self._whole, x, given, composition)
        h = x
        for i, step in enumerate(self._steps):
            h = self._run_step(i, step, h, given, {}, composition)
        return h

    def _hand_out(self, flat: Tensor):
        """(name -> (B, *shape) view, step index -> (B, length) range of a fused run) of the flat params."""
        parts = [flat] if len(self._chunks) == 1 else flat.split([c.length for c in self._chunks], dim=1)
        tensors, pieces = {}, {}
        for chunk, part in zip(self._chunks, parts):
            if chunk.run is not None:
                pieces[chunk.run] = part
                if self._tied_in_runs.intersection(self._steps[chunk.run].names):
                    tensors.update(self._views(part, self._steps[chunk.run].names))
            else:
                tensors.update(self._views(part, chunk.names))
        return tensors, pieces

    def _views(self, part: Tensor, names: list) -> dict:
        shapes = self.layout.shapes
        sizes = [math.prod(shapes[n]) for n in names]
        splits = [part] if len(names) == 1 else part.split(sizes, dim=1)
        return {n: s.view(part.shape[0], *shapes[n]) for n, s in zip(names, splits)}

    def _param(self, name: str, tensors: Mapping[str, Tensor], batch: int) -> Tensor:
        if name in self.shared_names:
            p = self.shared[self._key(name)]
            return p.unsqueeze(0).expand(batch, *p.shape)  # batch stride 0: one copy for every sample
        return tensors[name]

    def _run_layer(self, layer: Layer, h: Tensor, tensors: Mapping[str, Tensor]) -> Tensor:
        batch = h.shape[0]
        weight = self._param(layer.weight, tensors, batch)
        bias = self._param(layer.bias, tensors, batch) if layer.bias else None
        return run_kernel_layer(h, weight, bias, layer.conv_dims, layer.activation, layer.w0, self.backend)

    def _run_step(self, i: int, step, h, tensors: Mapping[str, Tensor], pieces: Mapping[int, Tensor],
                  composition: bool):
        if isinstance(step, Layer):
            return self._run_layer(step, h, tensors)
        if isinstance(step, FusedRun):
            if fused_mlp_worth_it(self.backend, h, step.spec.sizes):
                piece = pieces.get(i)
                if piece is None and not composition:
                    # Per-layer tensors feed the op only where they already are views of one flat range in the
                    # run's layout. Others run layer by layer, not concatenated: the copy would read and write
                    # every parameter of the run on every call, as many bytes again as the fused kernel reads,
                    # and at a hypernetwork target's few points per sample the weights are most of its traffic.
                    piece = flat_buffer_range([tensors[n] for n in step.names],
                                              [self.layout.offset(n) - step.start for n in step.names], step.length)
                if piece is not None:
                    return run_fused_mlp(h, piece, step.spec, step.activation, step.output_activation, step.w0,
                                         self.backend)
            views = tensors if all(n in tensors for n in step.names) else self._views(pieces[i], step.names)
            for layer in step.layers:
                h = self._run_layer(layer, h, views)
            return h
        if isinstance(step, Activation):
            return get_activation(step.activation).forward(h, step.w0)
        if isinstance(step, Elementwise):
            return step.module(h)
        return self._run_per_sample(step, h, tensors, composition)

    def _run_per_sample(self, step: PerSample, h, tensors: Mapping[str, Tensor], composition: bool):
        per_sample, unbatched = {}, {}
        for name, c in step.params:
            if c in self.shared_names:
                unbatched[name] = self.shared[self._key(c)]
            else:
                per_sample[name] = tensors[c]
        for name, c in step.buffers:
            unbatched[name] = self.template_buffers._buffers[self._key(c)]
        inputs = h if isinstance(h, tuple) else (h,)
        kinds = escaping_kinds(step.kernel_kinds, composition) if per_sample else frozenset()
        try:
            return run_per_sample(step.module, per_sample, unbatched, inputs, self.backend, kinds)
        except Exception as exc:
            if hasattr(exc, "add_note"):
                where = self._failing_layer(exc) or step.describe()
                exc.add_note(f"(in batched(): while running {where} per sample through torch.func.vmap)")
            raise

    def _failing_layer(self, exc: BaseException) -> Optional[str]:
        """The innermost layer of the module whose forward is in the traceback, e.g. "layer 3 (GroupNorm)"."""
        names = {id(m): (n, self._type_names.get(n, type(m).__name__)) for n, m in self._template.named_modules()}
        found = None
        for frame, _ in traceback.walk_tb(exc.__traceback__):
            owner = frame.f_locals.get("self")
            if id(owner) in names and names[id(owner)][0]:
                found = names[id(owner)]
        return None if found is None else f"layer {found[0]} ({found[1]})"

    def forward_from_head(self, x: Tensor, h: Tensor, head_weight: Tensor, head_bias: Optional[Tensor],
                          backend: str) -> Tensor:
        """``forward(x, F.linear(h, head_weight, head_bias))`` without materialising the per-sample weights of the
        kernel layers: each runs through :func:`hyperkernels.hyper_linear` on its rows of the head (``backend`` is
        the hyper_linear backend). A layer with a shared parameter, and every step that runs per sample through
        vmap, generates just its own per-sample parameters."""
        batch = h.shape[0]
        self.check_x(x, batch, head_weight.dtype, head_weight.device, "the hypernetwork's parameters")
        steps = [l for s in self._steps for l in (s.layers if isinstance(s, FusedRun) else [s])]
        composition = linear_is_composition(self.backend, h)
        for step in steps:
            if isinstance(step, Layer) and not step.shared and not (step.conv_dims and x.dim() != step.conv_dims + 2):
                x = self._hyper_layer(step, x, h, head_weight, head_bias, backend)
            elif isinstance(step, (Layer, PerSample)):
                names = [c for c in _reads(step) if c in self.layout]
                x = self._run_step(-1, step, x, self._generate(names, h, head_weight, head_bias), {}, composition)
            else:
                x = self._run_step(-1, step, x, {}, {}, composition)
        return x

    def _generate(self, names: list, h: Tensor, head_weight: Tensor, head_bias: Optional[Tensor]) -> dict:
        """The per-sample parameters ``names`` from the head: one GEMM over the rows that span them."""
        if not names:
            return {}
        start = min(self.layout.offset(n) for n in names)
        stop = max(self.layout.offset(n) + math.prod(self.layout.shapes[n]) for n in names)
        rows = F.linear(h, head_weight[start:stop], None if head_bias is None else head_bias[start:stop])
        return {n: rows.narrow(1, self.layout.offset(n) - start, math.prod(self.layout.shapes[n]))
                .view(h.shape[0], *self.layout.shapes[n]) for n in names}

    def _hyper_layer(self, layer: Layer, x: Tensor, h: Tensor, head_weight: Tensor, head_bias: Optional[Tensor],
                     backend: str) -> Tensor:
        # A layer's weight and bias are adjacent in the layout (named_parameters order): one slice of head rows.
        start = self.layout.offset(layer.weight)
        end = self.layout.offset(layer.bias or layer.weight) + math.prod(self.layout.shapes[layer.bias or layer.weight])
        kw = dict(out_features=layer.out_features, bias=layer.bias is not None, activation=layer.activation,
                  w0=layer.w0, backend=backend)
        hb = None if head_bias is None else head_bias[start:end]
        if layer.conv_dims:  # (B, C, *spatial) -> points-major (B, S, C), a view; and back
            y = hyper_linear(x.flatten(2).transpose(1, 2), h, head_weight[start:end], hb, **kw)
            return y.transpose(1, 2).unflatten(2, x.shape[2:])
        x3 = x if x.dim() in (2, 3) else x.reshape(x.shape[0], -1, x.shape[-1])
        y = hyper_linear(x3, h, head_weight[start:end], hb, **kw)
        return y if x.dim() in (2, 3) else y.reshape(*x.shape[:-1], layer.out_features)


def _reads(step) -> list:
    """The canonical names of the parameters a step reads."""
    if isinstance(step, (Layer, FusedRun)):
        return list(step.names)
    if isinstance(step, PerSample):
        return [c for _, c in step.params]
    return []


def _check_layer_sizes(steps: list) -> None:
    layers = [s for s in steps if isinstance(s, (Layer, PerSample))]
    for prev, layer in zip(layers, layers[1:]):
        if (isinstance(prev, Layer) and isinstance(layer, Layer) and bool(prev.conv_dims) == bool(layer.conv_dims)
                and layer.in_features != prev.out_features):
            raise ValueError(f"module: {layer.describe()} takes {layer.in_features} inputs but {prev.describe()} "
                             f"gives {prev.out_features}")


def _describe(step, net: BatchedSequential) -> str:
    if isinstance(step, FusedRun):
        idx = ", ".join(l.index for l in step.layers)
        return (f"layers [{idx}] Linear {'->'.join(map(str, step.spec.sizes))}: kernels, one fused batched_mlp where "
                f"the backend has it (activation={step.activation!r}, output_activation={step.output_activation!r}), "
                f"params[:, {step.start}:{step.start + step.length}]")
    if isinstance(step, Layer):
        op = "batched_conv1x1" if step.conv_dims else "batched_linear"
        if step.weight in step.shared:
            op = f"shared weight: one dense {'conv' if step.conv_dims else 'F.linear'} for every sample"
        extra = f", shared {sorted(step.shared)}" if step.shared else ""
        return (f"{step.describe()} {step.in_features}->{step.out_features}: kernels, {op}, "
                f"activation={step.activation!r}{extra}")
    if isinstance(step, Activation):
        return f"layer {step.index}: activation {step.activation!r} on the whole batch"
    if isinstance(step, Elementwise):
        return f"layer {step.index} ({type(step.module).__name__}): elementwise, on the whole batch"
    what = step.describe() if step.indices else f"the module ({net.module_type})"
    kernels = (f"; on the kernels (1x1 convs always, linear maps where the backend is not PyTorch's composition): "
               f"{', '.join(step.kernel_layers)}" if step.kernel_layers else "; nothing on the kernels")
    return f"{what}: per sample through torch.func.vmap{kernels}"


def batched(module: nn.Module, shared: Sequence[str] = (), *, backend: str = "auto") -> BatchedSequential:
    r"""The per-sample version of ``module``: one copy of it per sample, each with its own weights.

    Args:
        module: any ``nn.Module`` that ``torch.func.vmap(functional_call(module, ...))`` runs per sample. Runs of
            ``nn.Linear`` in an ``nn.Sequential`` run as one fused op, other ``nn.Linear`` layers and 1x1 convs
            (stride 1, no padding, groups 1) on hyperkernels' ops with their activation fused, parameter-free
            elementwise layers on the whole batch, and everything else per sample through ``torch.func.vmap``: a
            module with its own ``forward`` runs it per sample with its ``nn.Linear``, 1x1-conv and RNN-cell
            submodules on the kernels. ``module`` is only a template: the returned module keeps its structure and
            buffers, not its parameters. Refused with a ``ValueError`` naming the layer: lazy modules, the grouped-
            conv "parallel MLP" (describe one sample's network instead), parameters that share memory without
            being one tensor; at call time, a norm layer in training mode that tracks running statistics.
        shared: names of parameters (as in ``module.state_dict()``) that every sample shares. They become
            trainable parameters of the returned module, initialised from ``module``'s values and handed to
            every sample without a copy; their gradient is the sum over samples.
        backend: as in :func:`hyperkernels.batched_linear`.

    Returns:
        a :class:`BatchedSequential` ``m``: ``m(x, params)`` equals ``vmap(lambda p, xb: functional_call(module, p,
        (xb,)), randomness="different")(params, x)`` on the same parameters. ``m.layout`` is the
        :class:`~hyperkernels.ParamLayout` of the per-sample parameters: the order and flattening of
        ``parameters_to_vector`` of the module's non-shared parameters; ``m.num_params`` its size.

    Example::

        >>> net = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 3))
        >>> per_sample = batched(net)
        >>> per_sample(torch.randn(8, 100, 2), torch.randn(8, per_sample.num_params)).shape
        torch.Size([8, 100, 3])
    """
    return BatchedSequential(module, shared, backend)
