"""The Triton backend's shared launch rules (``_launch.py``), its backend object, and the GEMM / GEMV config pruning
of the per-sample linear kernels: pure Python, checked on any machine, plus the empty problems the backend object
routes to the torch backend (run under the interpreter on CPU).
"""
import ast
import importlib
import itertools
import os

import pytest
import torch

import hyperkernels as hk
from conftest import TRITON_DEVICE, TRITON_REASON, needs_triton
from hyperkernels.ops import (
    batched_linear_backward_op,
    batched_linear_op,
    batched_mlp_backward_op,
    batched_mlp_op,
    hyper_linear_backward_op,
    hyper_linear_op,
)
from reference import (
    FORWARD_RTOL,
    GRAD_RTOL,
    assert_close,
    hyper_linear_reference,
    linear_reference,
    mlp_reference,
    sequential_for,
)

DEVICE = TRITON_DEVICE
PACKAGE_DIR = os.path.dirname(importlib.import_module("hyperkernels.backends.triton").__file__)

needs_triton_module = pytest.mark.skipif(TRITON_REASON is not None and "not installed" in TRITON_REASON,
                                         reason=f"triton is not installed: {TRITON_REASON}")


def _module(name):
    return importlib.import_module(f"hyperkernels.backends.triton.{name}")


class _Like:
    """Stands for a tensor argument in a pruning call: only its element size is read."""

    def __init__(self, size):
        self.size = size

    def element_size(self):
        return self.size


# -- the module layout ----------------------------------------------------------------------------------


def test_no_file_imports_a_private_name_from_a_sibling():
    """Shared helpers are public names (of ``_launch.py``, ``_jit.py``, ``mlp_tiles.py``...): a file that needs a
    sibling's underscore name is a helper that belongs in the core."""
    offenders = []
    for name in sorted(os.listdir(PACKAGE_DIR)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(PACKAGE_DIR, name)) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module is not None:
                offenders += [f"{name}: from .{node.module} import {a.name}" for a in node.names
                              if a.name.startswith("_")]
    assert not offenders, offenders
    assert len([n for n in os.listdir(PACKAGE_DIR) if n.endswith(".py")]) >= 10  # the walk saw the package


def test_make_backend_has_no_variants():
    from hyperkernels.backends.triton import TritonBackend, make_backend

    assert isinstance(make_backend(None), TritonBackend)
    with pytest.raises(ValueError, match=r"variant: the triton backend has no variants \(expected None\), got 'bmm'"):
        make_backend("bmm")


# -- grid, index width, splits ----------------------------------------------------------------------------


@needs_triton_module
def test_check_grid_names_the_limit():
    launch = _module("_launch")
    assert launch.check_grid(2**31 - 1) == 2**31 - 1
    with pytest.raises(ValueError, match=r"problem too large for one launch: 2147483648 programs > 2147483647"):
        launch.check_grid(2**31)


@needs_triton_module
def test_index64_counts_offsets_inside_a_sample_or_a_whole_operand():
    """Meta tensors: only sizes and strides are read, so views spanning 2^31 elements cost nothing."""
    launch = _module("_launch")
    many_small = torch.empty(2**16, 2**16, device="meta")  # 2^32 elements, 2^16 per sample
    one_large = torch.empty(2, 2**16, 2**15 + 1, device="meta")  # one sample over 2^31 elements
    assert not launch.sample_index64(many_small) and launch.index64(many_small)
    assert launch.sample_index64(one_large) and launch.index64(one_large)
    assert not launch.sample_index64(one_large[:, :2**15])  # 2^15 * (2^15 + 1) - 1 < 2^31 - 1
    assert not launch.sample_index64(torch.empty(1, 2**31 - 1, device="meta"))  # the largest int32 offset: 2^31 - 2
    assert launch.sample_index64(torch.empty(1, 2**31 + 1, device="meta"))
    assert not launch.index64(None, torch.empty(3, 4, device="meta"))


@needs_triton_module
@pytest.mark.parametrize("rows", [1, 127, 128, 300, 1000, 8193, 2**18 + 5])
@pytest.mark.parametrize("wanted", [1, 2, 3, 7, 64])
def test_split_rows_covers_every_row_in_whole_tiles(rows, wanted):
    splits, per_split = _module("_launch").split_rows(rows, wanted)
    assert 1 <= splits <= wanted
    assert splits * per_split >= rows > (splits - 1) * per_split  # every row, and no empty slice
    assert per_split % 128 == 0 or splits == 1


@needs_triton_module
def test_split_count_only_when_the_gpu_would_idle(monkeypatch):
    launch = _module("_launch")
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert launch.split_count(1, 2**20, cpu) == 1  # the interpreter: parallelism is moot
    monkeypatch.setattr(launch, "device_sms", lambda device: None if device.type == "cpu" else 132)
    assert launch.split_count(1, 2**20, gpu) == 4 * 132  # one tile: 4 programs per SM
    assert launch.split_count(4, 1600, gpu) == 1600 // launch.MIN_ROWS_PER_SPLIT  # rows bound it
    assert launch.split_count(4, 1023, gpu) == 1  # fewer than two splits' worth of rows
    assert launch.split_count(264, 2**20, gpu) == 1  # two tiles per SM already
    assert launch.programs_to_fill(gpu) == 4 * 132 and launch.programs_to_fill(cpu) == 1


@needs_triton_module
def test_autotuning_off_keeps_the_first_config(monkeypatch):
    launch = _module("_launch")
    config = _module("_config")
    monkeypatch.setattr(config, "AUTOTUNE", True)
    assert launch.autotune_keep(list("abcdef"), 4) == list("abcd") and launch.autotune_keep(list("abc")) == list("abc")
    monkeypatch.setattr(config, "AUTOTUNE", False)
    assert launch.autotune_keep(list("abcdef"), 4) == ["a"]


# -- float32 dot precision (the GPU's choice, checked by emulating its rounding on CPU) -------------------


def _round_tf32(x):
    """float32 -> the nearest TF32 value (10 mantissa bits, ties away from zero), as ``cvt.rna.tf32.f32`` rounds."""
    return ((x.view(torch.int32) + 0x1000) & -0x2000).view(torch.float32)


def _tf32x3_matmul(a, b):
    """Triton's ``input_precision="tf32x3"``: TF32 high parts and TF32 remainders, three exact products (11 x 11
    mantissa bits fit float32) accumulated in float32, low x low dropped."""
    ah, bh = _round_tf32(a), _round_tf32(b)
    al, bl = _round_tf32(a - ah), _round_tf32(b - bh)
    return (al @ bh + ah @ bl) + ah @ bh


@needs_triton_module
def test_dot_precision_follows_pytorchs_tf32_rule():
    launch = _module("_launch")
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        for allowed, expected in ((True, "tf32"), (False, "tf32x3")):
            torch.backends.cuda.matmul.allow_tf32 = allowed
            assert launch.dot_flags(torch.float32)["DOT_PRECISION"] == expected
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert launch.dot_precision(torch.bfloat16) == launch.dot_precision(torch.float16) == "ieee"
    # Only interpreted bfloat16 dots are upcast (Triton issue 11584).
    assert launch.dot_flags(torch.bfloat16)["UPCAST"] == _module("_config").INTERPRET
    assert not launch.dot_flags(torch.float16)["UPCAST"] and not launch.dot_flags(torch.float32)["UPCAST"]


@pytest.mark.parametrize("k", [16, 67, 256, 1024])
def test_tf32x3_is_as_accurate_as_ieee(k):
    """float32 tiles run tf32x3 on a GPU when PyTorch does not allow TF32 (``_launch.dot_precision``): its error
    against float64 stays within 2x that of an ieee float32 matmul, where a single TF32 product is far worse."""
    a, b = torch.randn(128, k), torch.randn(k, 96) / k**0.5
    ref = a.double() @ b.double()

    def err(out):
        return ((out.double() - ref).norm() / ref.norm()).item()

    ieee, x3, one = err(a @ b), err(_tf32x3_matmul(a, b)), err(_round_tf32(a) @ _round_tf32(b))
    assert x3 <= 2 * ieee, (x3, ieee)
    assert one > 100 * ieee, (one, ieee)  # the emulated rounding is real, so the bound above can fail


# -- the linear kernels' autotune pruning (the GPU config lists) -------------------------------------------


@needs_triton_module
@pytest.mark.parametrize("m, k", [(1, 1), (3, 1000), (1000, 3), (16, 16), (33, 17), (256, 256), (512, 4096)])
@pytest.mark.parametrize("elem", [2, 4])
def test_gemv_prune_keeps_few_fitting_configs(m, k, elem):
    """Contiguous weights (row stride K): blocks within the widths; rows that are not 16-byte aligned (loaded
    element by element) get at most _GEMV_UNALIGNED_ELEMS weight elements per thread."""
    gemv, launch = _module("linear_gemv"), _module("_launch")
    args = {"M": m, "K": k, "w_ptr": _Like(elem), "stride_wm": k, "stride_wk": 1}
    for kernel in (gemv._fwd_gemv_kernel, gemv._bwd_gemv_kernel):
        kept = kernel.early_config_prune(gemv._gemv_configs(interpret=False), args)
        assert 1 <= len(kept) <= gemv._GEMV_MAX_CONFIGS
        for cfg in kept:
            kw = cfg.kwargs
            assert kw["BLOCK_M"] <= max(16, launch.next_pow2(m)) and kw["BLOCK_K"] <= max(16, launch.next_pow2(k))
            if (k * elem) % 16:
                per_thread = kw["BLOCK_B"] * kw["BLOCK_M"] * kw["BLOCK_K"] / (32 * cfg.num_warps)
                assert per_thread <= gemv._GEMV_UNALIGNED_ELEMS


@needs_triton_module
@pytest.mark.parametrize("n, m, k", [(2, 3, 5), (5, 64, 64), (1024, 128, 128), (4096, 256, 256), (65536, 32, 32),
                                     (100000, 3, 3), (4096, 65, 33)])
@pytest.mark.parametrize("elem", [2, 4])
def test_gemm_prune_keeps_fitting_configs(n, m, k, elem):
    """Each GEMM kernel's own pruning: shared memory, the dz tile and the register estimate within their budgets,
    and no float32-only tile for 16-bit operands."""
    gemm, launch = _module("linear_gemm"), _module("_launch")
    kernels = [(gemm._fwd_gemm_kernel, ("BLOCK_N", "BLOCK_M", "BLOCK_K"), False, "stride_xn"),
               (gemm._bwd_dx_gemm_kernel, ("BLOCK_N", "BLOCK_K", "BLOCK_M"), True, "stride_gn"),
               (gemm._bwd_dw_gemm_kernel, ("BLOCK_M", "BLOCK_K", "BLOCK_N"), True, "stride_xn")]
    precisions = ["ieee"] if elem == 2 else ["tf32", "tf32x3"]
    for (kernel, roles, forms_dz, stride), precision in itertools.product(kernels, precisions):
        strides = {name: 2 for name in kernel.arg_names if name.startswith("stride")}
        strides[stride] = k  # odd k: 16-bit rows only 2-byte aligned
        args = {"N": n, "M": m, "K": k, "x_ptr": _Like(elem), "w_ptr": _Like(elem), "LOAD_Z": True,
                "DOT_PRECISION": precision, **strides}
        kept = kernel.early_config_prune(gemm._gemm_configs(*roles, interpret=False), args)
        assert 1 <= len(kept) <= launch.GEMM_MAX_CONFIGS
        rows, cols, red = roles
        staged = elem == 2 and k % 2 == 1  # odd 16-bit rows: every pipeline stage is held in registers
        for cfg in kept:
            kw = cfg.kwargs
            tiles = (2 * kw[rows] if forms_dz else kw[rows]) + kw[cols]
            assert cfg.num_stages * tiles * kw[red] * elem <= launch.SMEM_BUDGET
            if forms_dz:
                assert kw[rows] * kw[red] <= 32 * 32 * cfg.num_warps
            per_operand = {2: 0.5, 4: 2.0}[elem] * (cfg.num_stages if staged else 1)
            registers = (kw[rows] * kw[cols] + tiles * kw[red] * per_operand) / (32 * cfg.num_warps)
            assert registers <= launch.REGISTER_BUDGET, (cfg, registers)
            if elem == 2:
                assert (kw[rows], kw[cols], kw[red], cfg.num_warps, cfg.num_stages) not in gemm.F32_ONLY_TILES


# -- empty problems: the backend object's one rule ----------------------------------------------------------


def _leaves(*shapes):
    return [(torch.randn(s, dtype=torch.float64) / 2).requires_grad_() for s in shapes]


def _low(leaves):
    return [t.detach().float().to(DEVICE) for t in leaves]


def _reference_grads(y_ref, leaves, dy):
    """The float64 gradients; zeros for a leaf the output does not depend on (an empty batch's output is not even
    in the graph)."""
    if not y_ref.requires_grad:
        return [torch.zeros_like(t) for t in leaves]
    grads = torch.autograd.grad(y_ref, leaves, dy, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]


@needs_triton
@pytest.mark.parametrize("b, n, k, m", [(0, 3, 4, 5), (2, 0, 4, 5), (2, 3, 0, 5), (2, 1, 0, 5), (2, 3, 4, 0)],
                         ids=["B=0", "N=0", "K=0", "K=0-gemv", "M=0"])
def test_empty_linear_through_the_op_by_name(b, n, k, m):
    """``hyperkernels::batched_linear(..., "triton")`` bypasses the dispatcher: forward and every gradient still
    match the reference (with in = 0, y = act(bias) and db = the summed dz: no kernel program would write db)."""
    x, w, bias = _leaves((b, n, k), (b, m, k), (b, m))
    y, preact = batched_linear_op(*_low([x, w, bias]), "sigmoid", 1.0, False, True, "triton")
    y_ref = linear_reference(x, w, bias, "sigmoid")
    assert_close(y, y_ref, FORWARD_RTOL[torch.float32], "forward")
    dy = torch.randn(y_ref.shape, dtype=torch.float64)
    grads = batched_linear_backward_op(dy.float().to(DEVICE), *_low([x, w, bias]), y, preact, "sigmoid", 1.0, False,
                                       [True, True, True], "triton")
    for name, g, r in zip(("dx", "dweight", "dbias"), grads, _reference_grads(y_ref, [x, w, bias], dy)):
        assert_close(g, r, GRAD_RTOL[torch.float32], name)


@needs_triton
@pytest.mark.parametrize("b, n", [(0, 5), (3, 0), (0, 1)], ids=["B=0", "N=0", "B=0-N=1"])
def test_empty_mlp_through_the_op_by_name(b, n):
    """With N = 0 the N > 1 backward would add no tile into dparams (left unwritten): it must come out zero."""
    sizes = [3, 16, 2]
    net = sequential_for(sizes, "tanh", None)
    spec = hk.ParamLayout.from_module(net).mlp_spec()
    x = torch.randn(b, n, 3, dtype=torch.float64)
    flat = torch.randn(b, spec.numel, dtype=torch.float64) / 3
    common = (spec.sizes, spec.weight_offsets, spec.bias_offsets, "tanh", "none", 1.0)
    y, saved = batched_mlp_op(*_low([x, flat]), *common, True, "triton")
    dy = torch.randn(b, n, 2, dtype=torch.float64)
    dx, dflat = batched_mlp_backward_op(dy.float().to(DEVICE), *_low([x, flat]), y, saved, *common, [True, True],
                                        "triton")
    assert y.shape == (b, n, 2) and dx.shape == x.shape and dflat.shape == flat.shape
    if b:
        y_ref, dx_ref, dflat_ref = mlp_reference(net, x, flat, dy)
        assert_close(y, y_ref, FORWARD_RTOL[torch.float32], "forward")
        assert_close(dx, dx_ref, GRAD_RTOL[torch.float32], "dx")
        assert_close(dflat, dflat_ref, GRAD_RTOL[torch.float32], "dparams")


@needs_triton
@pytest.mark.parametrize("b, n, i, o, k", [(3, 2, 4, 5, 0), (3, 1, 4, 5, 0), (0, 2, 4, 5, 3), (3, 0, 4, 5, 3)],
                         ids=["K=0", "K=0-N=1", "B=0", "N=0"])
def test_empty_hyper_linear(b, n, i, o, k):
    """A head with K = 0 (``h (B, 0)``) is not empty to the dispatcher: backend="triton" reaches the backend object,
    which runs it on the torch backend; y = act(head_bias's weights x + its bias) is not empty."""
    x, h, g, gb = _leaves((b, n, i), (b, k), (o * i + o, k), (o * i + o,))
    y_ref = hyper_linear_reference(x, h, g, gb, o, True, "gelu")
    dy = torch.randn(y_ref.shape, dtype=torch.float64)
    refs = _reference_grads(y_ref, [x, h, g, gb], dy)
    if b and n:  # the public call (the dispatcher sends B = 0 or N = 0 to torch before any backend)
        leaves = [t.detach().float().to(DEVICE).requires_grad_() for t in (x, h, g, gb)]
        y = hk.hyper_linear(*leaves, out_features=o, activation="gelu", backend="triton")
        grads = torch.autograd.grad(y, leaves, dy.float().to(DEVICE))
    else:  # the op by name
        y, preact = hyper_linear_op(*_low([x, h, g, gb]), o, True, "gelu", 30.0, True, "triton")
        grads = hyper_linear_backward_op(dy.float().to(DEVICE), *_low([x, h, g, gb]), y, preact, o, True, "gelu",
                                         30.0, [True, True, True, True], "triton")
    assert_close(y, y_ref, FORWARD_RTOL[torch.float32], "forward")
    for name, got, r in zip(("dx", "dh", "dhead_weight", "dhead_bias"), grads, refs):
        assert_close(got, r, GRAD_RTOL[torch.float32], name)
