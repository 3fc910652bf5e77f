"""Test set-up and what several test files share: seeds, the backend x device matrix, GPU skips, the Triton
interpreter on CPU, the benchmark's modules, the hyper_linear case runner, per-sample params and small targets."""
import importlib
import math
import os
import sys

import torch

# Triton kernels run on CPU tensors through the interpreter. It must be switched on before the first
# `import triton` (set later, it breaks the tl.* helpers), so here, before anything imports hyperkernels' Triton backend.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import hyperkernels as hk  # noqa: E402
from hyperkernels._dispatch import available_backends, get_backend  # noqa: E402
from reference import FORWARD_RTOL, GRAD_RTOL, assert_close, hyper_linear_reference  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def backend_params():
    """Every concrete backend on every device of this machine, as pytest params; combinations that
    cannot run here are kept as skips that say why."""
    params = []
    for name, reason in available_backends().items():
        for device in DEVICES:
            marks = []
            if reason is not None:
                marks.append(pytest.mark.skip(reason=f"backend {name} unavailable: {reason}"))
            else:
                why = get_backend(name).check_support(torch.device(device), torch.float32)
                if why is not None:
                    marks.append(pytest.mark.skip(reason=f"backend {name} on {device}: {why}"))
            params.append(pytest.param((name, device), id=f"{name}-{device}", marks=marks))
    return params


def supports(backend: str, device: str, dtype: torch.dtype) -> bool:
    return get_backend(backend).check_support(torch.device(device), dtype) is None


def is_slow_path(backend: str, device: str) -> bool:
    """Interpreted Triton on CPU: keep its shapes few and small."""
    return device == "cpu" and backend not in ("torch_bmm", "torch_conv")


def assert_compiles_without_graph_break(fn, args):
    """``torch.compile(fn, fullgraph=True)`` gives one graph, and the same values and gradients as eager.
    ``args`` are the tensors to differentiate; the gradient seed is the sum of the output."""
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(*args)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    out = torch.compile(fn, fullgraph=True)(*args)
    expected = fn(*args)
    torch.testing.assert_close(out, expected)
    for g, e in zip(torch.autograd.grad(out.sum(), args), torch.autograd.grad(expected.sum(), args)):
        torch.testing.assert_close(g, e)


# Shared by the Triton test files: where the kernels run (CPU tensors under the interpreter, CUDA on a GPU
# machine), and the markers for tests that need Triton or a real GPU.
HAS_CUDA = torch.cuda.is_available()
TRITON_DEVICE = "cuda" if HAS_CUDA and not INTERPRETED else "cpu"
TRITON_REASON = available_backends()["triton"]
needs_triton = pytest.mark.skipif(TRITON_REASON is not None, reason=f"backend triton unavailable: {TRITON_REASON}")
needs_gpu = pytest.mark.skipif(not HAS_CUDA or INTERPRETED,
                               reason="needs a CUDA GPU (real sizes; the interpreter would take hours)")


def bench_module(name: str):
    """A module of bench/, which the tests share with the benchmark (its timer, peak-memory measurement, cases
    and models). bench/ is a folder of scripts that import each other by bare name, so it goes on sys.path."""
    bench = os.path.join(ROOT, "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    return importlib.import_module(name)


# -- hyper_linear cases (the op tests, the torch backend's chunking, the Triton backend's) ----------------------
# A case is ((B, N, in, out, K), activation, dtype, bias, head_bias).


def make_hyper_linear_leaves(b, n, i, o, k, bias, head_bias, x2d=False):
    """float64 leaves scaled so that the generated layer has unit-order pre-activations."""
    rows = o * i + (o if bias else 0)
    leaves = {
        "x": torch.randn((b, i) if x2d else (b, n, i), dtype=torch.float64),
        "h": torch.randn(b, k, dtype=torch.float64),
        "head_weight": torch.randn(rows, k, dtype=torch.float64) / (k * max(i, 1)) ** 0.5,
    }
    if head_bias:
        leaves["head_bias"] = torch.randn(rows, dtype=torch.float64) / max(i, 1) ** 0.5
    return leaves


def run_hyper_linear_case(case, backend, device, x2d=False, transform=None):
    """hyper_linear on ``backend`` against generate-then-apply in float64: the output and the gradients of x, h,
    head_weight and head_bias. ``transform`` maps x, h and head_weight to the views the op is given."""
    (b, n, i, o, k), act, dtype, bias, head_bias = case
    if backend not in ("auto", "torch") and not supports(backend, device, dtype):
        pytest.skip(f"backend {backend} does not support {dtype} on {device}")
    leaves = make_hyper_linear_leaves(b, n, i, o, k, bias, head_bias, x2d)
    low = {name: t.to(dtype).to(device).requires_grad_() for name, t in leaves.items()}
    ref = {name: t.to(dtype).double().requires_grad_() for name, t in leaves.items()}
    w0 = 30.0 if dtype in (torch.float32, torch.float64) else 1.5  # half precision: keep sin's argument exact-ish
    if act == "sine" and w0 == 30.0:
        for t in (low, ref):  # SIREN-style scale, so that w0 * z is O(1) and rounding is not amplified 30-fold
            t["head_weight"] = t["head_weight"] / w0
            if "head_bias" in t:
                t["head_bias"] = t["head_bias"] / w0
    view = transform or (lambda t: t)
    y = hk.hyper_linear(view(low["x"]), view(low["h"]), view(low["head_weight"]), low.get("head_bias"),
                        out_features=o, bias=bias, activation=act, w0=w0, backend=backend)
    y_ref = hyper_linear_reference(ref["x"], ref["h"], ref["head_weight"], ref.get("head_bias"), o, bias, act, w0)
    assert y.dtype == dtype and y.device.type == device and y.is_contiguous()
    assert y.shape == y_ref.shape
    assert_close(y, y_ref, FORWARD_RTOL[dtype], "forward")
    grad = torch.randn(y_ref.shape, dtype=torch.float64).to(dtype)
    names = list(leaves)
    grads = torch.autograd.grad(y, [low[name] for name in names], grad.to(device))
    grads_ref = torch.autograd.grad(y_ref, [ref[name] for name in names], grad.double())
    for name, g, r in zip(names, grads, grads_ref):
        assert_close(g, r, GRAD_RTOL[dtype], f"grad of {name}")


# -- per-sample parameters, what their backward allocates, small targets -----------------------------------------


def per_sample_params(layout, batch, dtype, scale=1.0):
    """B default-like initialisations: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) per layer, times scale."""
    out = {}
    fan_in = None
    for name, shape in layout.shapes.items():
        if name.endswith("weight"):
            fan_in = math.prod(shape[1:])
        bound = scale / math.sqrt(fan_in or shape[0])
        out[name] = ((torch.rand(batch, *shape, dtype=torch.float64) * 2 - 1) * bound).to(dtype)
    return out


class _OpsMaking(TorchDispatchMode):
    """Records the ops that return a tensor of a given shape."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.ops = tuple(shape), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = torch.utils._pytree.tree_leaves(out)
        if any(isinstance(t, torch.Tensor) and tuple(t.shape) == self.shape for t in outputs):
            self.ops.append(str(func))
        return out


def ops_making_params_sized_tensors_in_backward(y, flat):
    """The ops that create a tensor of ``flat``'s (B, P) shape while autograd computes the gradient of
    ``y.sum()`` with respect to ``flat``. One, the gradient itself, where the op reads the flat tensor whole;
    where it reads views of it, every view's backward adds a zero-filled (B, P) buffer (and the buffers are summed)."""
    recorder = _OpsMaking(flat.shape)
    with recorder:
        torch.autograd.grad(y.sum(), flat)
    return recorder.ops


def hypernetwork_target():
    """The small target MLP the HyperNetwork tests generate weights for: 2 -> 32 -> 32 -> 3, P = 1251."""
    return nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))


# The activation modules of nn.Sequential targets, by the name batched() tests use for them.
ACT_MODULES = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
               "identity": nn.Identity, "sine": lambda: hk.nn.Sine(30.0)}


def sequential_mlp(act, out_act, sizes=(3, 17, 33, 2), bias=True):
    """An nn.Sequential MLP (float32) with ``act`` between its linear layers and ``out_act`` after the last."""
    layers = []
    for i, (k, m) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(k, m, bias=bias), ACT_MODULES[act if i < len(sizes) - 2 else out_act]()]
    return nn.Sequential(*layers)


def mixed_activations_mlp():
    """Two fused runs for batched(): relu / tanh over layers 0, 2, then silu / none over 4, 6, 8."""
    return nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.SiLU(),
                         nn.Linear(8, 8), nn.SiLU(), nn.Linear(8, 2))


def siren_two_w0_mlp():
    """A SIREN whose two sine layers have different w0 (30, then 1): they cannot share one fused op."""
    return nn.Sequential(nn.Linear(2, 16), hk.nn.Sine(30.0), nn.Linear(16, 16), hk.nn.Sine(1.0), nn.Linear(16, 3))
