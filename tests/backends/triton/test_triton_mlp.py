"""The Triton fused MLP's own cases, beyond the generic backend suite of tests/ops/test_mlp.py (which runs triton on
its small nets).

On CPU they run under the interpreter (conftest sets TRITON_INTERPRET=1 where there is no GPU), whose single
configs are 16 samples per GEMV program and 32 points per GEMM program: depths 1-5 with widths around the
padding edges (15, 16, 17, 33), width 256, B not a multiple of the samples per program, the chunked layer paths
(forced by shrinking the chunk budgets), the three ways the N > 1 backward reduces dW over the tiles of a sample,
shared and strided params, strided x, half precision, every activation, kept vs recomputed hidden values, int64
offsets, opcheck and torch.compile with backend="triton". The GPU cases at real sizes skip without a GPU.
"""
import itertools

import pytest
import torch

import hyperkernels as hk
from conftest import TRITON_DEVICE, assert_compiles_without_graph_break, needs_gpu, needs_triton
from hyperkernels._dispatch import get_backend, resolve_backend
from hyperkernels.ops import batched_mlp_backward_op, batched_mlp_op
from reference import FORWARD_RTOL, GRAD_RTOL, assert_close, mlp_reference, sequential_for

pytestmark = needs_triton
DEVICE = TRITON_DEVICE

ALL_ACTIVATIONS = [None, "relu", "gelu", "silu", "tanh", "sigmoid", "sine"]


def _next_pow2(n):
    return 1 << (int(n) - 1).bit_length()


def _module(name="mlp"):
    import importlib

    return importlib.import_module(f"hyperkernels.backends.triton.{name}")


def _random_rows(net, batch, act, out_act, w0):
    """One freshly initialised net per sample (as tests/ops/test_mlp.py does): activations stay in range at any depth;
    weights / w0 for sine so that rounding is not amplified w0-fold per layer."""
    from torch.nn.utils import parameters_to_vector

    scale = 1.0 / w0 if "sine" in (act, out_act) else 1.0
    rows = []
    for _ in range(batch):
        for p in net.parameters():
            p.data = torch.randn_like(p) * scale / max(1, p.shape[-1]) ** 0.5
        rows.append(parameters_to_vector(net.parameters()))
    return torch.stack(rows).detach()


def _params(flat64, kind, dtype):
    """(leaf, params view, function mapping the leaf's gradient to the (B, P) gradient of the view)."""
    batch, numel = flat64.shape
    if kind == "flat":
        leaf = flat64.to(dtype).to(DEVICE).requires_grad_()
        return leaf, leaf, lambda g: g
    if kind == "slice":  # a (B, P) window of a wider buffer, as a hypernetwork emitting several nets would give
        buf = torch.zeros(batch, numel + 7, dtype=torch.float64)
        buf[:, 3 : 3 + numel] = flat64
        leaf = buf.to(dtype).to(DEVICE).requires_grad_()
        return leaf, leaf[:, 3 : 3 + numel], lambda g: g[:, 3 : 3 + numel]
    if kind == "inner_stride":
        buf = torch.zeros(batch, 2 * numel, dtype=torch.float64)
        buf[:, ::2] = flat64
        leaf = buf.to(dtype).to(DEVICE).requires_grad_()
        return leaf, leaf[:, ::2], lambda g: g[:, ::2]
    if kind == "transposed":  # (P, B) storage: the parameter stride is B
        leaf = flat64.t().contiguous().to(dtype).to(DEVICE).requires_grad_()
        return leaf, leaf.t(), lambda g: g.t()
    raise ValueError(kind)


def _x(batch, n, k, kind, dtype):
    x = torch.randn(batch, n, k, dtype=torch.float64)
    if kind == "strided":
        x = torch.randn(batch, n, 3 * k, dtype=torch.float64)[..., ::3]
    elif kind == "transposed":
        x = torch.randn(batch, k, n, dtype=torch.float64).transpose(1, 2)
    return x.to(dtype)


def _check(sizes, batch, n, act="relu", out_act=None, dtype=torch.float32, bias=True, params="flat", x_kind="contig",
           w0=None, squeeze=False, grad=None):
    """Forward, dx and dparams of backend="triton" against the float64 loop over nn.Sequential (reference.py),
    from the same dtype-rounded numbers."""
    w0 = (30.0 if dtype == torch.float32 else 1.5) if w0 is None else w0
    net = sequential_for(sizes, act, out_act, w0, bias)
    layout = hk.ParamLayout.from_module(net)
    if params == "shared":
        row = _random_rows(net, 1, act, out_act, w0).to(dtype)
        leaf = row.to(DEVICE).requires_grad_()
        flat, to_flat_grad = leaf.expand(batch, layout.numel), None
        flat_values = row.double().expand(batch, layout.numel)
    else:
        flat_values = _random_rows(net, batch, act, out_act, w0).to(dtype).double()
        leaf, flat, to_flat_grad = _params(flat_values, params, dtype)
    x = _x(batch, n, sizes[0], x_kind, dtype)
    x_dev = x.to(DEVICE)
    if squeeze:
        x_dev = x_dev[:, 0]
    x_dev = x_dev.detach().requires_grad_()
    y = hk.batched_mlp(x_dev, flat, layout, activation=act, output_activation=out_act, w0=w0, backend="triton")
    grad_y = torch.randn((batch, n, sizes[-1]), dtype=torch.float64).to(dtype) if grad is None else grad
    y.backward((grad_y[:, 0] if squeeze else grad_y).to(DEVICE))
    y_ref, dx_ref, dflat_ref = mlp_reference(net, x.double(), flat_values, grad_y.double().expand(batch, n, sizes[-1]))
    if squeeze:
        y_ref, dx_ref = y_ref[:, 0], dx_ref[:, 0]
    depth = len(sizes)
    assert y.dtype == dtype and y.is_contiguous() and y.shape == y_ref.shape
    assert_close(y, y_ref, FORWARD_RTOL[dtype] * depth, "forward")
    assert_close(x_dev.grad, dx_ref, GRAD_RTOL[dtype] * depth, "dx")
    if params == "shared":
        assert_close(leaf.grad, dflat_ref.sum(0, keepdim=True), GRAD_RTOL[dtype] * depth, "dparams (shared)")
    else:
        assert_close(to_flat_grad(leaf.grad), dflat_ref, GRAD_RTOL[dtype] * depth, "dparams")
        outside = leaf.grad.clone()
        to_flat_grad(outside).zero_()
        assert not outside.any(), "gradient leaked outside the params view"


# -- depths, widths, the two regimes --------------------------------------------------------------------

# Depths 1-5, widths around the padding edges (a layer of 15 and of 16 both pad to 16, 17 and 33 to 32 and 64).
EDGE_NETS = [
    [17, 15],
    [16, 17, 33],
    [33, 16, 15, 17],
    [15, 33, 17, 16, 1],
    [1, 17, 16, 33, 15, 2],
]


@pytest.mark.parametrize("n", [1, 20], ids=["gemv", "gemm"])
@pytest.mark.parametrize("sizes", EDGE_NETS, ids=lambda s: "-".join(map(str, s)))
def test_depths_and_padding_edges(sizes, n):
    depth = len(sizes) - 1
    act, out_act = ALL_ACTIVATIONS[depth + 1], ALL_ACTIVATIONS[(depth + 3) % 7]
    _check(sizes, 3, n, act, out_act, bias=depth != 3)


@pytest.mark.parametrize("n", [1, 9], ids=["gemv", "gemm"])
def test_width_256(n):
    """The widest layers the kernels take; the GEMM path cuts them into chunks of rows (16 KiB / 2048-element
    budgets), so this also runs the chunked forward and backward."""
    _check([7, 256, 256, 3], 2, n, "silu", None)


def test_wider_than_256_is_a_clear_error():
    layout = hk.ParamLayout.from_module(sequential_for([3, 257, 2], "relu", None))
    with pytest.raises(ValueError, match="widths up to 256"):
        hk.batched_mlp(torch.randn(2, 3, device=DEVICE), torch.randn(2, layout.numel, device=DEVICE), layout,
                       backend="triton")


def test_gemv_batch_not_a_multiple_of_the_block():
    """B = 19 with 16 samples per program: a full program and a masked one, through both squeezed (B, in) and
    (B, 1, in) inputs."""
    _check([5, 33, 16, 3], 19, 1, "tanh", "sigmoid", squeeze=True)
    _check([5, 33, 16, 3], 17, 1, "gelu", None)


def test_gemv_chunked_layers(monkeypatch):
    """Layers cut into chunks of 4 rows (the path of wide layers on a GPU): the forward puts each chunk's output
    in place, the backward takes each chunk's dz out of the full one."""
    monkeypatch.setattr(_module("mlp_tiles"), "gemv_chunks",
                        lambda pads, block_b, tile: tuple(min(m, 4) for m in pads[1:]))
    _check([6, 33, 17, 5], 5, 1, "sine", "tanh", w0=2.0)


def test_gemm_chunked_layers(monkeypatch):
    """The GEMM layers cut into chunks of 16 rows in the forward, the backward's recomputed forward and dW."""
    tiles = _module("mlp_tiles")
    monkeypatch.setattr(tiles, "FWD_W_CHUNK_BYTES", 16 * 64 * 4)
    monkeypatch.setattr(tiles, "BWD_W_CHUNK_BYTES", 16 * 64 * 4)
    monkeypatch.setattr(tiles, "BWD_DW_CHUNK", 16 * 64)
    _check([6, 64, 33, 5], 2, 40, "gelu", "sigmoid")


# -- the dW reduction over the tiles of a sample (N > 1) --------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("mode", [(False, 1), (True, 1), (False, 3)], ids=["one_program", "atomic", "three_splits"])
def test_dw_reduction_modes(monkeypatch, mode, dtype):
    """N = 100 is 4 tiles of 32 points per sample: one program adding them up in its own row (the default when the
    samples fill the GPU, and on CPU), one program per tile with float32 atomics into a zeroed buffer, and three
    splits of a (B, 3, P) float32 buffer summed after. bfloat16 goes through a float32 buffer in every mode."""
    monkeypatch.setattr(_module(), "_dw_mode", lambda batch, n, need_dw, device: mode if need_dw else (True, 1))
    _check([3, 17, 33, 2], 2, 100, "silu", None, dtype=dtype)


def test_deterministic_mode_splits_and_repeats_bitwise(monkeypatch):
    """With torch.use_deterministic_algorithms(True) and too few samples to fill the device, the backward splits
    each sample's tiles over programs with fixed-order sums: two runs give identical bits."""
    mlp = _module()
    monkeypatch.setattr(mlp, "_programs_wanted", lambda device: 8)
    assert mlp._dw_mode(2, 300, True, torch.device(DEVICE)) == (True, 1)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert mlp._dw_mode(2, 300, True, torch.device(DEVICE)) == (False, 2)
        layout = hk.ParamLayout.from_module(sequential_for([3, 16, 2], "tanh", None))
        x = torch.randn(2, 300, 3, device=DEVICE)
        flat = (torch.randn(2, layout.numel, device=DEVICE) / 3).requires_grad_()
        grads = []
        for _ in range(2):
            flat.grad = None
            hk.batched_mlp(x, flat, layout, activation="tanh", backend="triton").square().sum().backward()
            grads.append(flat.grad.clone())
        assert torch.equal(grads[0], grads[1])
    finally:
        torch.use_deterministic_algorithms(previous)
    _check_against_torch_backend([3, 16, 2], x, flat.detach(), "tanh", None, grads[0])


def _check_against_torch_backend(sizes, x, flat, act, out_act, dflat):
    layout = hk.ParamLayout.from_module(sequential_for(sizes, act, out_act))
    ref = flat.detach().cpu().double().requires_grad_()
    hk.batched_mlp(x.cpu().double(), ref, layout, activation=act, output_activation=out_act,
                   backend="torch").square().sum().backward()
    assert_close(dflat, ref.grad, GRAD_RTOL[torch.float32], "dparams")


# -- params and x in any strides --------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 5], ids=["gemv", "gemm"])
def test_shared_params(n):
    """One parameter row expanded over the batch (batch stride 0): read in place, its gradient the sum over samples
    (autograd's expand backward). With N = 1 the batch folds into the points of one GEMM."""
    _check([4, 33, 3], 37, n, "gelu", "tanh", params="shared")


@pytest.mark.parametrize("n", [1, 7], ids=["gemv", "gemm"])
@pytest.mark.parametrize("params, x_kind", [("slice", "strided"), ("inner_stride", "transposed"),
                                            ("transposed", "contig")])
def test_strided_params_and_x(n, params, x_kind):
    _check([5, 17, 4], 3, n, "sigmoid", None, params=params, x_kind=x_kind)


@pytest.mark.parametrize("n", [1, 4], ids=["gemv", "gemm"])
def test_expanded_grad_y(n):
    """y.sum().backward() hands the backward an all-stride-0 gradient."""
    _check([3, 9, 2], 3, n, "relu", None, grad=torch.ones(()).expand(3, n, 2))


# -- dtypes, activations ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("n", [1, 17], ids=["gemv", "gemm"])
@pytest.mark.parametrize("act", ["gelu", "sine", "tanh"])
def test_half_precision(dtype, n, act):
    """bfloat16 tl.dot is upcast under the interpreter (Triton issue 11584)."""
    _check([5, 33, 17, 3], 3, n, act, "sigmoid", dtype=dtype)


@pytest.mark.parametrize("n", [1, 6], ids=["gemv", "gemm"])
@pytest.mark.parametrize("act, out_act", list(zip(ALL_ACTIVATIONS, ALL_ACTIVATIONS[3:] + ALL_ACTIVATIONS[:3])))
def test_every_activation_and_output_activation(n, act, out_act):
    _check([3, 16, 17, 2], 2, n, act, out_act, w0=2.0)


# -- the op layer: kept values, output mask, opcheck, torch.compile ----------------------------------------


def _op_args(sizes, batch, n, act, out_act, save, dtype=torch.float32):
    layout = hk.ParamLayout.from_module(sequential_for(sizes, act, out_act))
    spec = layout.mlp_spec()
    x = torch.randn(batch, n, sizes[0], device=DEVICE, dtype=dtype, requires_grad=True)
    flat = (torch.randn(batch, layout.numel, device=DEVICE) / 3).to(dtype).requires_grad_()
    return (x, flat, spec.sizes, spec.weight_offsets, spec.bias_offsets, act, out_act, 2.0, save, "triton")


@pytest.mark.parametrize("n", [1, 7], ids=["gemv", "gemm"])
@pytest.mark.parametrize("act, out_act", [("gelu", "tanh"), ("relu", "silu")])
def test_kept_values_match_the_torch_backend_and_the_recompute(n, act, out_act):
    """save_layers: each layer's kept value is what MLPSpec.saved_kinds says, and the backward from them
    equals the backward that recomputes them."""
    args = _op_args([3, 16, 17, 2], 3, n, act, out_act, True)
    y, saved = batched_mlp_op(*args)
    y_t, saved_t = batched_mlp_op(*args[:-1], "torch_bmm")
    torch.testing.assert_close(y, y_t)
    assert [s.shape for s in saved] == [s.shape for s in saved_t]
    for s, t in zip(saved, saved_t):
        torch.testing.assert_close(s, t)
    x, flat = args[:2]
    dy = torch.randn_like(y)
    rest = (*args[2:8], [True, True], "triton")
    kept = batched_mlp_backward_op(dy, x, flat, y.detach(), [s.detach() for s in saved], *rest)
    recomputed = batched_mlp_backward_op(dy, x, flat, y.detach(), [], *rest)
    for a, b in zip(kept, recomputed):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("n", [1, 9], ids=["gemv", "gemm"])
@pytest.mark.parametrize("mask", [(True, False), (False, True)], ids=["dx", "dparams"])
def test_backward_output_mask(n, mask):
    args = _op_args([4, 17, 3], 3, n, "silu", "none", False)
    y, _ = batched_mlp_op(*args)
    dy = torch.randn_like(y)
    full = batched_mlp_backward_op(dy, args[0], args[1], y, [], *args[2:8], [True, True], "triton")
    part = batched_mlp_backward_op(dy, args[0], args[1], y, [], *args[2:8], list(mask), "triton")
    for need, f, p in zip(mask, full, part):
        if need:
            torch.testing.assert_close(p, f)
        else:
            assert p.numel() == 0


@pytest.mark.parametrize("n, save, dtype", [(1, True, torch.bfloat16), (1, False, torch.float32),
                                            (5, True, torch.float32), (5, False, torch.bfloat16)],
                         ids=["gemv-keep-bfloat16", "gemv-float32", "gemm-keep-float32", "gemm-bfloat16"])
def test_opcheck(n, save, dtype):
    args = _op_args([3, 8, 2], 2, n, "gelu", "tanh", save, dtype)
    torch.library.opcheck(batched_mlp_op, args)
    y, saved = batched_mlp_op(*args)
    bargs = (torch.randn_like(y), args[0], args[1], y.detach(), [s.detach() for s in saved], *args[2:8],
             [True, True], "triton")
    torch.library.opcheck(batched_mlp_backward_op, bargs)


def _compile_check(fn, args):
    assert_compiles_without_graph_break(fn, [a.to(DEVICE).requires_grad_() for a in args])


def _compile_args():
    return [torch.randn(2, 1, 3), torch.randn(2, 5, 3), torch.randn(2, 98) / 3]


def test_torch_compile_fullgraph_of_the_op():
    """The op on backend="triton", N = 1 and N > 1, compiles to one graph and matches eager, with grads."""
    spec = hk.ParamLayout.from_module(sequential_for([3, 16, 2], "gelu", None)).mlp_spec()
    assert spec.numel == 98

    def fn(x1, xn, flat):
        common = (spec.sizes, spec.weight_offsets, spec.bias_offsets, "gelu", "none", 30.0, False, "triton")
        return batched_mlp_op(x1, flat, *common)[0].sum() + batched_mlp_op(xn, flat, *common)[0].square().sum()

    _compile_check(fn, _compile_args())


def test_torch_compile_fullgraph_of_batched_mlp():
    mlp = hk.nn.BatchedMLP([3, 16, 2], activation="gelu", backend="triton")
    _compile_check(lambda x1, xn, flat: mlp(x1[:, 0], flat).sum() + mlp(xn, flat).square().sum(), _compile_args())


def test_int64_offsets(monkeypatch):
    """The INDEX64 variants (one sample over 2^31 elements) compute the same as the int32 ones: forced by lowering
    the threshold, since such a sample does not fit in a CI machine."""
    monkeypatch.setattr(_module("_launch"), "INT32_MAX", 8)
    for n in (1, 6):
        _check([9, 17, 5], 3, n, "gelu", None)


# -- backend selection and the autotune pruning (pure Python) -----------------------------------------------


def test_one_width_limit():
    """The backend object's limit, which the dispatcher reads, is the kernels': the widest key of the tile tables."""
    tiles = _module("mlp_tiles")
    limit = get_backend("triton").mlp_max_width
    assert hk._dispatch._mlp_max_width("triton") == limit
    for table in (tiles.GEMM_FWD_CANDIDATES, tiles.GEMM_BWD_CANDIDATES):
        assert max(width for width, _ in table) == limit


def test_auto_picks_triton_on_cuda_only_where_the_kernels_apply():
    common = dict(op="batched_mlp")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert resolve_backend("auto", device=cuda, dtype=dtype, widths=(8, 256, 8), **common) == "triton"
        assert resolve_backend("auto", device=cuda, dtype=dtype, widths=(8, 257, 8), **common) == "torch_bmm"
        assert resolve_backend("auto", device=cpu, dtype=dtype, widths=(8, 8), **common) == "torch_bmm"
    assert resolve_backend("auto", device=cuda, dtype=torch.float64, **common) == "torch_bmm"


class _Like:
    def __init__(self, size):
        self.size = size

    def element_size(self):
        return self.size


@pytest.mark.parametrize("sizes", [[1, 1], [16, 64, 64, 64, 16], [2, 128, 128, 128, 3], [256, 256, 256]])
@pytest.mark.parametrize("batch", [1, 3, 16384])
def test_gemv_prune_keeps_fitting_configs(sizes, batch):
    tiles = _module("mlp_tiles")
    pads = tuple(tiles.pad(s) for s in sizes)
    kept = tiles.gemv_prune(tiles.gemv_configs(interpret=False), {"PADS": pads, "B": batch})
    assert kept
    biggest = max(k * m for k, m in zip(pads[:-1], pads[1:]))
    for cfg in kept:
        bb = cfg.kwargs["BLOCK_B"]
        assert bb <= _next_pow2(batch) and (bb == 1 or bb * biggest <= cfg.kwargs["TILE"])


@pytest.mark.parametrize("sizes", [[2, 64, 64, 64, 3], [2, 128, 128, 128, 3], [256, 256, 256, 256]])
@pytest.mark.parametrize("n", [2, 100, 1024, 2**18])
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_gemm_prune_keeps_few_fitting_configs(sizes, n, backward):
    tiles = _module("mlp_tiles")
    table = tiles.GEMM_BWD_CONFIGS if backward else tiles.GEMM_FWD_CONFIGS
    prune = tiles.gemm_prune(backward)
    for elem in (2, 4):
        kept = prune(tiles.gemm_configs(table, interpret=False),
                     {"N": n, "PADS": tuple(tiles.pad(s) for s in sizes), "x_ptr": _Like(elem)})
        assert 1 <= len(kept) <= 3
        assert all(c.kwargs["BLOCK_N"] <= max(16, _next_pow2(n)) for c in kept)


def test_chunks_divide_the_padded_widths():
    tiles = _module("mlp_tiles")
    for pads in itertools.product([16, 32, 64, 128, 256], repeat=2):
        for elems in (1, 256, 2048, 8192, 2**16):
            for c, m in zip(tiles.chunks(pads, elems), pads[1:]):
                assert m % c == 0 and c >= 16
            for c, m in zip(tiles.gemv_chunks(pads, 4, elems), pads[1:]):
                assert m % c == 0 and c >= 1


# -- GPU, real sizes ------------------------------------------------------------------------------------------


def _gpu_check(sizes, batch, n, dtype, act="relu", samples=None):
    """Forward and gradients against the float64 torch backend on the GPU (the loop reference would take minutes
    at these sizes); ``samples`` restricts the reference to a few samples of a huge batch."""
    net = sequential_for(sizes, act, None)
    layout = hk.ParamLayout.from_module(net)
    flat = (torch.randn(batch, layout.numel, device="cuda") / max(sizes) ** 0.5).to(dtype).requires_grad_()
    x = torch.randn(batch, n, sizes[0], device="cuda", dtype=dtype, requires_grad=True)
    y = hk.batched_mlp(x, flat, layout, activation=act, backend="triton")
    dy = torch.randn_like(y)
    y.backward(dy)
    idx = slice(None) if samples is None else samples
    xr, fr = x.detach()[idx].double().requires_grad_(), flat.detach()[idx].double().requires_grad_()
    y_ref = hk.batched_mlp(xr, fr, layout, activation=act, backend="torch")
    y_ref.backward(dy[idx].double())
    depth = len(sizes)
    assert_close(y[idx], y_ref, FORWARD_RTOL[dtype] * depth, "forward")
    assert_close(x.grad[idx], xr.grad, GRAD_RTOL[dtype] * depth, "dx")
    assert_close(flat.grad[idx], fr.grad, GRAD_RTOL[dtype] * depth, "dparams")


@needs_gpu
def test_gpu_n1_b16384_16_64_64_64_16_float32():
    _gpu_check([16, 64, 64, 64, 16], 16384, 1, torch.float32)


@needs_gpu
@pytest.mark.parametrize("width", [64, 128])
def test_gpu_field_b128_n1024_bfloat16(width):
    _gpu_check([2, width, width, width, 3], 128, 1024, torch.bfloat16, act="gelu")


@needs_gpu
def test_gpu_batch_of_2_20_does_not_overflow_the_grid():
    last = torch.arange(2**20 - 64, 2**20, device="cuda")
    _gpu_check([4, 16, 16, 2], 2**20, 1, torch.float32, act="silu", samples=last)
