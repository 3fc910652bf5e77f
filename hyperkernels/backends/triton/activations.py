"""The activation table (``hyperkernels/activations.py``) as Triton helpers, forward and derivative side by side.

Every kernel that fuses an activation switches on the table's integer ``code`` passed as a
``tl.constexpr``, so each kernel is compiled for one activation and the switch costs nothing at run time.

Conventions of the helpers:

* Arguments are float32 tensors (kernels accumulate in float32). They are cast to float32 again here
  anyway: ``tl.exp`` / ``tl.sin`` / ``tl.sigmoid`` reject float16/bfloat16 under the interpreter
  (measured with triton 3.6 and 3.9), and on a GPU the half-precision forms are less accurate.
* No ``libdevice`` functions (they fail under the interpreter) and no ``tl.tanh`` (not in every Triton
  version): ``tanh(z) = 2 * sigmoid(2z) - 1``.
* GELU is the exact erf form of ``torch.nn.GELU()``; ``tl.erf`` is correct under the interpreter (checked
  against ``torch.erf`` to 6e-8) and lowers to the device's erf on a GPU.
* ``activation_grad`` takes both the pre-activation ``z`` and the output ``y``; a kernel loads only the one
  the activation needs (``Activation.needs_preactivation`` in the table) and passes anything for the other.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ...activations import ACTIVATIONS

# The table's codes as compile-time constants (a kernel may only read globals that are constexpr).
ACT_NONE: tl.constexpr = tl.constexpr(ACTIVATIONS["none"].code)
ACT_RELU: tl.constexpr = tl.constexpr(ACTIVATIONS["relu"].code)
ACT_GELU: tl.constexpr = tl.constexpr(ACTIVATIONS["gelu"].code)
ACT_SILU: tl.constexpr = tl.constexpr(ACTIVATIONS["silu"].code)
ACT_TANH: tl.constexpr = tl.constexpr(ACTIVATIONS["tanh"].code)
ACT_SIGMOID: tl.constexpr = tl.constexpr(ACTIVATIONS["sigmoid"].code)
ACT_SINE: tl.constexpr = tl.constexpr(ACTIVATIONS["sine"].code)

_INV_SQRT2: tl.constexpr = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI: tl.constexpr = tl.constexpr(0.3989422804014327)


@triton.jit
def activation_forward(z, w0, ACT: tl.constexpr):
    """f(z) in float32; ``w0`` is the frequency of "sine" (ignored by the others)."""
    z = z.to(tl.float32)
    if ACT == ACT_RELU:
        out = tl.maximum(z, 0.0)
    elif ACT == ACT_GELU:
        out = 0.5 * z * (1.0 + tl.erf(z * _INV_SQRT2))
    elif ACT == ACT_SILU:
        out = z * tl.sigmoid(z)
    elif ACT == ACT_TANH:
        out = 2.0 * tl.sigmoid(2.0 * z) - 1.0
    elif ACT == ACT_SIGMOID:
        out = tl.sigmoid(z)
    elif ACT == ACT_SINE:
        out = tl.sin(w0 * z)
    else:
        tl.static_assert(ACT == ACT_NONE, "unknown activation code")
        out = z
    return out


@triton.jit
def activation_derivative(z, y, w0, ACT: tl.constexpr):
    """f'(z) in float32, from ``y = f(z)`` for none/relu/tanh/sigmoid and from ``z`` for gelu/silu/sine."""
    if ACT == ACT_RELU:
        d = tl.where(y.to(tl.float32) > 0.0, 1.0, 0.0)
    elif ACT == ACT_GELU:
        z = z.to(tl.float32)
        d = 0.5 * (1.0 + tl.erf(z * _INV_SQRT2)) + z * tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
    elif ACT == ACT_SILU:
        z = z.to(tl.float32)
        s = tl.sigmoid(z)
        d = s * (1.0 + z * (1.0 - s))
    elif ACT == ACT_TANH:
        y = y.to(tl.float32)
        d = 1.0 - y * y
    elif ACT == ACT_SIGMOID:
        y = y.to(tl.float32)
        d = y * (1.0 - y)
    elif ACT == ACT_SINE:
        z = z.to(tl.float32)
        d = w0 * tl.cos(w0 * z)
    else:
        tl.static_assert(ACT == ACT_NONE, "unknown activation code")
        d = tl.full(y.shape, 1.0, tl.float32)
    return d


@triton.jit
def activation_grad(grad, z, y, w0, ACT: tl.constexpr):
    """dL/dz = dL/dy * f'(z) in float32. For "none" this is ``grad`` itself (``z``, ``y`` unused)."""
    grad = grad.to(tl.float32)
    if ACT == ACT_NONE:
        dz = grad
    elif ACT == ACT_RELU:
        # A select rather than grad * mask, like autograd's own relu backward (threshold_backward).
        dz = tl.where(y.to(tl.float32) > 0.0, grad, 0.0)
    else:
        dz = grad * activation_derivative(z, y, w0, ACT)
    return dz
