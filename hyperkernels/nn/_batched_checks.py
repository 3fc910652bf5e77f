"""What ``batched()`` refuses, and why: the module at construction, the params and inputs at every call.

Every message names the layer or argument, what was expected and what was given. Hints for code that comes from
other hypernetwork libraries are one line here; ``docs/migration.md`` explains them.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from .. import _validate
from ..layout import ParamLayout
from ._plan import CONV_TYPES, Layer

__all__ = ["check_module", "check_params", "check_inputs", "check_state", "MIGRATION_DOC"]

MIGRATION_DOC = "docs/migration.md"


def _where(name: str) -> str:
    return f"layer {name}" if name else "the module"


def check_module(module: nn.Module, leaves: Optional[list]) -> None:
    """Refuse what cannot run per sample, or runs but is not what the user meant. ``leaves``: (index, leaf) of a
    plain nn.Sequential, or None for a module with its own forward."""
    for name, m in module.named_modules(remove_duplicate=False):
        kind = type(m).__name__
        for pname, p in list(m._parameters.items()) + list(m._buffers.items()):
            if isinstance(p, (nn.parameter.UninitializedParameter, nn.parameter.UninitializedBuffer)):
                raise ValueError(f"module: {_where(name)} ({kind}) is a lazy module whose shapes are not known yet "
                                 f"({pname}): run it once or give its sizes")
        if (isinstance(m, (nn.Linear, *CONV_TYPES)) and not nn.utils.parametrize.is_parametrized(m, "weight")
                and not any(n.startswith("weight") for n, _ in m.named_parameters(recurse=False))):
            hint = (f"it was converted in place by HyperLight's hypernetize(): build batched() from the model as it "
                    f"was before, with shared= the names still in model.named_parameters() (see {MIGRATION_DOC})"
                    if hasattr(m, "_external_parameters") else
                    "is its weight a buffer or a plain attribute? was the module already converted in place by "
                    f"another library? (see {MIGRATION_DOC})")
            raise ValueError(f"module: {_where(name)} ({kind}) has no parameter 'weight': {hint}")
    _check_grouped_conv_trick(module, leaves)
    _check_overlapping_parameters(module)


def _check_grouped_conv_trick(module: nn.Module, leaves: Optional[list]) -> None:
    """A stack of 1x1 convs that all have the same groups > 1 is the grouped-conv "parallel MLP" (groups = the
    number of samples): one sample's network is what batched() takes, it does the grouping. A real per-sample
    grouped conv comes with other layers (a KxK conv, a 1x1 conv with groups 1 ...), which this does not refuse; a
    per-sample stack of grouped 1x1 convs alone still runs inside a module with its own forward."""
    if leaves is None:
        if not isinstance(module, tuple(CONV_TYPES)):
            return
        leaves = [("0", module)]
    with_params = [(i, m) for i, m in leaves if any(True for _ in m.parameters())]
    convs = [(i, m) for i, m in with_params if isinstance(m, tuple(CONV_TYPES))]
    if not convs or len(convs) != len(with_params):
        return
    groups = {m.groups for _, m in convs}
    if len(groups) != 1 or 1 in groups or any(any(k != 1 for k in m.kernel_size) for _, m in convs):
        return
    g = groups.pop()
    index, first = convs[0]
    sizes = [(m.in_channels // g, m.out_channels // g) for _, m in convs]
    example = ", nn.ReLU(), ".join(f"nn.Linear({i}, {o})" for i, o in sizes)
    raise ValueError(
        f"module: layer {index} ({type(first).__name__}) has groups={g}, as has every conv of the module: the "
        f"grouped-conv \"parallel MLP\" (groups = the number of samples). batched() runs its 1x1 convs on the "
        f"kernels with groups=1, and does the grouping itself: describe ONE sample's network, e.g. "
        f"nn.Sequential({example}), and pass params (B, P) per sample (a grouped conv's weight (G*out, in, 1) is "
        f"weight.view(G, out, in) per sample; see {MIGRATION_DOC}). A per-sample grouped 1x1 conv stack is run as "
        f"written inside a module with its own forward()."
    )


def _check_overlapping_parameters(module: nn.Module) -> None:
    """Parameters that are distinct tensors but share memory (one a view of another) are tied in a way a flat
    per-sample layout cannot express: it gives each its own entries."""
    spans = []
    for name, p in module.named_parameters():
        if p.device.type == "meta" or p.numel() == 0:
            continue
        start = p.data_ptr()
        spans.append((start, start + p.numel() * p.element_size(), name))
    spans.sort()
    for (s0, e0, n0), (s1, e1, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise ValueError(f"module: parameters {n0!r} and {n1!r} share memory (one is a view of the other): "
                             "tied in a way a flat per-sample layout cannot express (it gives each its own "
                             "entries). Make them one parameter (register the same tensor under both names), or "
                             "independent ones")


def check_params(params, layout: ParamLayout, shared_names: Sequence[str], argname: str = "params",
                 batch: Optional[int] = None):
    """(flat or None, dict or None, B), or a clear error naming ``argname``; ``batch``: the B they must have, if
    known."""
    P = layout.numel
    shared_note = f" (the module's parameters minus the shared {list(shared_names)})" if shared_names else ""
    if isinstance(params, Tensor):
        _validate.check_tensor(argname, params, f"(B, {P})")
        if params.dim() != 2 or params.shape[1] != P:
            hint = ""
            if params.dim() == 1 and params.shape[0] == P:
                hint = "; for one weight set used by every sample, pass params.expand(B, -1) (no copy)"
            elif params.dim() == 2 and params.shape[1] > P:
                hint = (f"; if the extra {params.shape[1] - P} entries are padding (hyper-nn pads its output to a "
                        f"whole number of chunks), pass params[:, :{P}]")
            elif params.dim() > 2:
                hint = "; flatten it to (B, P), or pass a dict like module.state_dict() with a leading batch dim"
            raise ValueError(f"{argname}: expected flat per-sample parameters of shape (B, {P}){shared_note}, got "
                             f"shape {tuple(params.shape)}{hint}")
        _check_batch(argname, params.shape[0], batch)
        return params, None, params.shape[0]
    if isinstance(params, tuple) and len(params) == 2 and all(isinstance(p, Mapping) for p in params):
        raise TypeError(f"{argname}: got a tuple of two dicts; torch.func.stack_module_state returns (params, "
                        "buffers): pass its first element")
    if isinstance(params, (list, tuple)):
        raise TypeError(f"{argname}: expected a flat (B, {P}) tensor or a dict name -> (B, *shape) tensor, got a "
                        f"{type(params).__name__} (hypnettorch: use ret_format='flattened')")
    if not isinstance(params, Mapping):
        raise TypeError(f"{argname}: expected a flat (B, {P}) tensor or a dict name -> (B, *shape) tensor, got "
                        f"{type(params).__name__}")
    layout.check_dict_keys(params, argname, shared_names)
    for name, shape in layout.shapes.items():
        t = params[name]
        if isinstance(t, Tensor) and tuple(t.shape) == shape and len(shape) >= 1:
            raise ValueError(f"{argname}[{name!r}]: expected shape (B, {', '.join(map(str, shape))}), got "
                             f"{tuple(t.shape)}: the batch dim is missing (HyperLight's HyperNet drops it when B is "
                             "1): add it with .unsqueeze(0)")
    _check_batch(argname, layout.check_dict(params, argname, shared_names), batch)
    for name in layout.names:
        _validate.check_tensor(f"{argname}[{name!r}]", params[name], "(B, *shape)")
    _validate.check_same_dtype_device([(f"{argname}[{n!r}]", params[n]) for n in layout.names])
    return None, params, params[layout.names[0]].shape[0]


def _check_batch(argname: str, got: int, expected: Optional[int]) -> None:
    if expected is not None and got != expected:
        raise ValueError(f"{argname}: expected batch size (dim 0) {expected}, got {got}")


def _check_first_layer(x: Tensor, first: Layer) -> None:
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
            raise ValueError(f"x: expected in_features (last dim) {first.in_features} ({first.describe()}), got "
                             f"{x.shape[-1]} in shape {tuple(x.shape)}")


def check_inputs(x, batch: int, dtype: torch.dtype, device: torch.device, what: str, first: Optional[Layer],
                 several: bool) -> None:
    """``x``: one tensor, or (``several``: for a module with its own forward) a tuple of its positional inputs;
    each with a leading batch dim. ``first``: the kernel layer that reads x first, if one does."""
    if isinstance(x, Tensor):
        if first is not None:
            _check_first_layer(x, first)
        _check_input("x", x, batch, dtype, device, what)
        return
    if isinstance(x, tuple) and several:
        inputs = x
    else:
        more = " or a tuple of the module's inputs" if several else ""
        raise TypeError(f"x: expected a Tensor{more} with a leading batch dim, got {type(x).__name__}")
    for i, item in enumerate(inputs):
        for t in tree_leaves(item):
            if isinstance(t, Tensor):
                _check_input(f"x[{i}]", t, batch, dtype, device, what)


def _check_input(name: str, t: Tensor, batch: int, dtype: torch.dtype, device: torch.device, what: str) -> None:
    if t.dim() < 1:
        raise ValueError(f"{name}: expected a leading batch dim of size {batch}, got a 0-D tensor")
    if t.shape[0] != batch:
        raise ValueError(f"{name}: expected batch size (dim 0) {batch} (the batch of {what}), got {t.shape[0]}")
    if t.is_floating_point() and t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype} (the dtype of {what}), got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device} (the device of {what}), got {t.device}")


def check_state(norms: list, shared: Mapping[str, Tensor], buffers: Mapping[str, Tensor], dtype: torch.dtype,
                device: torch.device, names: Mapping[str, str]) -> None:
    """What the module holds must fit the call: no norm layer that updates running statistics, shared parameters
    and floating buffers in the params' dtype and on their device. ``shared`` and ``buffers`` are keyed as stored;
    ``names`` maps those keys to the names in the module."""
    for name, m in norms:
        if m.training and m.track_running_stats:
            raise ValueError(
                f"module: {_where(name)} ({type(m).__name__}) is in training mode: it would normalise with the "
                "statistics of a batch and update running statistics that every sample shares, which has no "
                "per-sample meaning. Call .eval() on the batched module (every sample then uses the running "
                "statistics), use GroupNorm / LayerNorm, or build it with track_running_stats=False (statistics "
                "of each sample's own inputs)")
    for kind, tensors in (("shared parameter", shared), ("buffer", buffers)):
        for key, p in tensors.items():
            name = names.get(key, key)
            if p.is_floating_point() and p.dtype != dtype:
                raise TypeError(f"{kind} {name!r} is {p.dtype} but x and params are {dtype}: convert the module "
                                "with .to(dtype)")
            if p.device != device:
                raise ValueError(f"{kind} {name!r} is on {p.device} but x and params are on {device}: move the "
                                 "module with .to(device)")
