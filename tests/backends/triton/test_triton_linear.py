"""The Triton per-sample linear / 1x1 conv's own cases, beyond the generic backend suite of tests/ops/.

On CPU they run under the interpreter (conftest sets TRITON_INTERPRET=1 where there is no GPU), with sizes
chosen around the interpreter's single config (32-wide GEMM tiles, GEMV tiles of 4 samples x 32 x 32): tile-edge
masks, several samples per GEMV program with B not a multiple of them, float16 / bfloat16, the pre-activation
recompute, the shared-weight batch fold, the split dW reduction, int64 offsets, expanded gradients, opcheck and
torch.compile with backend="triton". The GPU cases at real sizes skip without a GPU. The autotune pruning and the
launch rules are test_triton_launch.py's.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import hyperkernels as hk
from conftest import TRITON_DEVICE, assert_compiles_without_graph_break, needs_gpu, needs_triton
from hyperkernels._dispatch import get_backend, resolve_backend
from hyperkernels.activations import get_activation
from hyperkernels.ops import batched_linear_backward_op, batched_linear_op
from reference import FORWARD_RTOL, GRAD_RTOL, assert_close, conv1x1_reference, linear_reference

pytestmark = needs_triton
DEVICE = TRITON_DEVICE

ALL_ACTIVATIONS = [None, "relu", "gelu", "silu", "tanh", "sigmoid", "sine"]


def _module(name):
    import importlib

    return importlib.import_module(f"hyperkernels.backends.triton.{name}")


def _check(x, weight, bias, activation, dtype=torch.float32, conv=False, w0=2.0, grad=None, views=None):
    """Forward and every gradient of the triton backend against the float64 loop reference, from float64 leaves
    that are converted to ``dtype`` (so both see the same numbers). ``views`` maps the leaves to the
    ``(x, weight, bias)`` the op is given (strided views of them), the same for both."""
    leaves = [t for t in (x, weight, bias) if t is not None]
    low = [t.detach().to(dtype).to(DEVICE).requires_grad_() for t in leaves]
    ref = [t.detach().to(dtype).double().requires_grad_() for t in leaves]
    unpack = views or (lambda ts: (ts[0], ts[1], ts[2] if bias is not None else None))  # noqa: E731
    op = hk.batched_conv1x1 if conv else hk.batched_linear
    reference = conv1x1_reference if conv else linear_reference
    y = op(*unpack(low), activation=activation, w0=w0, backend="triton")
    y_ref = reference(*unpack(ref), activation=activation, w0=w0)
    assert y.dtype == dtype and y.is_contiguous()
    assert_close(y, y_ref, FORWARD_RTOL[dtype], "forward")
    g = torch.randn_like(y_ref).to(dtype) if grad is None else grad
    y.backward(g.to(DEVICE))
    y_ref.backward(g.double().expand_as(y_ref))
    for name, a, r in zip(("x", "weight", "bias"), low, ref):
        assert_close(a.grad, r.grad, GRAD_RTOL[dtype], f"grad of {name}")


# -- tile edges and the two regimes ---------------------------------------------------------------------


@pytest.mark.parametrize("conv", [False, True], ids=["token_major", "channel_major"])
@pytest.mark.parametrize("activation", ["gelu", "tanh"])
def test_gemm_tile_edges(conv, activation):
    """Every size one past a 32 tile, a second M tile (65), and K running two iterations with a masked tail."""
    b, n, k, m = 2, 33, 33, 65
    x = torch.randn(b, k, n) if conv else torch.randn(b, n, k)
    _check(x, torch.randn(b, m, k) / k**0.5, torch.randn(b, m), activation, conv=conv)


@pytest.mark.parametrize("conv", [False, True], ids=["token_major", "channel_major"])
@pytest.mark.parametrize("activation", ["relu", "silu", "sine"])
def test_gemv_several_samples_per_program(conv, activation):
    """N = 1 with B = 7 (not a multiple of the 4 samples per program) and M, K one past the 32 tile."""
    b, k, m = 7, 33, 33
    x = torch.randn(b, k, 1) if conv else torch.randn(b, k)
    _check(x, torch.randn(b, m, k) / k**0.5, torch.randn(b, m), activation, conv=conv)


@pytest.mark.parametrize("n", [1, 3])
def test_transposed_weight_and_strided_x(n):
    """A transposed weight (stride 1 along M) and an x whose innermost stride is 3."""
    b, k, m = 5, 20, 37
    weight = (torch.randn(b, k, m) / k**0.5).transpose(1, 2)
    x = torch.randn(b, n, 3 * k)[..., ::3]
    _check(x, weight, torch.randn(b, m), "sigmoid")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("n", [1, 17], ids=["gemv", "gemm"])
@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_half_precision(dtype, n, activation):
    """float16 and bfloat16 in both regimes and every activation (bfloat16 tl.dot is upcast under the
    interpreter, Triton issue 11584), x with inner stride 2, and for N = 1 the weight and bias as views of one
    flat row at an odd offset. The generic backend suite's dtype cases use shapes the interpreter skips: this is
    where half precision is checked on CPU."""
    b, k, m = 3, 33, 17
    x = torch.randn(b, n, 2 * k)
    if n == 1:
        flat = torch.randn(b, 1 + m * k + m + 2)
        flat[:, 1 : 1 + m * k] /= k**0.5

        def views(ts):
            return ts[0][..., ::2], ts[1][:, 1 : 1 + m * k].view(b, m, k), ts[1][:, 1 + m * k : 1 + m * k + m]

        _check(x, flat, None, activation, dtype=dtype, w0=1.5, views=views)
    else:
        _check(x, torch.randn(b, m, k) / k**0.5, torch.randn(b, m), activation, dtype=dtype, w0=1.5,
               views=lambda ts: (ts[0][..., ::2], ts[1], ts[2]))


# -- the backward's variants ----------------------------------------------------------------------------


@pytest.mark.parametrize("conv", [False, True], ids=["token_major", "channel_major"])
@pytest.mark.parametrize("n", [1, 5], ids=["gemv", "gemm"])
@pytest.mark.parametrize("activation", ["gelu", "silu", "sine"])
def test_backward_recomputes_preact(conv, n, activation):
    """A forward without grad mode keeps no pre-activation; the backward recomputes it, with the bias."""
    b, k, m = 3, 6, 7
    x = torch.randn(b, k, n) if conv else torch.randn(b, n, k)
    w, bias = torch.randn(b, m, k) / 2, torch.randn(b, m)
    x, w, bias = x.to(DEVICE), w.to(DEVICE), bias.to(DEVICE)
    y, preact = batched_linear_op(x, w, bias, activation, 2.0, conv, False, "triton")
    assert preact.numel() == 0
    dy = torch.randn_like(y)
    dx, dw, db = batched_linear_backward_op(dy, x, w, bias, y, preact, activation, 2.0, conv, [True, True, True],
                                            "triton")
    xr, wr, br = (t.detach().cpu().double().requires_grad_() for t in (x, w, bias))
    reference = conv1x1_reference if conv else linear_reference
    reference(xr, wr, br, activation, 2.0).backward(dy.cpu().double())
    for name, got, want in (("dx", dx, xr.grad), ("dweight", dw, wr.grad), ("dbias", db, br.grad)):
        assert_close(got, want, GRAD_RTOL[torch.float32], name)


@pytest.mark.parametrize("n", [1, 9], ids=["gemv", "gemm"])
@pytest.mark.parametrize(
    "mask", [(True, False, False), (False, True, False), (False, False, True), (False, True, True)],
    ids=["dx", "dw", "db", "dw_db"],
)
def test_backward_output_mask(n, mask):
    """Each gradient alone (the dW kernel without dW computes db only) matches the full backward's."""
    b, k, m = 4, 9, 10
    args = [torch.randn(b, n, k), torch.randn(b, m, k) / 3, torch.randn(b, m)]
    x, w, bias = (t.to(DEVICE) for t in args)
    y, preact = batched_linear_op(x, w, bias, "silu", 1.0, False, True, "triton")
    dy = torch.randn_like(y)
    full = batched_linear_backward_op(dy, x, w, bias, y, preact, "silu", 1.0, False, [True, True, True], "triton")
    part = batched_linear_backward_op(dy, x, w, bias, y, preact, "silu", 1.0, False, list(mask), "triton")
    for need, f, p in zip(mask, full, part):
        if need:
            torch.testing.assert_close(p, f)
        else:
            assert p.numel() == 0


@pytest.mark.parametrize("n", [1, 4], ids=["gemv", "gemm"])
def test_expanded_grad_y(n):
    """y.sum().backward() hands the backward an all-stride-0 gradient."""
    b, k, m = 3, 5, 6
    _check(torch.randn(b, n, k), torch.randn(b, m, k), torch.randn(b, m), "relu",
           grad=torch.ones(()).expand(b, n, m))


@pytest.mark.parametrize("conv", [False, True], ids=["token_major", "channel_major"])
@pytest.mark.parametrize("bias", ["shared", "per_sample", "none"])
def test_shared_weight_with_one_token_folds_the_batch(conv, bias):
    """N = 1 and an expanded weight run as one GEMM over B = 37 rows (two row tiles); the bias stays per row."""
    b, k, m = 37, 8, 12
    w = (torch.randn(1, m, k) / 3).expand(b, m, k)
    bias_t = {"shared": torch.randn(1, m).expand(b, m), "per_sample": torch.randn(b, m), "none": None}[bias]
    x = torch.randn(b, k, 1) if conv else torch.randn(b, k)
    _check(x, w, bias_t, "tanh", conv=conv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_split_dw_reduction(monkeypatch, dtype):
    """The dW kernel split over slices of the tokens (float32 partial sums added up after) gives the same
    gradients. On a GPU it splits by itself when B is small and N large; here it is told to."""
    monkeypatch.setattr(_module("linear"), "_dw_splits", lambda *args: 3)
    b, n, k, m = 2, 300, 7, 5  # 300 tokens: slices of 128, 128 and 44
    _check(torch.randn(b, n, k), torch.randn(b, m, k) / 3, torch.randn(b, m), "sine", dtype=dtype, w0=1.0)


def test_int64_offsets(monkeypatch):
    """The INDEX64 variants (one sample over 2^31 elements) compute the same as the int32 ones: forced here by
    lowering the threshold, since such a sample does not fit in a CI machine."""
    monkeypatch.setattr(_module("_launch"), "INT32_MAX", 8)
    for n in (1, 6):
        _check(torch.randn(3, n, 9), torch.randn(3, 5, 9) / 3, torch.randn(3, 5), "gelu")


# -- the op layer: opcheck, torch.compile ----------------------------------------------------------------


@pytest.mark.parametrize("channel_major", [False, True], ids=["token_major", "channel_major"])
@pytest.mark.parametrize("activation, save_preact", [("tanh", False), ("silu", True)])
def test_opcheck_one_token(channel_major, activation, save_preact):
    """opcheck of both ops in the GEMV regime (tests/ops/ covers N = 7) with a bfloat16 flat weight buffer."""
    b, m, k = 5, 6, 4
    flat = torch.randn(b, 1 + m * k + m, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    weight, bias = flat[:, 1 : 1 + m * k].view(b, m, k), flat[:, 1 + m * k :]
    shape = (b, k, 1) if channel_major else (b, 1, k)
    x = torch.randn(shape, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    torch.library.opcheck(batched_linear_op, (x, weight, bias, activation, 2.0, channel_major, save_preact, "triton"))
    y, preact = batched_linear_op(x, weight, bias, activation, 2.0, channel_major, save_preact, "triton")
    args = (torch.randn_like(y), x, weight, bias, y.detach(), preact.detach(), activation, 2.0, channel_major,
            [True, True, True], "triton")
    torch.library.opcheck(batched_linear_backward_op, args)


def _compile_check(fn, args):
    assert_compiles_without_graph_break(fn, [a.to(DEVICE).requires_grad_() for a in args])


def _mlp_args():
    return [torch.randn(3, 5, 4), torch.randn(3, 6, 4) / 2, torch.randn(3, 6), torch.randn(3, 2, 6) / 2,
            torch.randn(3, 2)]


def test_torch_compile_fullgraph_of_the_ops():
    """A two-layer per-sample MLP on the triton kernels compiles to one graph and matches eager, with grads."""

    def mlp(x, w1, b1, w2, b2):
        h, _ = batched_linear_op(x, w1, b1, "gelu", 30.0, False, True, "triton")
        return batched_linear_op(h, w2, b2, "sigmoid", 30.0, False, False, "triton")[0]

    _compile_check(mlp, _mlp_args())


def test_torch_compile_fullgraph_with_backend_triton():
    def mlp(x, w1, b1, w2, b2):
        h = hk.batched_linear(x, w1, b1, activation="gelu", backend="triton")
        return hk.batched_linear(h, w2, b2, activation="sigmoid", backend="triton")

    _compile_check(mlp, _mlp_args())


# -- backend selection and support -----------------------------------------------------------------------


def test_auto_picks_triton_on_cuda_only_for_its_dtypes():
    """The rule needs no GPU to be checked: it looks at the device type, the dtype and availability."""
    common = dict(op="batched_linear")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_backend("auto", device=cuda, dtype=torch.float32, empty=True, **common) == "torch_bmm"
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert resolve_backend("auto", device=cuda, dtype=dtype, **common) == "triton"
        assert resolve_backend("auto", device=cpu, dtype=dtype, **common) == "torch_bmm"  # even when interpreting
    assert resolve_backend("auto", device=cuda, dtype=torch.float64, **common) == "torch_bmm"


def test_float64_is_a_clear_error():
    x, w = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 5, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        hk.batched_linear(x.to(DEVICE), w.to(DEVICE), backend="triton")
    assert "float64" in get_backend("triton").check_support(torch.device("cuda"), torch.float64)


def test_unavailable_reasons_say_how_to_get_it():
    """Without triton: "pip install triton". Without a GPU and without the interpreter: what it needs."""
    script = textwrap.dedent("""
        import sys, torch
        mode = sys.argv[1]
        if mode == "no_triton":
            sys.modules["triton"] = None  # makes `import triton` raise ImportError
        torch.cuda.is_available = lambda: False
        from hyperkernels._dispatch import available_backends
        print(available_backends()["triton"])
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    out = {}
    for mode in ("no_triton", "no_gpu"):
        res = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, env=env, cwd=root,
                             timeout=120)
        assert res.returncode == 0, res.stderr
        out[mode] = res.stdout
    assert "pip install triton" in out["no_triton"]
    assert "CUDA GPU" in out["no_gpu"] and "TRITON_INTERPRET=1" in out["no_gpu"]


# -- GPU, real sizes -------------------------------------------------------------------------------------


def _gpu_check(x, w, bias, activation, conv=False, samples=None):
    """Forward and gradients against a float64 bmm reference on the GPU (the loop reference would take minutes
    at these sizes); ``samples`` restricts the comparison to a few samples of a huge batch."""
    dtype = x.dtype
    leaves = [t.detach().requires_grad_() for t in (x, w, bias)]
    op = hk.batched_conv1x1 if conv else hk.batched_linear
    y = op(*leaves, activation=activation, backend="triton")
    dy = torch.randn_like(y)
    y.backward(dy)
    idx = slice(None) if samples is None else samples
    xr, wr, br = (t.detach()[idx].double().requires_grad_() for t in (x, w, bias))
    act = get_activation(activation)
    z = torch.baddbmm(br.unsqueeze(2), wr, xr) if conv else torch.baddbmm(br.unsqueeze(1), xr, wr.transpose(1, 2))
    y_ref = act.forward(z, 30.0)
    y_ref.backward(dy[idx].double())
    assert_close(y[idx], y_ref, FORWARD_RTOL[dtype], "forward")
    for name, leaf, ref in zip(("x", "weight", "bias"), leaves, (xr, wr, br)):
        assert_close(leaf.grad[idx], ref.grad, GRAD_RTOL[dtype], f"grad of {name}")


_GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@needs_gpu
@pytest.mark.parametrize("dtype", _GPU_DTYPES, ids=["float32", "float16", "bfloat16"])
def test_gpu_gemv_b4096_256x256(dtype):
    b, k, m = 4096, 256, 256
    x = torch.randn(b, 1, k, device="cuda", dtype=dtype)
    w = torch.randn(b, m, k, device="cuda", dtype=dtype) / k**0.5
    _gpu_check(x, w, torch.randn(b, m, device="cuda", dtype=dtype), "relu")


@needs_gpu
@pytest.mark.parametrize("dtype", _GPU_DTYPES, ids=["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("conv", [False, True], ids=["token_major", "channel_major"])
def test_gpu_gemm_b64_n1024_128x128(dtype, conv):
    b, n, k, m = 64, 1024, 128, 128
    x = torch.randn(b, k, n, device="cuda", dtype=dtype) if conv else torch.randn(b, n, k, device="cuda", dtype=dtype)
    w = torch.randn(b, m, k, device="cuda", dtype=dtype) / k**0.5
    _gpu_check(x, w, torch.randn(b, m, device="cuda", dtype=dtype), "gelu", conv=conv)


@needs_gpu
@pytest.mark.parametrize("n", [1, 2], ids=["gemv", "gemm"])
def test_gpu_batch_of_2_20_does_not_overflow_the_grid(n):
    b, k, m = 2**20, 16, 16
    x = torch.randn(b, n, k, device="cuda")
    w = torch.randn(b, m, k, device="cuda") / 4
    last = torch.arange(b - 64, b, device="cuda")
    _gpu_check(x, w, torch.randn(b, m, device="cuda"), "silu", samples=last)


@needs_gpu
def test_gpu_more_than_2_31_elements_index_in_int64():
    """x has B * N * K = 4100 * 1024 * 512 > 2^31 elements (4.3 GB in float16): the last samples' offsets
    overflow int32."""
    b, n, k, m = 4100, 1024, 512, 16
    x = torch.randn(b, n, k, device="cuda", dtype=torch.float16)
    assert x.numel() > 2**31
    w = torch.randn(b, m, k, device="cuda", dtype=torch.float16) / k**0.5
    last = torch.arange(b - 4, b, device="cuda")
    _gpu_check(x, w, torch.randn(b, m, device="cuda", dtype=torch.float16), "tanh", samples=last)


@needs_gpu
def test_gpu_split_dw_for_one_large_image():
    """B = 2, N = 2^18 pixels: the dW reduction splits over the tokens by itself."""
    assert _module("linear")._dw_splits(2, 64, 64, 2**18, torch.device("cuda")) > 1
    b, n, k, m = 2, 2**18, 64, 64
    x = torch.randn(b, k, n, device="cuda")
    w = torch.randn(b, m, k, device="cuda") / 8
    _gpu_check(x, w, torch.randn(b, m, device="cuda"), "sine", conv=True)
