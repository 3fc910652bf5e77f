"""The Triton backend's hyper_linear beyond the generic op suite (tests/ops/test_hyper_linear.py): half precision,
the split dG reduction, int64 offsets, all-stride-0 gradients and a shared h, the config pruning (under the
interpreter on CPU); and the GPU cases at real sizes, which skip without a GPU."""
import pytest
import torch

import hyperkernels as hk
from conftest import TRITON_DEVICE, TRITON_REASON, needs_gpu, needs_triton, run_hyper_linear_case
from hyperkernels.backends.torch import hyper_linear as torch_hyper
from reference import FORWARD_RTOL, GRAD_RTOL, assert_close


def _triton_module():
    from hyperkernels.backends.triton import hyper_linear

    return hyper_linear


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("n", [1, 4])
def test_triton_half_precision(dtype, n):
    run_hyper_linear_case(((3, n, 9, 17, 5), "gelu", dtype, True, True), "triton", TRITON_DEVICE)


@needs_triton
def test_triton_split_dg_reduction(monkeypatch):
    """The dG kernel split over slices of the rows (float32 partial sums added after) gives the same gradients.
    On a GPU it splits by itself when the output has few tiles; here it is told to."""
    monkeypatch.setattr(_triton_module(), "_dg_splits", lambda *args: 3)
    case = ((3, 100, 5, 4, 6), "relu", torch.float32, True, True)  # 300 rows: 128 + 128 + 44
    run_hyper_linear_case(case, "triton", TRITON_DEVICE)


@needs_triton
def test_triton_int64_offsets(monkeypatch):
    """The INDEX64 variants (a head spanning 2^31 elements) compute the same as the int32 ones: forced by
    lowering the threshold."""
    from hyperkernels.backends.triton import _launch

    monkeypatch.setattr(_launch, "INT32_MAX", 8)
    run_hyper_linear_case(((3, 2, 5, 4, 6), "tanh", torch.float32, True, True), "triton", TRITON_DEVICE)


@needs_triton
def test_triton_expanded_grad_and_shared_h():
    """y.sum().backward() hands the backward an all-stride-0 gradient; h expanded from one row has batch stride 0."""
    x, h0, head_weight0 = torch.randn(4, 3, 5), torch.randn(1, 6), torch.randn(4 * 5 + 4, 6) / 5
    grads = []
    for backend, device in (("triton", TRITON_DEVICE), ("torch_bmm", "cpu")):
        h, head_weight = h0.to(device).requires_grad_(), head_weight0.to(device).requires_grad_()
        y = hk.hyper_linear(x.to(device), h.expand(4, 6), head_weight, out_features=4, activation="sigmoid",
                            backend=backend)
        grads.append([g.cpu() for g in torch.autograd.grad(y.sum(), (h, head_weight))])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("r, c, pq", [(16384, 256, 32768), (16384, 128, 256), (3, 5, 7), (100000, 16, 1)])
@pytest.mark.parametrize("elem", [2, 4])
def test_triton_prune_keeps_fitting_configs(r, c, pq, elem):
    """The GPU config lists, pruned for a few problem sizes (pure Python: runs on any machine)."""
    if TRITON_REASON is not None and "not installed" in TRITON_REASON:
        pytest.skip(TRITON_REASON)
    from hyperkernels.backends.triton import _launch

    hl = _triton_module()

    class _Like:
        def element_size(self):
            return elem

    for roles in (("BLOCK_R", "BLOCK_C", "BLOCK_J"), ("BLOCK_C", "BLOCK_J", "BLOCK_R")):
        dims = {"BLOCK_R": "R", "BLOCK_C": "C", "BLOCK_J": "PQ"}
        prune = _launch.gemm_prune(*roles, dims, "g_ptr", not_16bit=hl._NOT_16BIT)
        kept = prune(hl._configs(*roles, interpret=False), {"R": r, "C": c, "PQ": pq, "g_ptr": _Like()})
        assert 1 <= len(kept) <= len(hl._TILES)
        for cfg in kept:
            kw = cfg.kwargs
            assert cfg.num_stages * (kw[roles[0]] + kw[roles[1]]) * kw[roles[2]] * elem <= _launch.SMEM_BUDGET


# -- GPU, real sizes -----------------------------------------------------------------------------------------


def _gpu_problem(b, n, i, o, k, dtype):
    torch.manual_seed(0)
    x = torch.randn(b, n, i, device="cuda", dtype=dtype)
    h = torch.randn(b, k, device="cuda", dtype=dtype, requires_grad=True)
    head_weight = (torch.randn(o * i + o, k, device="cuda") / (i * k) ** 0.5).to(dtype).requires_grad_()
    head_bias = (torch.randn(o * i + o, device="cuda") / i**0.5).to(dtype).requires_grad_()
    return x, h, head_weight, head_bias


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_gpu_issue_shape_matches_generate(dtype):
    """B = 16384, K = 128, 256x256, N = 1: triton against generate-then-bmm in float64 on a
    slice of samples (the float64 generate of all 16384 would need 4.3 GB x 2)."""
    b, n, i, o, k = 16384, 1, 256, 256, 128
    x, h, head_weight, head_bias = _gpu_problem(b, n, i, o, k, dtype)
    y = hk.hyper_linear(x, h, head_weight, head_bias, out_features=o, activation="relu", backend="triton")
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (h, head_weight, head_bias), dy)
    idx = slice(b - 512, b)  # the last samples: the largest offsets
    refs = [t.detach().double().requires_grad_() for t in (x[idx], h[idx], head_weight, head_bias)]
    y_ref = torch_hyper.reference_forward(*refs, o, True, hk.activations.get_activation("relu"), 30.0)
    assert_close(y[idx], y_ref, FORWARD_RTOL[dtype], "forward")
    ref_grads = torch.autograd.grad(y_ref, refs[1:], dy[idx].double())
    assert_close(grads[0][idx], ref_grads[0], GRAD_RTOL[dtype], "grad of h")
    # head gradients sum over all samples: compare against the float64 torch backend on all of them
    full = [t.detach().double().requires_grad_() for t in (x, h, head_weight, head_bias)]
    y64 = hk.hyper_linear(*full, out_features=o, activation="relu", backend="torch")
    g64 = torch.autograd.grad(y64, full[2:], dy.double())
    assert_close(grads[1], g64[0], GRAD_RTOL[dtype], "grad of head_weight")
    assert_close(grads[2], g64[1], GRAD_RTOL[dtype], "grad of head_bias")


@needs_gpu
def test_gpu_peak_memory_against_generate():
    """At B = 16384, N = 1, 256 -> 256, K = 128 (bfloat16) the fused forward + backward allocates under a tenth of generate-then-bmm's peak."""
    b, n, i, o, k = 16384, 1, 256, 256, 128
    x, h, head_weight, head_bias = _gpu_problem(b, n, i, o, k, torch.bfloat16)

    def peak(fn):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        y = fn()
        torch.autograd.grad(y, (h, head_weight, head_bias), torch.ones_like(y))
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    fused = peak(lambda: hk.hyper_linear(x, h, head_weight, head_bias, out_features=o, backend="triton"))
    generated = peak(lambda: hk.batched_linear(x, *torch_hyper.generate(h, head_weight, head_bias, o, i, True)))
    assert fused * 10 < generated, (fused, generated)


@needs_gpu
@pytest.mark.parametrize("n", [1, 3])
def test_gpu_batch_of_2_20_does_not_overflow_the_grid(n):
    b, i, o, k = 2**20, 16, 16, 8
    x, h, head_weight, head_bias = _gpu_problem(b, n, i, o, k, torch.float32)
    y = hk.hyper_linear(x, h, head_weight, head_bias, out_features=o, activation="silu", backend="triton")
    idx = slice(b - 64, b)
    refs = [t.detach().double() for t in (x[idx], h[idx], head_weight, head_bias)]
    y_ref = torch_hyper.reference_forward(*refs, o, True, hk.activations.get_activation("silu"), 30.0)
    assert_close(y[idx], y_ref, FORWARD_RTOL[torch.float32], "forward")
