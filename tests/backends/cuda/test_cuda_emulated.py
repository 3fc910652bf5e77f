"""The cuda backend's wrappers end to end on CPU, through the emulator of the extension (cuda_emulator.py): every
activation, dtype, layout and weight / input storage against the float64 reference, forward and gradients; what
the wrappers pass (strides, views in place, the shared-weight fold, output masks, the workspace, the TF32 flag,
the stream); the empty-problem route; opcheck; and tests/gpu/sanitize_cuda.py's own cases."""
from __future__ import annotations

import importlib
import math
import os
import sys

import pytest
import torch

import hyperkernels as hk
from cuda_emulator import STREAM, cpu_launch_env, emulated  # noqa: F401 (fixtures)
from hyperkernels.activations import ACTIVATIONS, get_activation
from hyperkernels.backends._precision import tf32_allowed
from hyperkernels.ops import batched_linear_backward_op, batched_linear_op
from reference import FORWARD_RTOL, GRAD_RTOL, assert_close, conv1x1_reference, linear_reference

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ACTS = list(ACTIVATIONS)


def _weight_and_bias(kind, batch, m, k, has_bias, dtype):
    """float64 leaves and a function deriving (weight, bias) views from them, like a hypernetwork's output."""
    leaves = {}
    if kind == "flat_odd":  # a view at an odd offset of a flat (B, P) buffer: not 16-byte aligned
        leaves["flat"] = torch.randn(batch, 1 + m * k + m + 2, dtype=torch.float64) / math.sqrt(k)
    elif kind == "shared":
        leaves["weight"] = torch.randn(1, m, k, dtype=torch.float64) / math.sqrt(k)
    elif kind == "transposed":
        leaves["weight"] = torch.randn(batch, k, m, dtype=torch.float64) / math.sqrt(k)
    else:
        leaves["weight"] = torch.randn(batch, m, k, dtype=torch.float64) / math.sqrt(k)
    if has_bias and kind != "flat_odd":
        leaves["bias"] = torch.randn(batch, m, dtype=torch.float64)

    def derive(t):
        if kind == "flat_odd":
            w = t["flat"][:, 1 : 1 + m * k].view(batch, m, k)
            return w, (t["flat"][:, 1 + m * k : 1 + m * k + m] if has_bias else None)
        w = t["weight"]
        w = w.expand(batch, m, k) if kind == "shared" else (w.transpose(1, 2) if kind == "transposed" else w)
        return w, t.get("bias")

    return leaves, derive


def _run_through_the_op(layout, weight_kind, x_kind, act, dtype, n, has_bias=True, save_preact=None, batch=3, k=6,
                        m=5, w0=None):
    """Forward and every gradient of the op with backend "cuda" against the float64 loop reference."""
    leaves, derive_w = _weight_and_bias(weight_kind, batch, m, k, has_bias, dtype)
    cm = layout == "channel"
    x_shape = (batch, k, n) if cm else (batch, n, k)
    leaves["x"] = torch.randn(*x_shape[:-1], x_shape[-1] * (2 if x_kind == "strided" else 1), dtype=torch.float64)
    w0 = w0 if w0 is not None else (2.0 if dtype == torch.float32 else 1.5)

    def derive(t):
        x = t["x"][..., ::2] if x_kind == "strided" else t["x"]
        return (x, *derive_w(t))

    low = {name: v.to(dtype).requires_grad_() for name, v in leaves.items()}
    ref = {name: v.to(dtype).double().requires_grad_() for name, v in leaves.items()}
    act_obj = get_activation(act)
    keep = act_obj.needs_preactivation if save_preact is None else save_preact
    y, preact = batched_linear_op(*derive(low), act, w0, cm, keep, "cuda")
    assert preact.numel() == (y.numel() if keep and act_obj.needs_preactivation else 0)
    x_r, w_r, b_r = derive(ref)
    if cm:
        y_ref = conv1x1_reference(x_r, w_r, b_r, act, w0)
    else:
        y_ref = linear_reference(x_r, w_r, b_r, act, w0)
    assert y.dtype == dtype and y.shape == y_ref.shape and y.is_contiguous()
    assert_close(y, y_ref, FORWARD_RTOL[dtype], "forward")
    grad = torch.randn_like(y_ref).to(dtype)
    y.backward(grad)
    y_ref.backward(grad.double())
    for name in leaves:
        assert_close(low[name].grad, ref[name].grad, GRAD_RTOL[dtype], f"grad of {name}")


def _emulated_cases():
    """Every activation with every dtype, and every layout with every weight and x storage kind, cycling the
    remaining choices so that the count stays linear."""
    layouts = [("token", 1), ("token", 5), ("channel", 6), ("channel", 1)]
    weight_kinds = ["contiguous", "flat_odd", "shared", "transposed"]
    x_kinds = ["contiguous", "strided"]
    cases = []
    for i, (act, dtype) in enumerate((a, d) for a in ACTS for d in DTYPES):
        layout, n = layouts[i % len(layouts)]
        cases.append((layout, weight_kinds[i % 4], x_kinds[i % 2], act, dtype, n, i % 3 != 2))
    for j, ((layout, n), wk, xk) in enumerate((l, w, x) for l in layouts for w in weight_kinds for x in x_kinds):
        cases.append((layout, wk, xk, ACTS[j % len(ACTS)], torch.float32, n, j % 2 == 0))
    return cases


@pytest.mark.parametrize(
    "layout, weight_kind, x_kind, act, dtype, n, has_bias", _emulated_cases(),
    ids=lambda v: str(v).replace("torch.", "") if not isinstance(v, bool) else ("bias" if v else "nobias"),
)
def test_emulated_op_matches_reference(emulated, layout, weight_kind, x_kind, act, dtype, n, has_bias):
    _run_through_the_op(layout, weight_kind, x_kind, act, dtype, n, has_bias)
    assert emulated.calls, "nothing was launched"
    assert all(call[1]["stream"] == STREAM for call in emulated.calls), "not launched on the stream asked for"


@pytest.mark.parametrize("act", ["gelu", "silu", "sine"])
@pytest.mark.parametrize("n", [1, 4])
def test_emulated_backward_recomputes_a_missing_preactivation(emulated, act, n):
    _run_through_the_op("token", "contiguous", "contiguous", act, torch.float32, n, save_preact=False)
    kinds = [(kind, call["act"], call.get("preact")) for kind, call in emulated.calls]
    none = ACTIVATIONS["none"].code
    assert kinds[0] == ("forward", ACTIVATIONS[act].code, 0)  # kept nothing
    assert kinds[1][:2] == ("forward", none) and kinds[1][2] == 0  # z recomputed into its own buffer
    assert kinds[2][0] == "backward" and emulated.calls[2][1]["saved_is_preact"]


def test_emulated_channel_major_passes_transposed_strides(emulated):
    x = torch.randn(2, 4, 6)  # (B, C_in, S)
    w = torch.randn(2, 3, 4)
    y, _ = batched_linear_op(x, w, None, "relu", 1.0, True, False, "cuda")
    call = emulated.calls[0][1]
    assert (call["B"], call["N"], call["K"], call["M"]) == (2, 6, 4, 3)
    assert (call["sxb"], call["sxn"], call["sxk"]) == (24, 1, 6)  # x (B, K, S) read as (B, S, K)
    assert (call["syb"], call["syn"], call["sym"]) == (18, 1, 6)  # y (B, M, S) written as (B, S, M)
    assert y.shape == (2, 3, 6) and y.is_contiguous()
    assert_close(y, conv1x1_reference(x.double(), w.double(), None, "relu"), FORWARD_RTOL[torch.float32])


def test_emulated_misaligned_views_are_passed_as_they_are(emulated):
    """No alignment is required and nothing is copied: the kernels get the view's own (odd) address."""
    flat = torch.randn(3, 1 + 5 * 7 + 5)
    w, b = flat[:, 1 : 36].view(3, 5, 7), flat[:, 36:]
    x = torch.randn(3, 2, 14)[..., ::2]
    batched_linear_op(x, w, b, "tanh", 1.0, False, False, "cuda")
    call = emulated.calls[0][1]
    assert call["w"] == w.data_ptr() and call["w"] % 16 != 0
    assert (call["swb"], call["swm"], call["swk"]) == w.stride()
    assert call["bias"] == b.data_ptr() and (call["sbb"], call["sbm"]) == b.stride()
    assert call["x"] == x.data_ptr() and call["sxk"] == 2


@pytest.mark.parametrize("bias", ["none", "shared", "per_sample"])
def test_emulated_shared_weight_single_token_is_folded_into_one_gemm(emulated, bias):
    batch, m, k = 6, 5, 4
    w = torch.randn(1, m, k).expand(batch, m, k)
    b = {"none": None, "shared": torch.randn(1, m).expand(batch, m), "per_sample": torch.randn(batch, m)}[bias]
    x = torch.randn(batch, 1, k, requires_grad=True)
    y, _ = batched_linear_op(x, w, b, "relu", 1.0, False, False, "cuda")
    fwd = emulated.calls[0][1]
    folded = bias != "per_sample"  # a per-sample bias cannot be one GEMM's bias
    assert (fwd["B"], fwd["N"]) == ((1, batch) if folded else (batch, 1))
    assert_close(y, linear_reference(x.double(), w.double(), None if b is None else b.double(), "relu"),
                 FORWARD_RTOL[torch.float32])
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    bwd = [c for kind, c in emulated.calls if kind == "backward"]
    assert len(bwd) == 1 and (bwd[0]["B"], bwd[0]["N"]) == (1, batch) and bwd[0]["dw"] == 0
    xr = x.detach().double().requires_grad_()
    y_ref = linear_reference(xr, w.double(), None if b is None else b.double(), "relu")
    y_ref.backward(torch.ones_like(y_ref))
    assert_close(dx, xr.grad, GRAD_RTOL[torch.float32], "dx")


@pytest.mark.parametrize("mask", [(True, False, False), (False, True, False), (False, False, True), (False, True, True)])
@pytest.mark.parametrize("act", ["none", "relu", "gelu"])
def test_emulated_output_mask_subsets(emulated, mask, act):
    x, w, b = torch.randn(3, 4, 6), torch.randn(3, 5, 6), torch.randn(3, 5)
    y, preact = batched_linear_op(x, w, b, act, 1.0, False, True, "cuda")
    g = torch.randn_like(y)
    dx, dw, db = batched_linear_backward_op(g, x, w, b, y, preact, act, 1.0, False, list(mask), "cuda")
    for out, want, shape in zip((dx, dw, db), mask, (x.shape, w.shape, b.shape)):
        assert out.shape == (shape if want else (0,))
    call = emulated.calls[-1][1]
    assert (call["dx"] != 0, call["dw"] != 0, call["db"] != 0) == mask
    assert (call["dz"] != 0) == (act != "none" and (mask[0] or mask[1]))  # scratch only where a GEMM reads dz
    xr, wr, br = (t.double().requires_grad_() for t in (x, w, b))
    linear_reference(xr, wr, br, act, 1.0).backward(g.double())
    for out, want, r in zip((dx, dw, db), mask, (xr, wr, br)):
        if want:
            assert_close(out, r.grad, GRAD_RTOL[torch.float32])


def test_emulated_split_reductions_get_their_workspace(emulated):
    x, w, b = torch.randn(1, 300, 40), torch.randn(1, 40, 40) / 7, torch.randn(1, 40)
    y, preact = batched_linear_op(x, w, b, "gelu", 1.0, False, True, "cuda")
    batched_linear_backward_op(torch.randn_like(y), x, w, b, y, preact, "gelu", 1.0, False, [True, True, True], "cuda")
    call = emulated.calls[-1][1]
    assert emulated.real.linear_backward_workspace_size(B=1, N=300, M=40, K=40, need_dw=True, need_db=True) > 0
    assert call["workspace"] != 0 and call["workspace_bytes"] > 0  # the emulator checked size and alignment


def test_emulated_allow_tf32_follows_torch(emulated):
    x, w = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    matmul = torch.backends.cuda.matmul
    assert not tf32_allowed()  # torch's default
    try:
        matmul.allow_tf32 = True
        batched_linear_op(x, w, None, "none", 1.0, False, False, "cuda")
    finally:
        matmul.allow_tf32 = False
    batched_linear_op(x, w, None, "none", 1.0, False, False, "cuda")
    assert [c[1]["allow_tf32"] for c in emulated.calls] == [True, False]


def test_empty_problems_never_reach_the_cuda_backend(emulated):
    """The wrappers keep no empty-problem path: dispatch sends every problem with B, N, in or out = 0 to the torch
    backend, even when backend="cuda" is asked for; the emulator fails any launch of an empty problem."""
    for x, w in [(torch.randn(0, 3, 4), torch.randn(0, 5, 4)), (torch.randn(2, 0, 4), torch.randn(2, 5, 4)),
                 (torch.randn(2, 3, 0), torch.randn(2, 5, 0)), (torch.randn(2, 3, 4), torch.randn(2, 0, 4))]:
        b = torch.randn(x.shape[0], w.shape[1])
        leaves = [t.double().requires_grad_() for t in (x, w, b)]
        y = hk.batched_linear(*leaves, activation="gelu", backend="cuda")
        assert y.shape == (x.shape[0], x.shape[1], w.shape[1])
        assert_close(y, linear_reference(*(t.detach() for t in leaves), "gelu"), FORWARD_RTOL[torch.float64])
        grads = torch.autograd.grad(y.sum(), leaves, allow_unused=True)
        assert [tuple(g.shape) for g in grads] == [tuple(t.shape) for t in leaves]
        conv = hk.batched_conv1x1(x.transpose(1, 2), w, b, backend="cuda")
        assert conv.shape == (x.shape[0], w.shape[1], x.shape[1])
    assert emulated.calls == []


def test_emulated_opcheck(emulated):
    flat = torch.randn(3, 1 + 5 * 4 + 5, requires_grad=True)
    w, b = flat[:, 1:21].view(3, 5, 4), flat[:, 21:]
    for cm in (False, True):
        x = (torch.randn(3, 4, 7) if cm else torch.randn(3, 7, 4)).requires_grad_()
        torch.library.opcheck(batched_linear_op, (x, w, b, "gelu", 2.0, cm, True, "cuda"))
        y, preact = batched_linear_op(x, w, b, "gelu", 2.0, cm, True, "cuda")
        args = (torch.randn_like(y), x, w, b, y.detach(), preact.detach(), "gelu", 2.0, cm, [True, True, True], "cuda")
        torch.library.opcheck(batched_linear_backward_op, args)


def test_sanitizer_script_cases_pass_under_the_emulator(emulated, monkeypatch):
    """tests/gpu/sanitize_cuda.py's cases and checks, run on CPU: the script itself is right before a GPU sees it."""
    sys.path.insert(0, os.path.join(ROOT, "tests", "gpu"))
    try:
        script = importlib.import_module("sanitize_cuda")
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(script, "_to_gpu", lambda t: t.contiguous().clone())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    names = set()
    for case in script.CASES:
        assert script.run_case(case) == [], case.name
        names.add(case.name)
    assert len(names) == len(script.CASES)
