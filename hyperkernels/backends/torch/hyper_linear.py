r"""Hyper-fused linear in pure PyTorch: run a target layer straight from the hypernetwork's last hidden state.

The head ``theta[b] = G h[b] + g`` (``G = head_weight (P, K)``, ``g = head_bias (P,)``, ``P = O*I + O*bias``)
emits ``W[b] = theta[b, :O*I].view(O, I)`` and ``c[b] = theta[b, O*I:]``, and the layer is
``y[b, n] = act(W[b] x[b, n] + c[b])``. Writing ``G_W = G[:O*I].view(O, I, K)``, ``G_c = G[O*I:]``,
``g_W = g[:O*I].view(O, I)``, ``g_c = g[O*I:]``:

    z[b, n, o] = sum_{i,k} G_W[o, i, k] x[b, n, i] h[b, k]        (1)  the outer-product GEMM
               + sum_i g_W[o, i] x[b, n, i]                         (2)  a GEMM with one shared weight
               + sum_k G_c[o, k] h[b, k] + g_c[o]                   (3)  the generated bias

(1) is one GEMM ``(x (x) h) @ G_W.view(O, I*K)^T`` over the ``B*N`` rows, with reduction dim ``I*K``: the same
FLOPs as generating ``W`` (``N = 1``), ``N`` times more for ``N`` points, and no ``B*O*I`` tensor anywhere.
Its backward, with ``dz = dL/dz`` and ``u = x (x) h``:

    dG_W = dz^T @ u                              (O, I*K), a GEMM reducing over the B*N rows
    V    = dz @ G_W.view(O, I*K)                 (rows, I*K): dx[r, i] = sum_k V[r, i, k] h[b, k],
                                                              dh[b, k] = sum_{n, i} V[(b, n), i, k] x[b, n, i]
plus the small terms of (2) and (3). ``u`` and ``V`` are the only large temporaries; they are formed chunk by
chunk of rows (``chunk_rows``), so that they stay in cache and their size stays under ``CHUNK_BYTES`` whatever
``B``.

``reference_forward`` is the generate-then-apply composition (``F.linear`` then a per-sample bmm): the oracle of
the tests, what double backward differentiates, and what runs under torch.func transforms.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ...activations import Activation
from . import linear as torch_linear

# The outer-product temporaries (u in the forward; u and V in the backward) are formed chunk by chunk of rows.
# A chunk's temporaries aim at CACHE_BYTES, so that each is still in the CPU's L2 cache when its GEMM reads it
# back; but a chunk has at least MIN_ROWS_PER_OUT * out rows, because every chunk reads the head's (out, in*K)
# block again (and the backward accumulates dG_W, the same size, once per chunk); and its temporaries never
# exceed CHUNK_BYTES. Measured (CPU time, 1 thread, forward+backward, 2-core CPU): 4 MiB chunks against 64 MiB
# ones run the B = 4096, Linear(100, 5), K = 100 layer in 84 ms instead of 228 ms (and 79 / 194 ms at 16 points
# per sample); without the 2 * out rows, a 256x256, K = 32 layer took 57 ms instead of 41-43. Temporaries over
# 32 MiB would also be fresh pages on every call (glibc serves allocations above its largest mmap threshold,
# 32 MiB, with mmap; first touches cost ~0.4 ms per MiB on that CPU).
CACHE_BYTES = 4 * 2**20
MIN_ROWS_PER_OUT = 2
# The memory bound: ~100x less than what generate-then-apply materialises at the sizes this op is for
# (B = 16384, 256x256: 4.3 GB of weights).
CHUNK_BYTES = 64 * 2**20


def split_head(head_weight: Tensor, head_bias: Optional[Tensor], out_features: int, in_features: int, bias: bool):
    """Views ``(G_W (O, I, K), G_c (O, K) or None, g_W (O, I) or None, g_c (O,) or None)`` of the head."""
    ow = out_features * in_features
    g_w3 = head_weight[:ow].unflatten(0, (out_features, in_features))
    g_c = head_weight[ow:] if bias else None
    gb_w = head_bias[:ow].unflatten(0, (out_features, in_features)) if head_bias is not None else None
    gb_c = head_bias[ow:] if (head_bias is not None and bias) else None
    return g_w3, g_c, gb_w, gb_c


def generate(h: Tensor, head_weight: Tensor, head_bias: Optional[Tensor], out_features: int, in_features: int,
             bias: bool) -> tuple[Tensor, Optional[Tensor]]:
    """The materialised per-sample ``(W (B, O, I), c (B, O) or None)``: views of ``F.linear(h, G, g)``."""
    theta = F.linear(h, head_weight, head_bias)
    ow = out_features * in_features
    weight = theta[:, :ow].unflatten(1, (out_features, in_features))
    return weight, (theta[:, ow:] if bias else None)


def reference_forward(x: Tensor, h: Tensor, head_weight: Tensor, head_bias: Optional[Tensor], out_features: int,
                      bias: bool, act: Activation, w0: float) -> Tensor:
    """Generate then apply, from differentiable PyTorch ops; ``x`` is ``(B, N, I)``."""
    weight, c = generate(h, head_weight, head_bias, out_features, x.shape[-1], bias)
    return act.forward(torch_linear.preactivation(x, weight, c, False, "bmm"), w0)


def chunk_rows(in_features: int, cond: int, itemsize: int, temporaries: int, out_features: int) -> int:
    """Rows of ``x (x) h`` (``in_features * cond`` elements each) per chunk, ``temporaries`` such products at
    once: ``CACHE_BYTES`` of them, at least ``MIN_ROWS_PER_OUT * out_features`` rows, at most ``CHUNK_BYTES``."""
    per_row = max(1, in_features * cond * itemsize * temporaries)
    rows = max(CACHE_BYTES // per_row, MIN_ROWS_PER_OUT * out_features)
    return max(1, min(rows, CHUNK_BYTES // per_row))


def _chunks(batch: int, n: int, rows: int) -> Iterator[tuple[int, int, int, int]]:
    """``(b0, b1, n0, n1)`` blocks covering ``(B, N)``: whole samples while a sample fits in ``rows``, else one
    sample at a time, cut along N. Every block is a contiguous range of the flattened ``B*N`` rows."""
    if n == 0:
        return
    if n <= rows:
        per = rows // n
        for b0 in range(0, batch, per):
            yield b0, min(batch, b0 + per), 0, n
    else:
        for b in range(batch):
            for n0 in range(0, n, rows):
                yield b, b + 1, n0, min(n, n0 + rows)


def _outer(buf: Tensor, x: Tensor, h: Tensor) -> Tensor:
    """``x (cb, cn, I) (x) h (cb, K)`` written into ``buf``'s first elements, as ``(cb*cn, I*K)``."""
    cb, cn, i = x.shape
    u = buf[: cb * cn * i * h.shape[1]].view(cb, cn, i, h.shape[1])
    torch.mul(x.unsqueeze(3), h[:, None, None, :], out=u)
    return u.view(cb * cn, i * h.shape[1])


def _generated_bias(h: Tensor, g_c: Optional[Tensor], gb_c: Optional[Tensor]) -> Optional[Tensor]:
    """(3): ``c = h G_c^T + g_c``, (B, O), or None without a target bias."""
    if g_c is None:
        return None
    return F.linear(h, g_c, gb_c)


def preactivation(x: Tensor, h: Tensor, head_weight: Tensor, head_bias: Optional[Tensor], out_features: int,
                  bias: bool) -> Tensor:
    """``z (B, N, O)`` by (1) + (2) + (3), contiguous, never forming ``W``."""
    batch, n, i = x.shape
    k = h.shape[1]
    g_w3, g_c, gb_w, gb_c = split_head(head_weight, head_bias, out_features, i, bias)
    z = x.new_empty((batch, n, out_features))
    c = _generated_bias(h, g_c, gb_c)
    if c is not None:
        z.copy_(c.unsqueeze(1).expand_as(z))
    else:
        z.zero_()
    z2 = z.view(batch * n, out_features)
    if gb_w is not None:
        z2.addmm_(x.reshape(batch * n, i), gb_w.t())
    g_w2 = g_w3.reshape(out_features, i * k)  # a view when head_weight is contiguous
    rows = chunk_rows(i, k, x.element_size(), 1, out_features)
    buf = x.new_empty(min(rows, batch * n) * i * k)
    for b0, b1, n0, n1 in _chunks(batch, n, rows):
        u = _outer(buf, x[b0:b1, n0:n1], h[b0:b1])
        z[b0:b1, n0:n1].view(-1, out_features).addmm_(u, g_w2.t())
    return z


def hyper_linear_forward(x, h, head_weight, head_bias, out_features: int, bias: bool, act: Activation, w0: float,
                         save_preact: bool) -> tuple[Tensor, Tensor]:
    """See ``hyperkernels/ops/hyper_linear.py``: ``(y, preact)``, ``y`` contiguous ``(B, N, O)``."""
    z = preactivation(x, h, head_weight, head_bias, out_features, bias)
    if act.name == "none":
        return z, z.new_empty(0)
    y = act.forward(z, w0)
    return y, (z if save_preact else z.new_empty(0))


def hyper_linear_backward(grad_y, x, h, head_weight, head_bias, y, preact, out_features: int, bias: bool,
                          act: Activation, w0: float, output_mask) -> tuple:
    """``(dx, dh, dhead_weight, dhead_bias)``, contiguous, None where ``output_mask`` says not needed."""
    need_x, need_h, need_g, need_gb = output_mask
    need_gb = need_gb and head_bias is not None
    batch, n, i = x.shape
    k = h.shape[1]
    o = out_features
    if act.needs_preactivation and preact.numel() == 0:
        preact = preactivation(x, h, head_weight, head_bias, o, bias)
    dz = act.grad(grad_y, preact, y, w0).contiguous()
    g_w3, g_c, gb_w, gb_c = split_head(head_weight, head_bias, o, i, bias)
    g_w2 = g_w3.reshape(o, i * k)
    dz2 = dz.view(batch * n, o)

    dx = x.new_empty(x.shape) if need_x else None
    dh = h.new_zeros(h.shape) if need_h else None
    dg = head_weight.new_zeros(head_weight.shape) if need_g else None  # zeros: right for an empty batch too
    dgb = head_weight.new_zeros(head_weight.shape[:1]) if need_gb else None

    if need_x or need_h or need_g:
        temporaries = int(need_g) + int(need_x or need_h)
        rows = chunk_rows(i, k, x.element_size(), temporaries, o)
        size = min(rows, batch * n) * i * k
        u_buf = x.new_empty(size) if need_g else None
        v_buf = x.new_empty(size) if (need_x or need_h) else None
        dg_w2 = dg[: o * i].view(o, i * k) if need_g else None
        for b0, b1, n0, n1 in _chunks(batch, n, rows):
            cb, cn = b1 - b0, n1 - n0
            xc, hc = x[b0:b1, n0:n1], h[b0:b1]
            dzc = dz[b0:b1, n0:n1].reshape(cb * cn, o)
            if need_g:
                dg_w2.addmm_(dzc.t(), _outer(u_buf, xc, hc))
            if need_x or need_h:
                v = v_buf[: cb * cn * i * k].view(cb * cn, i * k)
                torch.mm(dzc, g_w2, out=v)
                v3 = v.view(cb, cn * i, k)
                if need_h:
                    dh[b0:b1].unsqueeze(1).baddbmm_(xc.reshape(cb, 1, cn * i), v3)
                if need_x:
                    torch.bmm(v3, hc.unsqueeze(2), out=dx[b0:b1, n0:n1].view(cb, cn * i, 1))
    if need_x and batch * n == 0:
        dx.zero_()
    if need_x and gb_w is not None:
        dx.view(batch * n, i).addmm_(dz2, gb_w)
    dc = dz.sum(1) if (bias and (need_h or need_g or need_gb)) else None  # (B, O): the generated bias' gradient
    if need_h and g_c is not None:
        dh.addmm_(dc, g_c)
    if need_g and g_c is not None:
        torch.mm(dc.t(), h, out=dg[o * i :])
    if need_gb:
        torch.mm(dz2.t(), x.reshape(batch * n, i), out=dgb[: o * i].view(o, i))
        if bias:
            torch.sum(dc, 0, out=dgb[o * i :])
    return dx, dh, dg, dgb
