"""The functional API: validate, shape, and hand to the op layer (``ops/``), which picks the backend.

The ``nn`` layer calls only this module: the public ops, and (at the end) the planning queries and entry points on
inputs it has already validated."""
from __future__ import annotations

from typing import Mapping, Optional, Union

from torch import Tensor

from . import _validate
from .activations import DEFAULT_SINE_W0, get_activation
from .layout import MLPSpec, ParamLayout
from .ops.hyper_linear import apply_hyper_linear
from .ops.linear import apply_linear
from .ops.mlp import apply_mlp
# The planning queries of the nn layer, answered by the op layer: re-exported so that nn imports only this module.
from .ops.hyper_linear import HyperShape, hyper_linear_way  # noqa: F401
from .ops.linear import linear_runs_as_composition  # noqa: F401
from .ops.mlp import mlp_op_available, mlp_op_runs  # noqa: F401

__all__ = ["batched_linear", "batched_conv1x1", "batched_mlp", "hyper_linear"]


def batched_linear(
    x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, activation: Optional[str] = None,
    w0: float = DEFAULT_SINE_W0, backend: str = "auto",
) -> Tensor:
    r"""Per-sample linear layer: ``y[b] = act(x[b] @ weight[b].T + bias[b])``.

    Args:
        x: ``(B, in)`` or ``(B, N, in)``.
        weight: ``(B, out, in)``, any strides (a view of a flat ``(B, P)`` hypernetwork output, or an
            ``expand`` of one weight shared by every sample, is read in place).
        bias: ``(B, out)`` or None.
        activation: None, "relu", "gelu", "silu", "tanh", "sigmoid" or "sine" (``sin(w0 * z)``).
        w0: the frequency of "sine".
        backend: "auto", "torch" (or its formulations "torch_bmm", "torch_conv"), or another registered
            backend (see :func:`hyperkernels.available_backends`).

    Returns:
        ``(B, out)`` or ``(B, N, out)``, contiguous, in the dtype of ``x``.

    Example::

        >>> x, w, b = torch.randn(8, 5, 3), torch.randn(8, 4, 3), torch.randn(8, 4)
        >>> batched_linear(x, w, b, activation="relu").shape
        torch.Size([8, 5, 4])
    """
    _validate.check_linear(x, weight, bias)
    act, w0 = get_activation(activation), _validate.check_w0(w0)
    single = x.dim() == 2
    y = apply_linear(x.unsqueeze(1) if single else x, weight, bias, act, w0, False, backend)
    return y.squeeze(1) if single else y


def batched_conv1x1(
    x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, activation: Optional[str] = None,
    w0: float = DEFAULT_SINE_W0, backend: str = "auto",
) -> Tensor:
    r"""Per-sample 1x1 convolution: ``y[b, :, p] = act(weight[b] @ x[b, :, p] + bias[b])`` at every
    spatial position ``p``.

    Args:
        x: ``(B, C_in, *spatial)`` with 1, 2 or 3 spatial dims. Spatial dims that cannot be merged
            into one stride (e.g. ``x[..., ::2, ::2]``) are copied once; all others are read in place.
        weight: ``(B, C_out, C_in)``, or with trailing 1-sized kernel dims like ``nn.Conv2d.weight``.
        bias: ``(B, C_out)`` or None.
        activation, w0, backend: as in :func:`batched_linear`.

    Returns:
        ``(B, C_out, *spatial)``, contiguous.
    """
    _validate.check_conv1x1(x, weight, bias)
    act, w0 = get_activation(activation), _validate.check_w0(w0)
    spatial = x.shape[2:]
    weight3 = weight.reshape(weight.shape[:3])  # drops the trailing 1-sized dims: always a view
    y = apply_linear(x.flatten(2), weight3, bias, act, w0, True, backend)
    return y.view(*y.shape[:2], *spatial)


def batched_mlp(
    x: Tensor, params: Union[Tensor, Mapping[str, Tensor]], layout: ParamLayout, *, activation: Optional[str] = "relu",
    output_activation: Optional[str] = None, w0: float = DEFAULT_SINE_W0, backend: str = "auto",
) -> Tensor:
    r"""Per-sample MLP: every sample runs its own stack of linear layers, all layers in one op.

    ``h_0 = x[b]``, ``h_l = act(h_{l-1} @ W_l[b].T + b_l[b])``, with ``output_activation`` after the last
    layer instead of ``activation``.

    Args:
        x: ``(B, in)`` or ``(B, N, in)``.
        params: the flat ``(B, P)`` hypernetwork output (read in place), or a dict of ``(B, *shape)`` tensors
            keyed like a ``state_dict`` ("0.weight", "0.bias", "2.weight", ...), which is flattened once
            (one copy: pass the flat tensor to avoid it).
        layout: a :class:`ParamLayout` of linear layers, e.g. ``ParamLayout.from_module(nn.Sequential(...))``.
        activation: between layers; output_activation: after the last one (None, "relu", "gelu", "silu",
            "tanh", "sigmoid", "sine").
        w0: the frequency of "sine".
        backend: as in :func:`batched_linear`.

    Returns:
        ``(B, out)`` or ``(B, N, out)``, contiguous.

    Example::

        >>> net = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 3))
        >>> layout = ParamLayout.from_module(net)
        >>> batched_mlp(torch.randn(8, 100, 2), torch.randn(8, layout.numel), layout).shape
        torch.Size([8, 100, 3])
    """
    if not isinstance(layout, ParamLayout):
        raise TypeError(f"layout: expected a hyperkernels.ParamLayout, got {type(layout).__name__}")
    spec = layout.mlp_spec()
    act, out_act = get_activation(activation), get_activation(output_activation)
    w0 = _validate.check_w0(w0)
    flat = params if isinstance(params, Tensor) else layout.flatten(params)
    layout.check_flat(flat)
    _validate.check_mlp(x, flat, spec.sizes[0])
    single = x.dim() == 2
    y = apply_mlp(x.unsqueeze(1) if single else x, flat, spec, act, out_act, w0, backend)
    return y.squeeze(1) if single else y


def hyper_linear(
    x: Tensor, h: Tensor, head_weight: Tensor, head_bias: Optional[Tensor] = None, *, out_features: int,
    bias: bool = True, activation: Optional[str] = None, w0: float = DEFAULT_SINE_W0, backend: str = "auto",
) -> Tensor:
    r"""A per-sample linear layer run straight from the hypernetwork's last hidden state ``h``: the per-sample
    weights ``theta[b] = head_weight @ h[b] + head_bias`` are never materialised.

    Equals ``batched_linear(x, W, c, activation=...)`` with ``theta = F.linear(h, head_weight, head_bias)``,
    ``W = theta[:, :out*in].view(B, out, in)`` and ``c = theta[:, out*in:]``, computed as
    ``y[b] = act(sum_k h[b, k] G_k x[b] + g_W x[b] + c[b])``: one GEMM whose reduction runs over
    ``in * K`` pairs ``x[b, n, i] * h[b, k]``, formed on the fly. Its cost grows with N and with ``K`` against
    ``out``; ``backend="auto"`` runs whichever of the two ways a cost model of both (FLOPs, bytes moved, calls
    and temporaries, from B, N, in, out, K, the biases, the dtype, the device and whether a backward will run)
    says is faster, and the one with less memory where they are about even (``hyperkernels/_dispatch.py``).

    Args:
        x: ``(B, in)`` or ``(B, N, in)``.
        h: ``(B, K)``, the hypernetwork's last hidden state.
        head_weight: ``(out*in + out*bias, K)``, the hypernetwork's last ``nn.Linear`` weight; rows ordered like
            ``parameters_to_vector(nn.Linear(in, out, bias))`` (the weight row-major, then the bias).
        head_bias: ``(out*in + out*bias,)`` or None.
        out_features: ``out``; ``in`` is ``x.shape[-1]``.
        bias: whether the generated layer has a bias (the last ``out`` rows of the head).
        activation, w0: as in :func:`batched_linear`.
        backend: "auto", "torch" (the chunked outer-product formulation in PyTorch), or another registered
            backend that implements it (see :func:`hyperkernels.available_backends`).

    Returns:
        ``(B, out)`` or ``(B, N, out)``, contiguous, in the dtype of ``x``. Gradients flow to ``x``, ``h``,
        ``head_weight`` and ``head_bias``.

    Example::

        >>> head = nn.Linear(16, 4 * 3 + 4)                  # generates a Linear(3, 4) per sample
        >>> x, h = torch.randn(8, 5, 3), torch.randn(8, 16)
        >>> hyper_linear(x, h, head.weight, head.bias, out_features=4, activation="relu").shape
        torch.Size([8, 5, 4])
    """
    _validate.check_hyper_linear(x, h, head_weight, head_bias, out_features, bias)
    act, w0 = get_activation(activation), _validate.check_w0(w0)
    single = x.dim() == 2
    y = apply_hyper_linear(x.unsqueeze(1) if single else x, h, head_weight, head_bias, out_features, bias, act, w0,
                           backend)
    return y.squeeze(1) if single else y


# -- for the nn layer: planning queries, and entry points on inputs it has validated -----------------------------

def linear_from_checked(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Optional[str], w0: float,
                        channel_major: bool, backend: str) -> Tensor:
    """:func:`batched_linear` on ``x (B, N, in)``, or (``channel_major``) :func:`batched_conv1x1` on ``x (B, in, S)``,
    with ``weight (B, out, in)``: for layers whose shapes, dtypes and devices the caller has checked (the steps of
    a ``batched()`` plan, each checked against the plan once per call), without checking them again."""
    return apply_linear(x, weight, bias, get_activation(activation), w0, channel_major, backend)


def mlp_from_spec(x: Tensor, params: Tensor, spec: MLPSpec, activation: Optional[str],
                  output_activation: Optional[str], w0: float, backend: str) -> Tensor:
    """:func:`batched_mlp` on ``x (B, N, in)`` and ``params (B, spec.numel)`` already checked against ``spec``."""
    return apply_mlp(x, params, spec, get_activation(activation), get_activation(output_activation), w0, backend)

