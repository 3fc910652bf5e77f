"""The float64 references every backend is compared with: plain loops over samples, written
independently of hyperkernels' own code, and the error measure with its tolerance per dtype."""
import math

import torch
import torch.nn.functional as F

REFERENCE_ACTIVATIONS = {
    None: lambda z, w0: z,
    "none": lambda z, w0: z,
    "relu": lambda z, w0: F.relu(z),
    "gelu": lambda z, w0: 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0))),
    "silu": lambda z, w0: z / (1.0 + torch.exp(-z)),
    "tanh": lambda z, w0: torch.tanh(z),
    "sigmoid": lambda z, w0: 1.0 / (1.0 + torch.exp(-z)),
    "sine": lambda z, w0: torch.sin(w0 * z),
}

# Bound on ||out - ref|| / ||ref|| per dtype: outputs are rounded to the dtype once (and low-precision
# backends round intermediates such as the pre-activation once more), so a few units of eps.
FORWARD_RTOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
GRAD_RTOL = {torch.float64: 1e-10, torch.float32: 5e-5, torch.float16: 8e-3, torch.bfloat16: 5e-2}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    denom = ref.norm().item()
    err = (out - ref).norm().item()
    return err / denom if denom > 0 else err


def assert_close(out, ref, rtol, what="output"):
    assert not torch.isnan(out).any() or torch.isnan(ref).any(), f"{what}: NaN where the reference has none"
    err = relative_error(out, ref)
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.1e}"


def linear_reference(x, weight, bias, activation=None, w0=30.0):
    """x (B, [N,] in), weight (B, out, in), bias (B, out) or None, all float64: loop over samples."""
    act = REFERENCE_ACTIVATIONS[activation]
    outs = []
    for b in range(x.shape[0]):
        z = F.linear(x[b], weight[b], None if bias is None else bias[b])
        outs.append(act(z, w0))
    return torch.stack(outs) if outs else x.new_empty((0, *x.shape[1:-1], weight.shape[1]))


def conv1x1_reference(x, weight, bias, activation=None, w0=30.0):
    """x (B, C_in, *spatial), weight (B, C_out, C_in, [1...]): loop over samples of a plain conv."""
    act = REFERENCE_ACTIVATIONS[activation]
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[x.dim() - 2]
    outs = []
    for b in range(x.shape[0]):
        w = weight[b].reshape(*weight.shape[1:3], *([1] * (x.dim() - 2)))
        z = conv(x[b : b + 1], w, None if bias is None else bias[b])[0]
        outs.append(act(z, w0))
    return torch.stack(outs)


def hyper_linear_reference(x, h, head_weight, head_bias, out_features, bias, activation=None, w0=30.0):
    """hyper_linear as generate-then-apply: the head's F.linear gives each sample's flat (out*in [+ out]) weights,
    sliced into weight and bias for the loop reference above."""
    theta = F.linear(h, head_weight, head_bias)
    ow = out_features * x.shape[-1]
    weight = theta[:, :ow].unflatten(1, (out_features, x.shape[-1]))
    return linear_reference(x, weight, theta[:, ow:] if bias else None, activation, w0)


def sequential_for(sizes, activation, output_activation, w0=30.0, bias=True):
    """The nn.Sequential a per-sample MLP of these sizes stands for, in float64."""
    from hyperkernels.nn import Sine

    modules = {None: torch.nn.Identity, "none": torch.nn.Identity, "relu": torch.nn.ReLU, "gelu": torch.nn.GELU,
               "silu": torch.nn.SiLU, "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid, "sine": lambda: Sine(w0)}
    layers = []
    for i, (k, m) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(k, m, bias=bias))
        layers.append(modules[activation if i < len(sizes) - 2 else output_activation]())
    return torch.nn.Sequential(*layers).double()


def mlp_reference(net, x, flat, grad_y):
    """Loop over samples: load row b of ``flat`` into ``net`` with vector_to_parameters, run x[b], and
    backpropagate grad_y[b]. Returns (y, dx, dflat) in float64."""
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    ys, dxs, dflats = [], [], []
    for b in range(x.shape[0]):
        vector_to_parameters(flat[b].double(), net.parameters())
        net.zero_grad()
        xb = x[b].double().detach().requires_grad_()
        yb = net(xb)
        yb.backward(grad_y[b].double())
        ys.append(yb.detach())
        dxs.append(xb.grad)
        dflats.append(parameters_to_vector([p.grad for p in net.parameters()]))
    return torch.stack(ys), torch.stack(dxs), torch.stack(dflats)
