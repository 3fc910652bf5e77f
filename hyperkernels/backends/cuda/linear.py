r"""Per-sample linear / 1x1 conv on the CUDA C++ kernels: ``y[b] = act(x[b] @ W[b]^T + bias[b])``.

Thin wrappers over ``hyperkernels._cuda`` (``csrc/batched_linear.h`` states the launchers' contract). Each one
allocates the outputs and scratch with torch and passes ``data_ptr()`` values, sizes and strides in elements to
one launcher, as the fields of its argument struct (``LinearForwardArgs`` / ``LinearBackwardArgs``), on torch's
current stream of the tensors' device, with that device current. Nothing here synchronises with the host or
allocates outside torch's caching allocator, so the wrappers can be captured in a CUDA graph.

What the wrappers rely on, and so do not check again: the functional API validated the arguments
(``_validate.check_linear`` / ``check_conv1x1``: ranks, sizes that agree, one dtype and one device for x, weight
and bias); dispatch admitted this backend for the device type and dtype (``CudaBackend.check_support``) and sent
every empty problem (B, N, in or out = 0) to the torch backend (``_dispatch.resolve_backend``); the op's autograd
hands the backward a ``grad_y`` shaped like ``y``, and ``y`` / ``preact`` are the forward's own outputs. What
they check is what no layer above vouches for once the op is called by name (``backend="cuda"`` straight into
``torch.ops.hyperkernels``) and what a kernel would turn into a memory fault instead of an error: that x is a
CUDA tensor in a dtype the kernels have. The launchers check codes, sizes, null pointers and the workspace.

Layouts. The kernels see every tensor token-major: ``x (B, N, K)``, ``weight (B, M, K)``, ``bias (B, M)``,
``y / preact / grad_y / dz (B, N, M)``, ``dx (B, N, K)``, ``dW (B, M, K)``, ``db (B, M)``. A channel-major (1x1
conv) tensor ``(B, C, S)`` is passed as its transpose ``(B, S, C)``: the same pointer with the two inner strides
swapped, never a copy. Outputs are allocated contiguous in the op's layout.

Alignment is never required: the launchers pick 16-byte vector loads by themselves where an operand's pointer
and strides allow, and scalar loads otherwise (a weight view at an odd offset of a flat buffer works as is).

A weight shared by every sample (batch stride 0) with one token per sample (N = 1) is folded: the B tokens are
the rows of one GEMM against the one weight, ``(1, B, K)``, instead of B GEMVs that each re-read it (forward,
when the bias is absent or shared too, and the ``dx`` of the backward).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from ...activations import ACTIVATIONS, Activation
from .._precision import tf32_allowed
from . import _DTYPES

_ACT_NONE = ACTIVATIONS["none"]


# -- seams: the extension, the device check, the launch environment (tests replace these on CPU) -------------

def _ext():
    import hyperkernels._cuda as ext  # the dispatcher has checked that it imports (unavailable_reason)

    return ext


def _require_cuda(x: Tensor) -> None:
    if x.device.type != "cuda":
        raise ValueError(f"x: the cuda backend needs tensors on a CUDA device, got device {x.device} "
                         f"(use backend='torch' for {x.device.type} tensors)")


def _launch_env(device: torch.device) -> tuple[contextlib.AbstractContextManager, int]:
    """(a context making ``device`` current, torch's current stream on it as a cudaStream_t integer)."""
    return torch.cuda.device(device), torch.cuda.current_stream(device).cuda_stream


# -- what the kernels need of the tensors ----------------------------------------------------------------------

def _token_major(t: Optional[Tensor], channel_major: bool) -> Optional[Tensor]:
    """The (B, tokens, channels) view of a tensor in the op's layout (a transpose for channel-major)."""
    if t is None:
        return None
    return t.transpose(1, 2) if channel_major else t


def _check_launchable(x: Tensor) -> None:
    """What the kernels need that no layer above guarantees once the op is called by name (see the module
    docstring): x, and so every tensor the API checked against it, is on a CUDA device, in a dtype with kernels."""
    _require_cuda(x)
    if x.dtype not in _DTYPES:
        extra = " (float64 runs on backend='torch')" if x.dtype == torch.float64 else ""
        raise TypeError(f"x: the cuda backend supports dtypes {list(_DTYPES)}, got {x.dtype}{extra}")


def _dtype_code(ext, dtype: torch.dtype) -> int:
    return {torch.float32: ext.DTYPE_FLOAT32, torch.float16: ext.DTYPE_FLOAT16,
            torch.bfloat16: ext.DTYPE_BFLOAT16}[dtype]


def _sizes(x: Tensor, weight: Tensor, channel_major: bool) -> tuple[int, int, int]:
    """(B, N, M) of an op whose arguments the functional API validated."""
    batch, n = (x.shape[0], x.shape[2]) if channel_major else (x.shape[0], x.shape[1])
    return batch, n, weight.shape[1]


# -- launches -------------------------------------------------------------------------------------------------

def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _strides(t: Optional[Tensor], ndim: int = 3) -> tuple[int, ...]:
    return (0,) * ndim if t is None else tuple(t.stride())


def _fold(strides: tuple[int, int, int]) -> tuple[int, int, int]:
    """Strides of a (B, 1, C) tensor seen as (1, B, C): the samples become the rows of one sample."""
    return (0, strides[0], strides[2])


def _shared_single_token(n: int, batch: int, weight: Tensor) -> bool:
    return n == 1 and batch > 1 and weight.stride(0) == 0


def _forward(ext, stream: int, xt: Tensor, weight: Tensor, bias: Optional[Tensor], yt: Tensor,
             zt: Optional[Tensor], act_code: int, w0: float) -> None:
    """act(x W^T + b) into the token-major view ``yt``, and the pre-activation into ``zt`` (y's strides) if given."""
    batch, n, k = xt.shape
    m = weight.shape[1]
    sx, sy = _strides(xt), _strides(yt)
    if zt is not None:
        assert zt.stride() == yt.stride()  # allocated alike by the callers: the launcher takes one set of strides
    if _shared_single_token(n, batch, weight) and (bias is None or bias.stride(0) == 0):
        batch, n, sx, sy = 1, batch, _fold(sx), _fold(sy)
    sw, sb = _strides(weight), _strides(bias, 2)
    ext.linear_forward(ext.LinearForwardArgs(
        dtype=_dtype_code(ext, xt.dtype), act=act_code, w0=float(w0), allow_tf32=tf32_allowed(),
        B=batch, N=n, M=m, K=k,
        x=_ptr(xt), sxb=sx[0], sxn=sx[1], sxk=sx[2],
        w=_ptr(weight), swb=sw[0], swm=sw[1], swk=sw[2],
        bias=_ptr(bias), sbb=sb[0], sbm=sb[1],
        y=_ptr(yt), syb=sy[0], syn=sy[1], sym=sy[2],
        preact=_ptr(zt),
        stream=stream,
    ))


def _backward(ext, stream: int, *, fold: bool, gt: Tensor, xt: Tensor, weight: Tensor, saved: Optional[Tensor],
              saved_is_preact: bool, dzt: Optional[Tensor], dxt: Optional[Tensor], dw: Optional[Tensor],
              db: Optional[Tensor], act_code: int, w0: float) -> None:
    """One linear_backward launch: dz = grad_y * act'(saved), then the wanted ones of dx, dw, db (None: not wanted).
    ``fold``: the (B, 1, .) tensors are passed as one sample of B rows (only dx may be wanted then)."""
    batch, n, k = xt.shape
    m = weight.shape[1]
    sx, sg, ss, sdz, sdx = (_strides(t) for t in (xt, gt, saved, dzt, dxt))
    if fold:
        assert dw is None and db is None, "a folded launch computes dx only"
        batch, n = 1, batch
        sx, sg, sdx = _fold(sx), _fold(sg), _fold(sdx)
        ss = _fold(ss) if saved is not None else ss
        sdz = _fold(sdz) if dzt is not None else sdz
    need_dw, need_db = dw is not None, db is not None
    workspace_bytes = ext.linear_backward_workspace_size(B=batch, N=n, M=m, K=k, need_dw=need_dw, need_db=need_db)
    workspace = None
    if workspace_bytes > 0:  # float32 scratch for split reductions; torch allocations are 512-byte aligned
        workspace = torch.empty(((workspace_bytes + 3) // 4,), dtype=torch.float32, device=xt.device)
    sw, sdw, sdb = _strides(weight), _strides(dw), _strides(db, 2)
    ext.linear_backward(ext.LinearBackwardArgs(
        dtype=_dtype_code(ext, xt.dtype), act=act_code, w0=float(w0), allow_tf32=tf32_allowed(),
        B=batch, N=n, M=m, K=k,
        x=_ptr(xt), sxb=sx[0], sxn=sx[1], sxk=sx[2],
        w=_ptr(weight), swb=sw[0], swm=sw[1], swk=sw[2],
        dy=_ptr(gt), sdyb=sg[0], sdyn=sg[1], sdym=sg[2],
        saved=_ptr(saved), ssb=ss[0], ssn=ss[1], ssm=ss[2], saved_is_preact=saved_is_preact,
        dz=_ptr(dzt), sdzb=sdz[0], sdzn=sdz[1], sdzm=sdz[2],
        dx=_ptr(dxt), sdxb=sdx[0], sdxn=sdx[1], sdxk=sdx[2],
        dw=_ptr(dw), sdwb=sdw[0], sdwm=sdw[1], sdwk=sdw[2],
        db=_ptr(db), sdbb=sdb[0], sdbm=sdb[1],
        workspace=_ptr(workspace), workspace_bytes=0 if workspace is None else workspace.numel() * 4,
        stream=stream,
    ))


# -- the backend interface (hyperkernels/backends/__init__.py) -------------------------------------------------

def linear_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: Activation, w0: float,
                   channel_major: bool, save_preact: bool) -> tuple[Tensor, Tensor]:
    """``(y, preact)``, contiguous in the op's layout; ``preact`` is empty unless ``save_preact`` and the
    activation's derivative needs it (what the op's fake implementation promises)."""
    _check_launchable(x)
    batch, n, m = _sizes(x, weight, channel_major)
    keep = save_preact and act.needs_preactivation
    shape = (batch, m, n) if channel_major else (batch, n, m)
    y = x.new_empty(shape)
    z = x.new_empty(shape) if keep else None
    ext = _ext()
    ctx, stream = _launch_env(x.device)
    with ctx:
        _forward(ext, stream, _token_major(x, channel_major), weight, bias, _token_major(y, channel_major),
                 _token_major(z, channel_major), act.code, w0)
    return y, (z if keep else x.new_empty(0))


def linear_backward(grad_y: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], y: Tensor, preact: Tensor,
                    act: Activation, w0: float, channel_major: bool, output_mask) -> tuple:
    """``(dx, dweight, dbias)``, each contiguous (``dx`` in x's layout) or None where ``output_mask`` says it is not
    needed. ``preact`` may be empty: for activations whose derivative needs it, it is recomputed (one forward
    launch without activation)."""
    need_dx, need_dw, need_db = (bool(v) for v in output_mask)
    _check_launchable(x)
    batch, n, m = _sizes(x, weight, channel_major)
    given_preact = None  # read only by activations whose derivative needs z; empty: not kept by the forward
    if act.needs_preactivation and preact.numel() > 0:
        given_preact = preact
    dx = x.new_empty(x.shape) if need_dx else None  # contiguous in x's layout
    dw = x.new_empty(weight.shape) if need_dw else None
    db = x.new_empty((batch, m)) if need_db else None
    if not (need_dx or need_dw or need_db):
        return dx, dw, db
    ext = _ext()
    ctx, stream = _launch_env(x.device)
    with ctx:
        xt, gt = _token_major(x, channel_major), _token_major(grad_y, channel_major)
        if act.code == _ACT_NONE.code:
            saved, saved_is_preact = None, False
        elif act.needs_preactivation:
            if given_preact is None:  # the forward kept none (no grad mode, or called directly): recompute z
                given_preact = x.new_empty(grad_y.shape)
                _forward(ext, stream, xt, weight, bias, _token_major(given_preact, channel_major), None,
                         _ACT_NONE.code, w0)
            saved, saved_is_preact = _token_major(given_preact, channel_major), True
        else:  # relu / tanh / sigmoid: the derivative from the output
            saved, saved_is_preact = _token_major(y, channel_major), False
        dz = None
        if act.code != _ACT_NONE.code and (need_dx or need_dw):
            dz = torch.empty_like(grad_y)  # grad_y's strides where it is dense, else contiguous
        dzt, dxt = _token_major(dz, channel_major), _token_major(dx, channel_major)
        common = dict(gt=gt, xt=xt, weight=weight, saved=saved, saved_is_preact=saved_is_preact, dzt=dzt,
                      act_code=act.code, w0=w0)
        if need_dx and _shared_single_token(n, batch, weight):
            _backward(ext, stream, fold=True, dxt=dxt, dw=None, db=None, **common)
            dxt = None
        if dxt is not None or need_dw or need_db:
            _backward(ext, stream, fold=False, dxt=dxt, dw=dw, db=db, **common)
    return dx, dw, db
