"""The smoke check's cases (one per kernel path: the shape on a GPU and under the interpreter, the kernels and
decisions it must produce) and the problems they build; ``gpu_smoke.py`` runs them."""
from __future__ import annotations

import dataclasses
import zlib
from typing import Optional

import torch

from hyperkernels.activations import get_activation
from hyperkernels.layout import MLPSpec

W0 = 1.5  # sine's frequency: small enough that half-precision rounding of z stays a small error in sin(w0 z)

@dataclasses.dataclass
class Case:
    """One kernel path. ``gpu`` / ``cpu``: the shape on a GPU and under the interpreter (None: GPU only).
    ``expect``: kernels that must launch, each with constexpr values it must have been launched with.
    ``decide``: a recorded dispatch decision and the predicate its value must meet. ``force``: under the
    interpreter only, seams replaced to take the path a GPU takes by itself at the GPU shape."""

    name: str
    op: str  # linear | mlp | hyper
    backend: str  # triton | cuda
    dtype: torch.dtype
    gpu: dict
    cpu: Optional[dict]
    act: Optional[str] = "gelu"
    out_act: Optional[str] = None
    save: bool = True  # keep the pre-activation (linear, hyper) / the hidden values (mlp)
    weight: str = "contiguous"  # linear: contiguous | flat_odd | shared | transposed; mlp params: contiguous |
    x: str = "contiguous"  # slice | shared.  x: contiguous | strided
    channel_major: bool = False
    bias: bool = True
    tf32: bool = False
    deterministic: bool = False
    expect: tuple = ()
    decide: tuple = ()
    force: tuple = ()
    why: str = ""


def _k(name: str, **flags) -> tuple:
    return (name, flags)


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
LIN_GEMV = (_k("linear._fwd_gemv_kernel"), _k("linear._bwd_gemv_kernel"))
LIN_GEMM = (_k("linear._fwd_gemm_kernel"), _k("linear._bwd_dx_gemm_kernel"), _k("linear._bwd_dw_gemm_kernel"))
HYPER = (_k("hyper_linear._row_gemm_kernel"), _k("hyper_linear._dz_kernel"), _k("hyper_linear._dg_kernel"))
# The backward of the fused MLP with N > 1 splits its dW reduction by the number of programs that fill the GPU
# (4 per SM): the interpreter is told it has 8, so B = 2 is too few samples, as B = 3 is on a GPU.
FEW_PROGRAMS = (("mlp._programs_wanted", lambda device: 8),)


def NOT_TF32(precision) -> bool:  # float32 with TF32 off: whichever float32-accurate dot the kernels use
    return precision != "tf32"


CASES = [
    # -- Triton, per-sample linear / 1x1 conv ------------------------------------------------------------
    Case("linear_gemv_fp32", "linear", "triton", F32, dict(b=300, n=1, k=200, m=72), dict(b=5, n=1, k=33, m=17),
         act="gelu", weight="flat_odd", expect=LIN_GEMV, why="N = 1 GEMV, weight at an odd offset of a flat row"),
    Case("linear_gemv_bf16", "linear", "triton", BF16, dict(b=257, n=1, k=64, m=130), dict(b=3, n=1, k=16, m=9),
         act="relu", x="strided", expect=LIN_GEMV, why="N = 1 GEMV, strided x, derivative from y"),
    Case("linear_gemm_fp32", "linear", "triton", F32, dict(b=6, n=300, k=72, m=40), dict(b=2, n=37, k=9, m=5),
         act="silu", weight="transposed", expect=LIN_GEMM + (_k("linear._fwd_gemm_kernel", DOT_PRECISION=NOT_TF32),),
         why="N > 1 GEMM in float32 (TF32 off: float32 accuracy), transposed weight"),
    Case("linear_gemm_tf32", "linear", "triton", F32, dict(b=6, n=300, k=72, m=40), dict(b=2, n=37, k=9, m=5),
         act="tanh", tf32=True, expect=LIN_GEMM + (_k("linear._fwd_gemm_kernel", DOT_PRECISION="tf32"),),
         why="N > 1 GEMM in TF32 (allow_tf32)"),
    Case("linear_gemm_recompute_bf16", "linear", "triton", BF16, dict(b=5, n=257, k=100, m=33),
         dict(b=2, n=19, k=11, m=6), act="gelu", save=False,
         expect=LIN_GEMM + (_k("linear._fwd_gemm_kernel", ACT=get_activation(None).code),),
         why="N > 1, pre-activation not kept: the backward recomputes it"),
    Case("linear_split_dw_fp16", "linear", "triton", F16, dict(b=1, n=3000, k=72, m=40), dict(b=1, n=300, k=7, m=5),
         act="sine", expect=LIN_GEMM, decide=(("linear._dw_splits", lambda s: s > 1),),
         force=(("linear._dw_splits", lambda *a: 3),), why="dW over slices of the tokens (float32 partials)"),
    Case("linear_shared_weight_bf16", "linear", "triton", BF16, dict(b=513, n=1, k=48, m=24),
         dict(b=7, n=1, k=8, m=6), act="tanh", weight="shared",
         expect=(_k("linear._fwd_gemm_kernel"), _k("linear._bwd_dx_gemm_kernel"), _k("linear._bwd_gemv_kernel")),
         why="weight shared by every sample (batch stride 0), N = 1: the batch folded into one GEMM"),
    Case("conv1x1_channel_major_fp16", "linear", "triton", F16, dict(b=4, n=63 * 5, k=24, m=40),
         dict(b=2, n=21, k=5, m=7), act="sigmoid", channel_major=True, expect=LIN_GEMM,
         why="1x1 conv: channel-major (B, C, S) through transposed views"),
    # -- Triton, fused MLP -----------------------------------------------------------------------------
    Case("mlp_gemv_keep_fp32", "mlp", "triton", F32, dict(b=300, n=1, sizes=(17, 64, 64, 5)),
         dict(b=5, n=1, sizes=(3, 16, 4)), act="gelu", out_act="tanh", save=True,
         expect=(_k("mlp._fwd_gemv_kernel", SAVE=True), _k("mlp._bwd_gemv_kernel")),
         why="N = 1 GEMV chain, the forward keeps each layer's value"),
    Case("mlp_gemv_recompute_bf16", "mlp", "triton", BF16, dict(b=300, n=1, sizes=(17, 64, 64, 5)),
         dict(b=5, n=1, sizes=(3, 16, 4)), act="silu", save=False, weight="slice",
         expect=(_k("mlp._fwd_gemv_kernel", SAVE=False), _k("mlp._fwd_gemv_kernel", SAVE=True),
                 _k("mlp._bwd_gemv_kernel")),
         why="N = 1, nothing kept: the backward reruns the forward; params a slice at an odd offset"),
    Case("mlp_gemv_width256_fp16", "mlp", "triton", F16, dict(b=64, n=1, sizes=(256, 256, 256)),
         dict(b=2, n=1, sizes=(40, 33, 3)), act="relu", save=True,
         expect=(_k("mlp._fwd_gemv_kernel"), _k("mlp._bwd_gemv_kernel")), why="N = 1 at the widest width"),
    Case("mlp_gemm_atomic_fp32", "mlp", "triton", F32, dict(b=3, n=300, sizes=(2, 64, 64, 64, 3)),
         dict(b=2, n=40, sizes=(3, 16, 2)), act="relu", save=False,
         expect=(_k("mlp._fwd_gemm_kernel", DOT_PRECISION=NOT_TF32), _k("mlp._bwd_gemm_kernel", ATOMIC=True)),
         decide=(("mlp._dw_mode", lambda r: r[0]),), force=FEW_PROGRAMS,
         why="N > 1 in float32 (TF32 off), few samples: dW per tile with float32 atomics"),
    Case("mlp_gemm_split_bf16", "mlp", "triton", BF16, dict(b=3, n=600, sizes=(2, 128, 128, 128, 3)),
         dict(b=2, n=260, sizes=(3, 16, 2)), act="tanh", save=False, deterministic=True,
         expect=(_k("mlp._fwd_gemm_kernel"), _k("mlp._bwd_gemm_kernel", ATOMIC=False)),
         decide=(("mlp._dw_mode", lambda r: not r[0] and r[1] > 1),), force=FEW_PROGRAMS,
         why="N > 1, deterministic mode: dW split over programs, fixed-order sum"),
    Case("mlp_gemm_keep_one_program_fp16", "mlp", "triton", F16, dict(b=600, n=20, sizes=(3, 64, 64, 2)),
         dict(b=2, n=20, sizes=(3, 16, 2)), act="sine", out_act="sigmoid", save=True,
         expect=(_k("mlp._fwd_gemm_kernel", SAVE=True), _k("mlp._bwd_gemm_kernel", ATOMIC=False)),
         decide=(("mlp._dw_mode", lambda r: r == (False, 1)),),
         why="N > 1, samples fill the GPU: one program per sample; the forward asked to keep"),
    Case("mlp_gemm_tf32", "mlp", "triton", F32, dict(b=4, n=256, sizes=(2, 64, 64, 3)),
         dict(b=2, n=24, sizes=(3, 16, 2)), act="gelu", save=False, tf32=True,
         expect=(_k("mlp._fwd_gemm_kernel", DOT_PRECISION="tf32"), _k("mlp._bwd_gemm_kernel", DOT_PRECISION="tf32")),
         why="N > 1 in TF32 (allow_tf32)"),
    Case("mlp_gemm_width256_bf16", "mlp", "triton", BF16, dict(b=2, n=100, sizes=(256, 100, 256)),
         dict(b=1, n=17, sizes=(40, 33, 3)), act="gelu", save=False,
         expect=(_k("mlp._fwd_gemm_kernel"), _k("mlp._bwd_gemm_kernel")), why="N > 1 at the widest width"),
    Case("mlp_shared_params_bf16", "mlp", "triton", BF16, dict(b=500, n=1, sizes=(16, 64, 16)),
         dict(b=6, n=1, sizes=(3, 16, 2)), act="relu", save=True, weight="shared",
         expect=(_k("mlp._fwd_gemm_kernel"), _k("mlp._bwd_gemv_kernel")),
         why="one parameter row for every sample, N = 1: the batch folded into one GEMM"),
    # -- Triton, hyper-fused linear ------------------------------------------------------------------------
    Case("hyper_n1_bf16", "hyper", "triton", BF16, dict(b=512, n=1, i=64, o=48, k=16), dict(b=3, n=1, i=5, o=4, k=3),
         act="gelu", expect=HYPER, why="N = 1, dz from the kept pre-activation, every dG role"),
    Case("hyper_recompute_fp16", "hyper", "triton", F16, dict(b=8, n=40, i=33, o=20, k=8),
         dict(b=2, n=3, i=5, o=4, k=3),
         act="silu", save=False, expect=HYPER, why="N > 1, pre-activation recomputed in the backward"),
    Case("hyper_split_dg_fp32", "hyper", "triton", F32, dict(b=2048, n=1, i=16, o=8, k=4),
         dict(b=4, n=3, i=5, o=4, k=3), act="relu", bias=False, expect=HYPER,
         decide=(("hyper_linear._dg_splits", lambda s: s > 1),), force=(("hyper_linear._dg_splits", lambda *a: 3),),
         why="dG over slices of the rows (float32 partials); no generated bias"),
    # -- CUDA C++ module (csrc/gemv.cu, gemm.cu, reductions.cu); paths as tests/gpu/sanitize_cuda.py names them ------------
    Case("cuda_gemv_vec_fp32", "linear", "cuda", F32, dict(b=300, n=1, k=256, m=72), None, act="gelu",
         why="gemv_rows_kernel, 16-byte vector loads"),
    Case("cuda_gemv_scalar_fp16", "linear", "cuda", F16, dict(b=64, n=1, k=33, m=17), None, act="sine",
         weight="flat_odd", why="gemv_rows_kernel, scalar loads (odd offset)"),
    Case("cuda_gemv_cols_bf16", "linear", "cuda", BF16, dict(b=64, n=1, k=40, m=70), None, act="silu",
         weight="transposed", why="gemv_cols_kernel (rows along outputs)"),
    Case("cuda_shared_fold_fp32", "linear", "cuda", F32, dict(b=200, n=1, k=33, m=17), None, act="tanh",
         weight="shared", bias=False, why="shared weight, N = 1: the batch folded into one GEMM"),
    Case("cuda_gemm_fma_fp32", "linear", "cuda", F32, dict(b=3, n=70, k=72, m=40), None, act="gelu",
         why="gemm_kernel, FMA (float32, TF32 off)"),
    Case("cuda_gemm_tf32", "linear", "cuda", F32, dict(b=3, n=70, k=72, m=40), None, act="silu", tf32=True,
         expect=(_k("cuda.linear_forward", allow_tf32=True),), why="gemm_kernel, TF32 tensor cores"),
    Case("cuda_gemm_wmma_fp16", "linear", "cuda", F16, dict(b=3, n=70, k=64, m=48), None, act="relu",
         why="gemm_kernel, WMMA float16"),
    Case("cuda_gemm_wmma_channel_major_bf16", "linear", "cuda", BF16, dict(b=2, n=70, k=40, m=36), None,
         act="gelu", channel_major=True, why="gemm_kernel, WMMA bfloat16, channel-major"),
    Case("cuda_split_dw_db_fp32", "linear", "cuda", F32, dict(b=1, n=3000, k=40, m=40), None, act="gelu",
         save=False, decide=(("cuda.workspace_bytes", lambda v: v > 0),),
         why="dW and db split over the tokens into the workspace, reduce_splits_kernel; preact recomputed"),
]
CASES_BY_NAME = {c.name: c for c in CASES}

# ------------------------------------------------------------------------------------------------------
# Inputs: float64 leaves, rounded to the case's dtype once; the backend and the reference see the same numbers
# ------------------------------------------------------------------------------------------------------

def case_generator(case: Case) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(case.name.encode()))


def _linear_problem(case: Case, s: dict, gen):
    b, n, k, m = s["b"], s["n"], s["k"], s["m"]
    cm = case.channel_major

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    x_shape = (b, k, n) if cm else (b, n, k)
    leaves = {"x": rnd(*x_shape[:-1], 2 * x_shape[-1]) if case.x == "strided" else rnd(*x_shape),
              "grad": rnd(*((b, m, n) if cm else (b, n, m)))}
    leaves["w"] = {"contiguous": lambda: rnd(b, m, k, scale=k**-0.5),
                   "flat_odd": lambda: rnd(b, 1 + m * k + 3, scale=k**-0.5),
                   "shared": lambda: rnd(1, m, k, scale=k**-0.5),
                   "transposed": lambda: rnd(b, k, m, scale=k**-0.5)}[case.weight]()
    if case.bias:
        leaves["bias"] = rnd(b, m)

    def views(t):
        x = t["x"][..., ::2] if case.x == "strided" else t["x"]
        w = {"contiguous": lambda v: v, "flat_odd": lambda v: v[:, 1 : 1 + m * k].view(b, m, k),
             "shared": lambda v: v.expand(b, m, k), "transposed": lambda v: v.transpose(1, 2)}[case.weight](t["w"])
        return x, w, t.get("bias"), t["grad"]

    def run(backend, t, save):
        x, w, bias, g = views(t)
        act = get_activation(case.act)
        y, z = backend.linear_forward(x, w, bias, act, W0, cm, save)
        dx, dw, db = backend.linear_backward(g, x, w, bias, y, z, act, W0, cm, (True, True, bias is not None))
        return {"y": y, "dx": dx, "dW": dw, **({"db": db} if bias is not None else {})}

    return leaves, run


def _mlp_spec(sizes) -> MLPSpec:
    """Layers laid out like parameters_to_vector(nn.Sequential of nn.Linear): weight then bias, layer by layer."""
    w_off, b_off, at = [], [], 0
    for k, m in zip(sizes[:-1], sizes[1:]):
        w_off.append(at)
        b_off.append(at + m * k)
        at += m * k + m
    return MLPSpec(tuple(sizes), tuple(w_off), tuple(b_off), at)


def _mlp_problem(case: Case, s: dict, gen):
    b, n, sizes = s["b"], s["n"], s["sizes"]
    spec = _mlp_spec(sizes)
    rows = 1 if case.weight == "shared" else b
    flat = torch.randn(rows, spec.numel, generator=gen, dtype=torch.float64) * 0.1
    for (k, m), off in zip(zip(sizes[:-1], sizes[1:]), spec.weight_offsets):
        flat[:, off : off + m * k] *= 10 * k**-0.5  # pre-activations O(1) in every layer
    if case.weight == "slice":
        pad = torch.randn(rows, 3, generator=gen, dtype=torch.float64)
        flat = torch.cat([pad[:, :1], flat, pad[:, 1:]], 1)
    leaves = {"x": torch.randn(b, n, sizes[0], generator=gen, dtype=torch.float64), "params": flat,
              "grad": torch.randn(b, n, sizes[-1], generator=gen, dtype=torch.float64)}

    def run(backend, t, save):
        params = {"contiguous": lambda v: v, "slice": lambda v: v[:, 1 : 1 + spec.numel],
                  "shared": lambda v: v.expand(b, spec.numel)}[case.weight](t["params"])
        act, out_act = get_activation(case.act), get_activation(case.out_act)
        y, saved = backend.mlp_forward(t["x"], params, spec, act, out_act, W0, save)
        dx, dparams = backend.mlp_backward(t["grad"], t["x"], params, y, saved, spec, act, out_act, W0, (True, True))
        return {"y": y, "dx": dx, "dparams": dparams}

    return leaves, run


def _hyper_problem(case: Case, s: dict, gen):
    b, n, i, o, k = s["b"], s["n"], s["i"], s["o"], s["k"]
    rows = o * i + (o if case.bias else 0)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    # W[b] = G h[b] + g with G ~ 1/sqrt(K I), g ~ 1/sqrt(I): pre-activations O(1).
    leaves = {"x": rnd(b, n, i), "h": rnd(b, k), "head_w": rnd(rows, k, scale=(k * i) ** -0.5),
              "head_b": rnd(rows, scale=i**-0.5), "grad": rnd(b, n, o)}

    def run(backend, t, save):
        act = get_activation(case.act)
        args = (t["x"], t["h"], t["head_w"], t["head_b"], o, case.bias, act, W0)
        y, z = backend.hyper_linear_forward(*args, save)
        dx, dh, dg, dgb = backend.hyper_linear_backward(t["grad"], t["x"], t["h"], t["head_w"], t["head_b"], y, z, o,
                                                        case.bias, act, W0, (True, True, True, True))
        return {"y": y, "dx": dx, "dh": dh, "dG": dg, "dG_bias": dgb}

    return leaves, run


PROBLEMS = {"linear": _linear_problem, "mlp": _mlp_problem, "hyper": _hyper_problem}
