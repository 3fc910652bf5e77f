"""The cases of the offline GPU compile check (offline_compile.py): every launcher path of the Triton backend, over
dtype classes, activations, N = 1 / N > 1, backward modes and widths, each a function that runs the backend's real
entry points on ``meta`` tensors; and the inventory of the backend's kernels the check must cover.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Callable, Optional

DTYPE_CLASSES = ("fp32", "tf32", "bf16", "fp16")


@dataclasses.dataclass
class Case:
    name: str  # "<family>.<what> <dtype class> <activation> <shape...>"
    family: str  # linear, conv1x1, mlp, hyper
    dtype_class: str
    run: Callable[[], None]
    ci: bool = False


# ------------------------------------------------------------------------------------------------------
# The cases: every launcher path, over dtype classes, activations, N = 1 / N > 1, backward modes and widths
# ------------------------------------------------------------------------------------------------------


def _dtype(cls: str):
    import torch

    return {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cls]


@contextlib.contextmanager
def _precision(cls: str):
    """float32 runs ``ieee``-class dots unless PyTorch's matmuls may use TF32 (``tf32``)."""
    import torch

    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = cls == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@contextlib.contextmanager
def _deterministic(on: bool):
    import torch

    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old)


def _meta(*shape, dtype):
    import torch

    return torch.empty(*shape, dtype=dtype, device="meta")


def _act(name):
    from hyperkernels.activations import get_activation

    return get_activation(name)


def _linear_case(cls, act, b, n, k, m, *, conv=False, bias=True, shared=False, mask=(True, True, True),
                 odd_offset=False):
    """Forward (keeping the pre-activation where the activation needs it) then the backward of batched_linear /
    batched_conv1x1 with the Triton launchers, on meta tensors."""

    def run():
        from hyperkernels.backends.triton import linear

        dtype = _dtype(cls)
        a = _act(act)
        x = _meta(b, k, n, dtype=dtype) if conv else _meta(b, n, k, dtype=dtype)
        if shared:
            w = _meta(1, m, k, dtype=dtype).expand(b, m, k)
        elif odd_offset:  # a view of a flat (B, P) hypernetwork output at an odd offset: unaligned pointer
            w = _meta(b, 1 + m * k + 3, dtype=dtype)[:, 1 : 1 + m * k].unflatten(1, (m, k))
        else:
            w = _meta(b, m, k, dtype=dtype)
        bb = _meta(b, m, dtype=dtype) if bias else None
        with _precision(cls):
            y, z = linear.linear_forward(x, w, bb, a, 30.0, conv, True)
            linear.linear_backward(y.new_empty(y.shape), x, w, bb, y, z, a, 30.0, conv, mask)

    return run


def _mlp_spec(sizes, bias=True):
    from hyperkernels.layout import MLPSpec

    woff, boff, off = [], [], 0
    for k, m in zip(sizes[:-1], sizes[1:]):
        woff.append(off)
        off += k * m
        boff.append(off if bias else -1)
        off += m if bias else 0
    return MLPSpec(tuple(sizes), tuple(woff), tuple(boff), off)


def _mlp_case(cls, act, sizes, b, n, *, out_act=None, mask=(True, True), deterministic=False, shared=False,
              forward_only=False):
    """Forward (keeping what the backward reads for N = 1) then the backward of the fused MLP."""

    def run():
        from hyperkernels.backends.triton import mlp

        dtype = _dtype(cls)
        spec = _mlp_spec(sizes)
        a, oa = _act(act), _act(out_act)
        x = _meta(b, n, sizes[0], dtype=dtype)
        params = _meta(1, spec.numel, dtype=dtype).expand(b, spec.numel) if shared else \
            _meta(b, spec.numel, dtype=dtype)
        with _precision(cls), _deterministic(deterministic):
            y, saved = mlp.mlp_forward(x, params, spec, a, oa, 30.0, n == 1)
            if not forward_only:
                mlp.mlp_backward(y.new_empty(y.shape), x, params, y, saved, spec, a, oa, 30.0, mask)

    return run


def _hyper_case(cls, act, b, n, k, i, o, *, bias=True, head_bias=True):
    def run():
        from hyperkernels.backends.triton import hyper_linear

        dtype = _dtype(cls)
        a = _act(act)
        rows = o * i + (o if bias else 0)
        x, h = _meta(b, n, i, dtype=dtype), _meta(b, k, dtype=dtype)
        g, gb = _meta(rows, k, dtype=dtype), (_meta(rows, dtype=dtype) if head_bias else None)
        with _precision(cls):
            y, z = hyper_linear.hyper_linear_forward(x, h, g, gb, o, bias, a, 30.0, True)
            hyper_linear.hyper_linear_backward(y.new_empty(y.shape), x, h, g, gb, y, z, o, bias, a, 30.0,
                                               (True, True, True, True))

    return run


# Activations by what they change in a kernel: none (no load), relu (loads y, cheap), gelu (loads z; erf and exp,
# the most registers), sine (loads z; sin / cos), silu (loads z), tanh / sigmoid (load y).
ACTS_ALL = (None, "relu", "gelu", "silu", "tanh", "sigmoid", "sine")
# Fused-MLP nets: widths 64 and 128 (the neural-field widths), 256 (the widest), and widths off the powers of two.
MLP_NETS = {
    "w64": (2, 64, 64, 64, 3),
    "w128": (2, 128, 128, 128, 3),
    "w256": (256, 100, 256),
    "odd": (3, 17, 33, 5),
}
# Which cases the CI subset takes (by name): every kernel of the three launcher families on both archs, in float32
# (tf32x3 dots) and bfloat16, with gelu (the most registers) where the kernel has an activation.
CI_CASES = {
    "linear.gemm fp32 gelu small", "linear.gemm bf16 gelu small", "linear.gemv fp32 gelu small",
    "linear.gemv bf16 sine small", "linear.split_dw bf16 gelu",
    "mlp.gemm fp32 gelu w64 atomic", "mlp.gemm bf16 gelu w128 atomic", "mlp.gemv bf16 gelu w128",
    "hyper fp32 relu n1", "hyper bf16 gelu n1",
}


def all_cases() -> list[Case]:
    """The full set (``make compile-check``). float32 (tf32x3) and bfloat16 get every path and activation; tf32 and
    float16 (whose 16-bit tiles are bfloat16's) the main paths with gelu."""
    cases: list[Case] = []

    def add(name, family, cls, run):
        cases.append(Case(name, family, cls, run, name in CI_CASES))

    for cls in DTYPE_CLASSES:
        main = cls in ("fp32", "bf16")
        # Linear / conv1x1. Small shapes are unaligned (the most registers: no vector loads), large ones keep the
        # most configs in the pruning.
        for act in (ACTS_ALL if main else ("gelu",)):
            a = act or "none"
            add(f"linear.gemm {cls} {a} small", "linear", cls, _linear_case(cls, act, 3, 33, 33, 65))
            add(f"linear.gemv {cls} {a} small", "linear", cls, _linear_case(cls, act, 7, 1, 33, 17))
        for act in (("relu", "gelu") if main else ("gelu",)):
            add(f"linear.gemm {cls} {act} large", "linear", cls, _linear_case(cls, act, 8, 4096, 256, 256))
            add(f"linear.gemv {cls} {act} large", "linear", cls, _linear_case(cls, act, 4096, 1, 256, 256))
        add(f"linear.split_dw {cls} gelu", "linear", cls, _linear_case(cls, "gelu", 2, 8192, 64, 64))
        if main:
            add(f"conv1x1.gemm {cls} gelu", "conv1x1", cls, _linear_case(cls, "gelu", 2, 1024, 64, 64, conv=True))
            add(f"conv1x1.gemv {cls} relu", "conv1x1", cls, _linear_case(cls, "relu", 64, 1, 96, 48, conv=True))
            add(f"linear.fold_shared {cls} gelu", "linear", cls,
                _linear_case(cls, "gelu", 512, 1, 128, 128, shared=True))
            add(f"linear.odd_offset {cls} gelu", "linear", cls,
                _linear_case(cls, "gelu", 4, 100, 30, 50, odd_offset=True))
            add(f"linear.no_bias {cls} sine", "linear", cls, _linear_case(cls, "sine", 4, 64, 64, 64, bias=False))
            add(f"linear.dx_only {cls} gelu", "linear", cls,
                _linear_case(cls, "gelu", 4, 64, 64, 64, mask=(True, False, False)))
            add(f"linear.dw_only {cls} gelu", "linear", cls,
                _linear_case(cls, "gelu", 4, 64, 64, 64, mask=(False, True, True)))
            # One sample spanning 2^31 elements (int64 offsets inside it) and 2^22 samples (a grid of millions).
            add(f"linear.index64 {cls} relu", "linear", cls, _linear_case(cls, "relu", 2, 2**23 + 16, 256, 64))
            add(f"linear.huge_batch {cls} relu", "linear", cls, _linear_case(cls, "relu", 2**22, 1, 64, 64))

        # Fused MLP: N > 1 forward + backward (atomic dW: few samples), N = 1 forward + backward (GEMV).
        for net in ("w64", "w128", "w256"):
            for act in (("relu", "gelu") if main else ("gelu",)):
                add(f"mlp.gemm {cls} {act} {net} atomic", "mlp", cls, _mlp_case(cls, act, MLP_NETS[net], 8, 1024))
                add(f"mlp.gemv {cls} {act} {net}", "mlp", cls, _mlp_case(cls, act, MLP_NETS[net], 4096, 1))
        if main:
            sizes = MLP_NETS["w128"]
            add(f"mlp.gemm {cls} sine w64 atomic", "mlp", cls, _mlp_case(cls, "sine", MLP_NETS["w64"], 8, 1024))
            add(f"mlp.gemm {cls} relu odd atomic", "mlp", cls, _mlp_case(cls, "relu", MLP_NETS["odd"], 8, 100))
            add(f"mlp.gemv {cls} tanh odd", "mlp", cls, _mlp_case(cls, "tanh", MLP_NETS["odd"], 100, 1))
            # The other backward modes: one program per sample (B fills the GPU), deterministic splits, dx or
            # dparams alone, an output activation, and a shared parameter row with one point per sample (folded).
            add(f"mlp.gemm {cls} gelu w128 per_sample", "mlp", cls, _mlp_case(cls, "gelu", sizes, 1024, 256))
            add(f"mlp.gemm {cls} relu w128 deterministic", "mlp", cls,
                _mlp_case(cls, "relu", sizes, 8, 1024, deterministic=True))
            add(f"mlp.gemm {cls} relu w128 dx_only", "mlp", cls, _mlp_case(cls, "relu", sizes, 8, 1024,
                                                                        mask=(True, False)))
            add(f"mlp.gemm {cls} silu w128 sigmoid_out dw_only", "mlp", cls,
                _mlp_case(cls, "silu", sizes, 8, 1024, out_act="sigmoid", mask=(False, True)))
            add(f"mlp.fold_shared {cls} relu w128", "mlp", cls,
                _mlp_case(cls, "relu", sizes, 512, 1, shared=True, forward_only=True))

        # hyper_linear: N = 1 and N = 8 (row GEMMs, dG with split rows, dz).
        for act in ((None, "relu", "gelu", "sine") if main else ("gelu",)):
            a = act or "none"
            add(f"hyper {cls} {a} n1", "hyper", cls, _hyper_case(cls, act, 1024, 1, 64, 128, 128))
            if act in ("gelu", "relu"):
                add(f"hyper {cls} {a} n8", "hyper", cls, _hyper_case(cls, act, 128, 8, 64, 128, 128))
        add(f"hyper {cls} relu small_nobias", "hyper", cls,
            _hyper_case(cls, "relu", 3, 5, 7, 9, 11, bias=False, head_bias=False))
        if main:  # odd widths: element-wise addresses (the dz kernel's registers)
            add(f"hyper {cls} gelu odd", "hyper", cls, _hyper_case(cls, "gelu", 3, 5, 7, 9, 11))
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), "case names must be unique"
    missing = CI_CASES - set(names)
    assert not missing, f"CI_CASES not in the full set: {missing}"
    return cases


def kernel_name(fn) -> str:
    """A kernel as the records, SPILL_EXCEPTIONS and bench/results/gpu_resources.md name it: its op and its function
    name, e.g. ``linear._fwd_gemm_kernel`` for the one in ``linear_gemm.py`` (the op's regime files share its name)."""
    module = fn.__module__.rsplit(".", 1)[-1]
    return f"{re.sub(r'_(gemv|gemm)$', '', module)}.{fn.__name__}"


def kernel_modules() -> list:
    """The modules of the Triton backend that define kernels."""
    import importlib
    import pkgutil

    import hyperkernels.backends.triton as package

    names = sorted(m.name for m in pkgutil.iter_modules(package.__path__))
    return [importlib.import_module(f"{package.__name__}.{name}") for name in names]


def _python_fn(kernel):
    """The Python function under an autotuned / heuristic / jitted kernel."""
    fn = kernel
    while not hasattr(fn, "__code__"):
        fn = fn.fn
    return fn


def backend_kernels() -> dict:
    """Every kernel the Triton backend defines (an autotuned, heuristic or plain jitted function named *_kernel), by
    ``kernel_name``."""
    found = {}
    for mod in kernel_modules():
        for attr, obj in vars(mod).items():
            if attr.endswith("_kernel") and hasattr(obj, "run") and _python_fn(obj).__module__ == mod.__name__:
                found[kernel_name(_python_fn(obj))] = obj
    return found


def select(set_name: str, only: Optional[list] = None) -> list[str]:
    cases = all_cases()
    chosen = [c.name for c in cases if set_name == "full" or c.ci]
    if only:
        chosen = [n for n in chosen if any(o in n for o in only)]
    return chosen
