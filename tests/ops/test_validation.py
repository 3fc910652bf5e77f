"""Every bad input is a ValueError/TypeError naming the argument, what was expected and what was given,
raised before any kernel runs."""
import pytest
import torch

import hyperkernels as hk
from hyperkernels import BackendUnavailableError

X, W, B = torch.randn(4, 5, 3), torch.randn(4, 6, 3), torch.randn(4, 6)


@pytest.mark.parametrize(
    "args, kwargs, exc, pattern",
    [
        ((torch.randn(4), W), {}, ValueError, r"x: expected shape \(B, in\) or \(B, N, in\), got 1-D shape \(4,\)"),
        ((torch.randn(4, 1, 5, 3), W), {}, ValueError, r"x: expected shape .* got 4-D"),
        ((X, torch.randn(6, 3)), {}, ValueError, r"weight: expected shape \(B, out, in\), got 2-D shape \(6, 3\)"),
        ((X, torch.randn(5, 6, 3)), {}, ValueError, r"weight: expected batch size \(dim 0\) 4 \(x.shape\[0\]\), got 5"),
        ((X, torch.randn(4, 6, 2)), {}, ValueError, r"weight: expected in_features \(dim 2\) 3 \(x.shape\[-1\]\), got 2"),
        ((X, W, torch.randn(4, 5)), {}, ValueError, r"bias: expected shape \(4, 6\) .* got \(4, 5\)"),
        ((X, W, torch.randn(6)), {}, ValueError, r"bias: expected shape \(4, 6\)"),
        ((X, W.double()), {}, TypeError, r"weight: expected dtype torch.float32 \(the dtype of x\), got torch.float64"),
        ((X, W, B.half()), {}, TypeError, r"bias: expected dtype torch.float32"),
        ((X.long(), W), {}, TypeError, r"x: expected a floating dtype .* got torch.int64"),
        ((X.numpy(), W), {}, TypeError, r"x: expected a Tensor .* got ndarray"),
        ((X, W), {"activation": "swish"}, ValueError, r"activation: expected None or one of .*'relu'.* got 'swish'"),
        ((X, W), {"activation": torch.relu}, TypeError, r"activation: expected None or one of"),
        ((X, W), {"backend": "tpu"}, ValueError, r"backend: expected one of \['auto', 'torch', .*got 'tpu'"),
        ((X, W), {"backend": 3}, TypeError, r"backend: expected a string"),
        ((X, W), {"w0": "30"}, TypeError, r"w0: expected a finite float, got '30'"),
        ((X, W), {"w0": float("nan")}, TypeError, r"w0: expected a finite float"),
    ],
)
def test_batched_linear_bad_input(args, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        hk.batched_linear(*args, **kwargs)


@pytest.mark.parametrize(
    "args, exc, pattern",
    [
        ((torch.randn(4, 3), W), ValueError, r"x: expected shape \(B, C_in, \*spatial\) with 1, 2 or 3 spatial dims, got 2-D"),
        ((torch.randn(4, 3, 2, 2, 2, 2), W), ValueError, r"got 6-D"),
        ((torch.randn(4, 2, 7), W), ValueError, r"weight: expected in_channels \(dim 2\) 2 \(x.shape\[1\]\), got 3"),
        ((torch.randn(4, 3, 7), torch.randn(4, 6, 3, 3)), ValueError, r"kernel dims must all be 1, got weight of shape \(4, 6, 3, 3\)"),
        ((torch.randn(4, 3, 7), torch.randn(4, 6)), ValueError, r"weight: expected shape \(B, C_out, C_in\)"),
        ((torch.randn(3, 3, 7), W), ValueError, r"weight: expected batch size \(dim 0\) 3"),
    ],
)
def test_batched_conv1x1_bad_input(args, exc, pattern):
    with pytest.raises(exc, match=pattern):
        hk.batched_conv1x1(*args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a device mismatch needs a CUDA GPU")
def test_mixed_devices():
    with pytest.raises(ValueError, match=r"weight: expected device cpu \(the device of x\), got cuda:0"):
        hk.batched_linear(X, W.cuda())


def test_mixed_devices_with_meta_tensors():
    with pytest.raises(ValueError, match=r"weight: expected device cpu \(the device of x\), got meta"):
        hk.batched_linear(X, W.to("meta"))


def test_unavailable_backend_says_why():
    reasons = hk.available_backends()
    missing = [name for name, why in reasons.items() if why is not None]
    if not missing:
        pytest.skip("every backend is available on this machine")
    with pytest.raises(BackendUnavailableError, match=rf"backend='{missing[0]}' is not available: .+"):
        hk.batched_linear(X, W, backend=missing[0])


def test_unsupported_dtype_for_an_explicit_backend_is_an_error_and_auto_avoids_it():
    reasons = hk.available_backends()
    for name, why in reasons.items():
        if why is None and hk._dispatch.get_backend(name).check_support(X.device, torch.float64) is not None:
            with pytest.raises(ValueError, match=rf"backend='{name}' cannot run batched_linear here: .*float64"):
                hk.batched_linear(X.double(), W.double(), backend=name)
    hk.batched_linear(X.double(), W.double())  # auto picks a backend that runs it


def test_backend_names_are_the_registered_implementations():
    """The names `backend=` accepts (validated before any import of a backend) are "auto", "torch" and exactly the
    implementations the registry knows."""
    assert set(hk.BACKEND_NAMES) - {"auto", "torch"} == set(hk._dispatch._IMPLEMENTATIONS)
    with pytest.raises(ValueError, match=r"backend: expected one of \['auto', 'torch'"):
        hk.nn.batched(torch.nn.Linear(2, 3), backend="tritonn")
