"""Backend registry, availability, and the rules of ``backend="auto"`` — all in one place."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping, Optional, Sequence

import torch

from ._validate import BACKEND_NAMES, check_backend
from .backends import Backend
from .backends.torch import hyper_linear as _torch_hyper

__all__ = ["BackendUnavailableError", "available_backends", "get_backend", "resolve_backend", "BACKEND_NAMES",
           "HyperShape", "generate_is_better", "hyper_linear_costs"]


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot run in this process (not built, not installed, no device)."""


# Concrete implementations, by the name the ops receive, and where each lives.
# "torch_bmm" and "torch_conv" are the two formulations of the pure-PyTorch backend.
_IMPLEMENTATIONS = {
    "torch_bmm": ("hyperkernels.backends.torch", "bmm"),
    "torch_conv": ("hyperkernels.backends.torch", "conv"),
    "triton": ("hyperkernels.backends.triton", None),
    "cuda": ("hyperkernels.backends.cuda", None),
}

# The backend method that implements each op: a backend without it does not run that op.
_OP_METHODS = {"batched_linear": "linear_forward", "batched_conv1x1": "linear_forward",
               "batched_mlp": "mlp_forward", "hyper_linear": "hyper_linear_forward"}



@lru_cache(maxsize=None)
def get_backend(name: str) -> Backend:
    """The backend object of a concrete implementation name (not "auto" / "torch")."""
    if name not in _IMPLEMENTATIONS:
        raise ValueError(f"backend: expected one of {list(_IMPLEMENTATIONS)}, got {name!r}")
    module_name, variant = _IMPLEMENTATIONS[name]
    return importlib.import_module(module_name).make_backend(variant)


# The availability and support checks below run eagerly under torch.compile and are kept as constants:
# traced, get_backend's import_module would break the graph.
@torch.compiler.assume_constant_result
def _unavailable_reason(name: str) -> Optional[str]:
    try:
        backend = get_backend(name)
    except ImportError as exc:  # the backend's own dependency is missing
        return f"importing it failed: {exc}"
    return backend.unavailable_reason()


def available_backends() -> dict[str, Optional[str]]:
    """``{name: None if usable else the reason it is not}`` for every concrete backend."""
    return {name: _unavailable_reason(name) for name in _IMPLEMENTATIONS}


# -- the "auto" rules ----------------------------------------------------------------------------

# The pure-PyTorch formulation: bmm. Measured on this project's 2-core CPU (bench/torch_formulations.py,
# table in bench/results/cpu_torch_formulations.md), bmm is faster than grouped Conv1d (groups = B) for
# forward+backward on every shape tried, in both layouts, by 1.1x to 4x; grouped conv only wins some
# channel-major forward passes at N >= 1024, and not consistently. "torch_conv" stays selectable by name.
_TORCH_FORMULATION = "torch_bmm"
_TORCH_IMPLEMENTATIONS = ("torch_bmm", "torch_conv")

# With the torch backend, an op runs as its plain PyTorch composition under autograd where the custom op would
# only add its dispatch overhead (~15 us forward, ~70 us backward per call, measured on this CPU) and hide the
# composition from inductor: per-sample linear and conv1x1 always. The fused MLP's op earns its place by
# writing one (B, P) gradient where autograd writes a zero-filled (B, P) buffer per layer view; that matters
# while few points share each sample's weights. MLP [16,64,64,64,16], forward+backward, op / composition ms
# (2-core CPU): N=1 B=1024 27 / 134, N=4 B=512 7.3 / 31, N=16 B=256 5.6 / 8.9, N=64 B=128 6.8 / 7.7,
# N=256 B=32 4.9 / 4.6, N=1024 B=8 4.5 / 4.0.
_TORCH_MLP_COMPOSITION_MIN_N = 128


# Triton on CUDA for the dtypes it has kernels for: one fused launch (bias and activation in the epilogue,
# strided weights read in place) against bmm's separate matmul, bias and activation passes. float64 has no
# tensor-core path there, and on CPU Triton is only the interpreter, a test tool: both stay on torch.
# (Expected from the design, not yet measured on a GPU.)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _triton_usable() -> bool:
    return _unavailable_reason("triton") is None


@torch.compiler.assume_constant_result
def _support_reason(name: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    return get_backend(name).check_support(device, dtype)


@torch.compiler.assume_constant_result
def implements(name: str, op: str) -> bool:
    return hasattr(get_backend(name), _OP_METHODS[op])


def runs_as_composition(impl: str, op: str, n: int) -> bool:
    """Whether the op runs as its pure-PyTorch composition under autograd rather than as the custom op: under
    torch.func transforms always (they reject custom ops whose autograd comes from register_autograd,
    pytorch/pytorch#170834, open in torch 2.13), and for the torch backend where the op buys nothing."""
    if torch._C._are_functorch_transforms_active():
        return True
    if impl not in _TORCH_IMPLEMENTATIONS or op == "hyper_linear":
        return False
    return op != "batched_mlp" or n >= _TORCH_MLP_COMPOSITION_MIN_N


@torch.compiler.assume_constant_result
def mlp_saves_layers(name: str, single_point: bool) -> bool:
    """Whether the backend's MLP forward should save each layer's values for its backward (see Backend)."""
    return get_backend(name).mlp_saves_layers(single_point)


@torch.compiler.assume_constant_result
def _mlp_max_width(name: str) -> int:
    """The widest layer the backend's fused MLP kernels take; wider nets stay on torch."""
    return get_backend(name).mlp_max_width


def _auto(op: str, device: torch.device, dtype: torch.dtype, widths: tuple) -> str:
    if device.type == "cuda" and dtype in _TRITON_DTYPES and _triton_usable() and implements("triton", op):
        if op != "batched_mlp" or max(widths) <= _mlp_max_width("triton"):
            return "triton"
    return _TORCH_FORMULATION


# -- hyper_linear: fused, or generate-then-apply ------------------------------------------------------
# Under "auto", hyper_linear may also run as generate-then-apply: materialise the per-sample weights with one GEMM
# (F.linear(h, head_weight, head_bias)) and run batched_linear on them ("auto" again). Both ways do about the
# same FLOPs at N = 1 (the fused op N times those of generating the weights at N points per sample); what
# differs is what each writes to memory: the fused op never writes the B*out*in weights, but the torch backend
# forms (B*N, in*K) outer products x (x) h instead (three times in forward+backward, in chunks), and its
# GEMMs against a head of out rows are skinny when out is small. So the rule is a cost model of both ways: the
# FLOPs, the bytes moved and the calls of every pass each one makes, and the temporaries it allocates, priced
# with constants measured on the device kind (below).


@dataclass(frozen=True)
class HyperShape:
    """One generated layer ``y[b] = act(W[b] x[b] + c[b])``, ``[W[b], c[b]] = head(h[b])``, as the cost model
    sees it. ``grad``: a backward will run (the gradients of h and the head); ``x_grad``: it needs x's too.
    ``mlp_op``: generate-then-apply runs this layer inside one ``batched_mlp`` op with its neighbours (a
    ``HyperNetwork`` target's run of ``nn.Linear`` layers where that op runs, ``nn/_kernels.fused_mlp_worth_it``),
    whose backward writes the layer's weight gradient once, untransposed, into one ``(B, P)`` gradient, where a
    lone ``batched_linear`` leaves autograd a transposed ``dW`` and a zero-filled ``(B, P)`` buffer per view."""

    batch: int
    n: int
    in_features: int
    out_features: int
    cond: int
    bias: bool = True
    head_bias: bool = True
    itemsize: int = 4
    grad: bool = True
    x_grad: bool = False
    mlp_op: bool = False


# The terms of a Work that take time, each priced in seconds per unit by a Machine.
TIME_TERMS = ("gemm_flops", "bmm_flops", "bmm_products", "bytes", "transpose_bytes", "fresh_bytes", "calls")


@dataclass(frozen=True)
class Work:
    """What one way of running layers costs. Time: ``gemm_flops`` (GEMMs with large operands, BLAS at full speed),
    ``bmm_flops`` and ``bmm_products`` (per-sample products of small matrices: their FLOPs, and how many there are,
    B per bmm call, each with its own set-up cost), ``bytes`` (read and written by every pass, GEMM operands
    included), ``transpose_bytes`` (read and written by copies that transpose, far slower per byte),
    ``fresh_bytes`` (allocations that get new pages from the OS on every call, see ``_fresh``) and
    ``calls`` (ops launched). Memory, in bytes: ``saved`` (kept from the forward to the end of the backward,
    outputs included), ``fwd_transient`` (the forward's largest temporaries), ``grads`` (what the backward
    returns or accumulates) and ``bwd_transient`` (the backward's largest temporaries)."""

    gemm_flops: float = 0.0
    bmm_flops: float = 0.0
    bmm_products: float = 0.0
    bytes: float = 0.0
    transpose_bytes: float = 0.0
    fresh_bytes: float = 0.0
    calls: float = 0.0
    saved: float = 0.0
    fwd_transient: float = 0.0
    grads: float = 0.0
    bwd_transient: float = 0.0

    def then(self, other: "Work") -> "Work":
        """This, then ``other``: a layer then the next (time and kept memory add up; the temporaries of one layer
        are freed before the next one's), or a forward then its backward (which has no ``saved``, as a forward has
        no ``grads``)."""
        terms = {t: getattr(self, t) + getattr(other, t) for t in TIME_TERMS}
        return Work(**terms, saved=self.saved + other.saved, grads=self.grads + other.grads,
                    fwd_transient=max(self.fwd_transient, other.fwd_transient),
                    bwd_transient=max(self.bwd_transient, other.bwd_transient))

    @property
    def peak_bytes(self) -> float:
        """Memory at the peak of forward+backward (forward only: ``grads`` and ``bwd_transient`` are 0)."""
        return self.saved + max(self.fwd_transient, self.grads + self.bwd_transient)


@dataclass(frozen=True)
class Machine:
    """The prices of :class:`Work` on one device kind: ``seconds_per[term]`` for each of ``TIME_TERMS``;
    ``source`` says where they come from."""

    seconds_per: Mapping[str, float]
    source: str

    def seconds(self, work: Work) -> float:
        return sum(self.seconds_per[t] * getattr(work, t) for t in TIME_TERMS)


# CPU, the torch backend: fitted (least squares on relative error) to the fused and the generate forward+backward
# and forward times of 64 float32 layers (CPU time of one thread, the min of 7 interleaved rounds) by
# `python bench/hyper_crossover.py --threads 1 --clock cpu --fit`: relative error of the model on them, median
# 10%, 90th percentile 27%; the table, and a check of the choices in wall time, are in
# bench/results/cpu_hyper_crossover.md. CPU time of one thread because the 2-core machine is shared: its wall
# times are inflated by other processes' time slices, more so with two threads waiting for each other. The
# rule compares the two ways' times, and uses these prices for any number of threads and any dtype (priced by
# its itemsize). calls: the fit resolved no per-op cost. Summed over a whole HyperNetwork target (table 3 there,
# `python bench/hyper_crossover.py --threads 1 --clock cpu --networks`), with generate's layers priced as one
# batched_mlp op where it runs (HyperShape.mlp_op), these prices pick the faster way on all 14 rows.
_CPU = Machine(dict(gemm_flops=1 / 1.14e11, bmm_flops=1 / 4.92e10, bmm_products=2.38e-7, bytes=1 / 1.25e10,
                    transpose_bytes=1 / 2.1e9, fresh_bytes=1 / 1.68e9, calls=0.0),
               source="measured: bench/hyper_crossover.py on a 2-core CPU")
# GPU, the Triton kernels: NOT MEASURED (no GPU has run this rule). Prices from the design, for an H100-class
# device: ~3 TB/s of memory bandwidth; dense GEMMs at ~700 TFLOP/s in 16-bit types and ~60 TFLOP/s in float32
# (TF32 not assumed); ~5 us a launch; PyTorch's caching allocator reuses memory (no fresh pages); the Triton
# batched_linear is one launch over all samples (no per-sample set-up). Until `bench/hyper_crossover.py --device
# cuda --fit` measures them.
_GPU_BYTES_PER_S = 3.0e12
_GPU_FLOPS_PER_S = {2: 700e12, 4: 60e12, 8: 30e12}
_GPU_SECONDS_PER_CALL = 5e-6


def _gpu_machine(itemsize: int) -> Machine:
    flops = _GPU_FLOPS_PER_S.get(itemsize, _GPU_FLOPS_PER_S[4])
    return Machine(dict(gemm_flops=1 / flops, bmm_flops=1 / flops, bmm_products=0.0, bytes=1 / _GPU_BYTES_PER_S,
                        transpose_bytes=1 / _GPU_BYTES_PER_S, fresh_bytes=0.0, calls=_GPU_SECONDS_PER_CALL),
                   source="design, not measured")


# glibc (the CPU allocator under PyTorch on Linux) serves an allocation above its largest mmap threshold, 32 MiB,
# with a fresh mmap on every call, whose pages fault in on first touch (measured ~0.4 ms per MiB on the 2-core
# CPU; below the threshold freed memory is reused at no cost).
_FRESH_THRESHOLD = 32 * 2**20


def _fresh(nbytes: float) -> float:
    return nbytes if nbytes > _FRESH_THRESHOLD else 0.0


# Where the predicted times of the two ways are this close, the one that needs less memory is taken: the
# model's median error on the measured grid is of this order, so time cannot tell them apart there.
_HYPER_TIME_TIE = 0.10


def _torch_chunks(batch: int, n: int, rows: int) -> tuple[int, int]:
    """``(chunks, rows of the largest)`` of the torch backend's ``_chunks`` over ``(B, N)`` at ``rows`` a chunk."""
    if n <= rows:
        per = rows // n
        return -(-batch // per), min(batch, per) * n
    return batch * -(-n // rows), rows


def fused_work_torch(s: HyperShape) -> Work:
    """The torch backend's hyper_linear (backends/torch/hyper_linear.py): chunked outer products."""
    b, n, i, o, k, z = s.batch, s.n, s.in_features, s.out_features, s.cond, s.itemsize
    r, ik, p = b * n, i * k, o * i + o * s.bias
    chunks_f, rows_f = _torch_chunks(b, n, _torch_hyper.chunk_rows(i, k, z, 1, o))
    fwd = Work(
        gemm_flops=2.0 * r * ik * o + s.head_bias * 2.0 * r * i * o + s.bias * 2.0 * b * k * o,
        # u = x (x) h written and read by the GEMM; x, h, the head per chunk; z set, accumulated; the activation.
        bytes=z * (2.0 * r * ik + r * i + b * k + o * ik * chunks_f + 5.0 * r * o),
        calls=4 + 2 * chunks_f,
        fresh_bytes=_fresh(z * rows_f * ik),
        saved=z * 2.0 * r * o,  # y and the pre-activation
        fwd_transient=z * rows_f * ik,
    )
    if not s.grad:
        return fwd
    chunks, rows_b = _torch_chunks(b, n, _torch_hyper.chunk_rows(i, k, z, 2, o))
    bwd = Work(
        # dG_W = dz^T u and V = dz G_W over every chunk; the bias rows, the head bias and dx's g_W term.
        gemm_flops=4.0 * r * ik * o + s.bias * 4.0 * b * o * k + s.head_bias * (1 + s.x_grad) * 2.0 * r * i * o,
        bmm_flops=(1 + s.x_grad) * 2.0 * r * ik,  # dh (and dx) contract V with x (h) per sample
        bmm_products=(1 + s.x_grad) * b,
        # dz; zero-filled dG; u written and read; V written and read (twice with dx); dG_W accumulated per chunk.
        bytes=z * (3.0 * r * o + p * k + b * k + (4.0 + s.x_grad) * r * ik + 2.0 * o * ik * chunks
                   + (1 + s.x_grad) * r * i),
        calls=8 + (4 + s.x_grad) * chunks,
        fresh_bytes=2 * _fresh(z * rows_b * ik) + _fresh(z * p * k),
        grads=z * (p * k + p + b * k + s.x_grad * r * i + r * o),
        bwd_transient=z * rows_b * ik * 2,
    )
    return fwd.then(bwd)


def fused_work_triton(s: HyperShape) -> Work:
    """The Triton kernels (backends/triton/hyper_linear.py): outer products formed in registers, never stored."""
    b, n, i, o, k, z = s.batch, s.n, s.in_features, s.out_features, s.cond, s.itemsize
    r, p = b * n, o * i + o * s.bias
    fwd = Work(gemm_flops=2.0 * r * i * k * o + s.head_bias * 2.0 * r * i * o + s.bias * 2.0 * r * k * o,
               bytes=z * (r * i + b * k + p * k + 2.0 * r * o), calls=1, saved=z * 2.0 * r * o)
    if not s.grad:
        return fwd
    bwd = Work(
        gemm_flops=(2 + s.x_grad) * 2.0 * r * i * k * o,  # dh, dG_W (and dx): each as large as the forward
        # dz; the head read per GEMM, the (O, K, I) copy for dx; the float32 (B*N, K) partial sums of dh.
        bytes=z * (3.0 * r * o + (3 + 2 * s.x_grad) * p * k + (1 + s.x_grad) * r * i) + 8.0 * r * k,
        calls=4 + 2 * s.x_grad,
        grads=z * (p * k + p + b * k + s.x_grad * r * i + r * o),
        bwd_transient=z * s.x_grad * p * k + 4.0 * r * k,
    )
    return fwd.then(bwd)


def generate_work(s: HyperShape) -> Work:
    """Generate-then-apply: theta = F.linear(h, head) (B, P), then batched_linear on its (B, O, I) view; in the
    backward, autograd turns each view's gradient into a zero-filled (B, P) buffer, then the head's GEMMs. With
    ``s.mlp_op``, the layer's share of one ``batched_mlp`` op instead (see :class:`HyperShape`)."""
    b, n, i, o, k, z = s.batch, s.n, s.in_features, s.out_features, s.cond, s.itemsize
    r, p = b * n, o * i + o * s.bias
    if s.mlp_op:
        return _generate_mlp_op_work(s)
    # With a head bias, addmm first copies it into every row of theta, then accumulates the GEMM onto it.
    fwd = Work(gemm_flops=2.0 * b * k * p, bmm_flops=2.0 * r * i * o, bmm_products=b,
               bytes=z * (b * k + p * k + (1 + 2 * s.head_bias) * b * p + r * i + b * o * i + 4.0 * r * o),
               calls=4, fresh_bytes=_fresh(z * b * p) + 2 * _fresh(z * r * o), saved=z * (b * p + 2.0 * r * o))
    if not s.grad:
        return fwd
    views = 1 + s.bias
    grads = p * k + p + b * k + s.x_grad * r * i + r * o
    bwd = Work(
        gemm_flops=4.0 * b * p * k,  # dG = dtheta^T h, dh = dtheta G
        bmm_flops=(1 + s.x_grad) * 2.0 * r * i * o,  # dW (and dx)
        bmm_products=(1 + s.x_grad) * b,
        # dW comes out of bmm as (B, in, out): the (B, out*in) slice of theta's gradient takes it transposed.
        transpose_bytes=z * 2.0 * b * o * i,
        bytes=z * (4.0 * r * o + (1 + s.x_grad) * (r * o + b * o * i + r * i) + (3.0 * views - 1) * b * p
                   + 2.0 * (b * p + p * k + b * k) + b * p),
        calls=8 + 2 * views,
        fresh_bytes=_fresh(z * b * o * i) + views * _fresh(z * b * p) + _fresh(z * p * k),
        grads=z * grads,
        # On top of what the forward saved: dW and the first view's zero-filled (B, P) gradient, then each view's;
        # then theta's summed gradient while the head's gradients are computed from it.
        bwd_transient=z * (max(b * o * i + b * p, views * b * p, b * p + grads) - grads),
    )
    return fwd.then(bwd)


def _generate_mlp_op_work(s: HyperShape) -> Work:
    """A layer's share of generate-then-apply when the target runs as one ``batched_mlp`` op (backends/torch/
    mlp.py): the forward as :func:`generate_work`'s; the backward writes ``dW`` straight into its slice of the
    op's ``(B, P)`` gradient (at one point per sample an outer product, else a bmm then a plain copy), each entry
    once: no transposing copy, no zero fill, no per-view buffer summed by autograd."""
    b, n, i, o, k, z = s.batch, s.n, s.in_features, s.out_features, s.cond, s.itemsize
    r, p = b * n, o * i + o * s.bias
    fwd = generate_work(HyperShape(b, n, i, o, k, s.bias, s.head_bias, z, False, False))
    if not s.grad:
        return fwd
    grads = p * k + p + b * k + s.x_grad * r * i + r * o
    dw_copy = 2.0 * b * o * i if n > 1 else 0.0  # bmm's (B, O, I) result copied into the strided slice
    bwd = Work(
        gemm_flops=4.0 * b * p * k,  # dG = dtheta^T h, dh = dtheta G
        bmm_flops=(1 + s.x_grad) * 2.0 * r * i * o,  # dW (and dx)
        bmm_products=(1 + s.x_grad) * b,
        # dz and the activation; dW (and dx) read their operands; the slice of dtheta written once; the head's
        # GEMMs read dtheta, G, h and write dG, dh.
        bytes=z * (4.0 * r * o + (1 + s.x_grad) * (r * o + b * o * i + r * i) + b * p + dw_copy
                   + 2.0 * (b * p + p * k + b * k)),
        calls=6,
        fresh_bytes=_fresh(z * b * p) + _fresh(z * p * k) + (_fresh(z * b * o * i) if n > 1 else 0.0),
        grads=z * grads,
        # dtheta, held while the head's gradients are computed from it (and bmm's dW before its copy).
        bwd_transient=z * (b * p + (b * o * i if n > 1 else 0)),
    )
    return fwd.then(bwd)


def _fused_impl(device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs hyper_linear fused here: Triton on CUDA for its dtypes, else the torch backend."""
    if device.type == "cuda" and dtype in _TRITON_DTYPES and _triton_usable() and implements("triton", "hyper_linear"):
        return "triton"
    return _TORCH_FORMULATION


def hyper_linear_costs(impl: str, device: torch.device, layers: Sequence[HyperShape],
                       machine: Optional[Machine] = None) -> dict:
    """``{"fused": (seconds, peak bytes), "generate": (...)}`` predicted for running ``layers`` one after the other
    with the fused backend ``impl`` or by generate-then-apply, at the prices of ``machine`` (default: those of the
    device kind)."""
    if machine is None:
        machine = _gpu_machine(layers[0].itemsize) if device.type == "cuda" else _CPU
    fused_work = fused_work_triton if impl == "triton" else fused_work_torch
    out = {}
    for way, cost in (("fused", fused_work), ("generate", generate_work)):
        total = cost(layers[0])
        for layer in layers[1:]:
            total = total.then(cost(layer))
        out[way] = (machine.seconds(total), total.peak_bytes)
    return out


def generate_is_better(device: torch.device, dtype: torch.dtype, layers: Sequence[HyperShape],
                       impl: Optional[str] = None, machine: Optional[Machine] = None) -> bool:
    """hyper_linear's "auto": whether generate-then-apply beats the fused backend ``impl`` (default: the one "auto"
    runs fused here) for ``layers`` run one after the other (one layer for ``hyper_linear``, every generated layer
    of a ``HyperNetwork``). The faster way by the cost model; within ``_HYPER_TIME_TIE`` of each other, the one
    with the smaller peak memory. Without layers, False."""
    if not layers:
        return False
    costs = hyper_linear_costs(impl or _fused_impl(device, dtype), device, layers, machine)
    (t_f, m_f), (t_g, m_g) = costs["fused"], costs["generate"]
    if abs(t_f - t_g) <= _HYPER_TIME_TIE * min(t_f, t_g):
        return m_g < m_f
    return t_g < t_f


def resolve_backend(requested: str, *, op: str, device: torch.device, dtype: torch.dtype, empty: bool = False,
                    widths: Sequence[int] = ()) -> str:
    """Turn the user's ``backend=`` into the name of the implementation that runs ``op`` on tensors of this device
    and dtype, or raise a clear error. ``empty``: the problem has no elements to compute (a zero batch, points,
    input or output size); bmm runs those, keeping autograd intact. ``widths``: every layer width of a
    batched_mlp (in, hidden..., out), which "auto" needs. For hyper_linear the answer is the backend that runs it
    fused; whether "auto" generates the weights instead is :func:`generate_is_better`'s call."""
    check_backend(requested)
    if empty:
        return _TORCH_FORMULATION
    if requested == "auto":
        if op == "hyper_linear":
            return _fused_impl(device, dtype)
        return _auto(op, device, dtype, tuple(widths))
    name = _TORCH_FORMULATION if requested == "torch" else requested
    reason = _unavailable_reason(name)
    if reason is not None:
        raise BackendUnavailableError(f"backend={requested!r} is not available: {reason}")
    if not implements(name, op):
        doing = [b for b in _IMPLEMENTATIONS if _unavailable_reason(b) is None and implements(b, op)]
        raise ValueError(f"backend={requested!r} does not implement {op}; available backends that do: {doing}")
    reason = _support_reason(name, device, dtype)
    if reason is not None:
        raise ValueError(f"backend={requested!r} cannot run {op} here: {reason}")
    return name
