"""What the cuda backend checks before a launch (a CUDA tensor, a dtype with kernels), and that the checks it leaves
to the layers above happen there, before the backend is reached (CI, no GPU needed)."""
from __future__ import annotations

import pytest
import torch

import hyperkernels as hk
from cuda_emulator import cpu_launch_env, emulated  # noqa: F401 (fixtures)
from hyperkernels._dispatch import get_backend
from hyperkernels.activations import get_activation
from hyperkernels.backends.cuda import linear as cuda_linear
from hyperkernels.ops import batched_linear_op
from reference import GRAD_RTOL, assert_close, linear_reference


class _NoLaunch:
    """Stands in for the extension where no launch may happen: any attribute access fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"the wrapper reached the extension ({name}) although the arguments are invalid")


@pytest.fixture
def no_launch(monkeypatch):
    monkeypatch.setattr(cuda_linear, "_ext", lambda: _NoLaunch())


def _args(batch=2, n=3, k=4, m=5, dtype=torch.float32):
    x, w, b = torch.randn(batch, n, k), torch.randn(batch, m, k), torch.randn(batch, m)
    return x.to(dtype), w.to(dtype), b.to(dtype)


def test_backend_rejects_cpu_tensors_before_any_launch(no_launch):
    backend = get_backend("cuda")
    x, w, b = _args()
    relu = get_activation("relu")
    with pytest.raises(ValueError, match=r"^x: .*CUDA device.*cpu"):
        backend.linear_forward(x, w, b, relu, 1.0, False, False)
    y = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match=r"^x: .*CUDA device"):
        backend.linear_backward(y, x, w, b, y, y.new_empty(0), relu, 1.0, False, (True, True, True))


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32], ids=str)
def test_backend_rejects_dtypes_without_kernels_before_any_launch(monkeypatch, no_launch, dtype):
    """With the CUDA-device check switched off, the dtype check after it is reachable on CPU."""
    monkeypatch.setattr(cuda_linear, "_require_cuda", lambda x: None)
    x, w, b = (t.to(dtype) for t in _args())
    g = torch.ones(2, 3, 5, dtype=dtype)
    extra = r" \(float64 runs on backend='torch'\)" if dtype == torch.float64 else "$"
    supported = r"\[torch.float32, torch.float16, torch.bfloat16\]"
    pattern = rf"^x: the cuda backend supports dtypes {supported}, got {dtype}{extra}"
    with pytest.raises(TypeError, match=pattern):
        get_backend("cuda").linear_forward(x, w, b, get_activation("gelu"), 1.0, False, True)
    with pytest.raises(TypeError, match=pattern):
        get_backend("cuda").linear_backward(g, x, w, b, g, g.new_empty(0), get_activation("gelu"), 1.0, False,
                                            (True, True, True))


@pytest.mark.parametrize("bad, error, pattern", [
    ("weight_device", ValueError, r"^weight: expected device cpu \(the device of x\), got meta"),
    ("bias_device", ValueError, r"^bias: expected device cpu \(the device of x\), got meta"),
    ("weight_type", TypeError, r"^weight: expected a Tensor"),
    ("x_ndim", ValueError, r"^x: expected shape \(B, in\) or \(B, N, in\), got 1-D"),
    ("weight_shape", ValueError, r"^weight: expected in_features \(dim 2\) 4"),
    ("bias_shape", ValueError, r"^bias: expected shape \(2, 5\)"),
    ("weight_dtype", TypeError, r"^weight: expected dtype torch.float16 \(the dtype of x\), got torch.float32"),
])
def test_the_api_rejects_bad_arguments_before_the_cuda_backend(no_launch, bad, error, pattern):
    """The backend does not check ranks, sizes, or that the tensors share a dtype and device: the functional API
    does, naming the argument, before backend="cuda" is even resolved."""
    x, w, b = _args(dtype=torch.float16)
    if bad == "weight_device":
        w = w.to("meta")
    elif bad == "bias_device":
        b = b.to("meta")
    elif bad == "weight_type":
        w = w.tolist()
    elif bad == "x_ndim":
        x = x[:, 0, 0]
    elif bad == "weight_shape":
        w = w[:, :, :3]
    elif bad == "bias_shape":
        b = b[:, :4]
    elif bad == "weight_dtype":
        w = w.float()
    with pytest.raises(error, match=pattern):
        hk.batched_linear(x, w, b, activation="gelu", backend="cuda")


def test_autograd_hands_the_backward_a_grad_y_like_y(emulated):
    """The backward does not check grad_y: autograd rejects a gradient of the wrong shape or device before any
    backward runs, and converts one of another dtype to y's."""
    x, w, b = (t.requires_grad_() for t in _args())
    y, _ = batched_linear_op(x, w, b, "tanh", 1.0, False, False, "cuda")
    for bad, message in ((torch.ones(2, 2, 5), "Mismatch in shape"), (torch.ones(2, 3, 5, device="meta"), "device")):
        with pytest.raises(RuntimeError, match=message):
            torch.autograd.grad(y, (x, w, b), bad, retain_graph=True)
    assert [kind for kind, _ in emulated.calls] == ["forward"]
    g = torch.randn(2, 3, 5, dtype=torch.float64)
    grads = torch.autograd.grad(y, (x, w, b), g)
    backward = emulated.calls[-1][1]
    assert emulated.calls[-1][0] == "backward" and backward["dtype"] == emulated.DTYPE_FLOAT32
    refs = [t.detach().double().requires_grad_() for t in (x, w, b)]
    expected = torch.autograd.grad(linear_reference(*refs, "tanh"), refs, g)
    for got, want in zip(grads, expected):
        assert_close(got, want, GRAD_RTOL[torch.float32])
