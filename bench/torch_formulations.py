"""The measurement behind the CPU rule in hyperkernels/_dispatch.py: the pure-PyTorch backend's bmm and
grouped-Conv1d formulations, forward and forward+backward, both layouts, on this machine.

    python bench/torch_formulations.py > bench/results/cpu_torch_formulations.md
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hyperkernels as hk  # noqa: E402
from timing import time_interleaved  # noqa: E402

# (B, N, in, out): hypernetwork layers (N = 1) through neural-field layers (N >= 1024).
SHAPES = [(4096, 1, 64, 64), (1024, 1, 256, 256), (256, 16, 64, 64), (64, 256, 64, 64), (16, 1024, 64, 64),
          (16, 1024, 128, 128), (64, 4096, 16, 16), (32, 256, 32, 32), (128, 1024, 64, 64)]


def main():
    device = torch.device("cpu")
    print(f"# torch backend formulations, {torch.get_num_threads()} CPU threads, torch {torch.__version__}\n")
    print("Median ms (forward / forward+backward), relu, float32, gradients of x, weight and bias. The four ways of a "
          "row are timed interleaved (bench/timing.py); \"!\" marks a time whose rounds spread too much to trust.\n")
    print("| B, N, in, out | token-major bmm | token-major conv | channel-major bmm | channel-major conv |")
    print("|---|---|---|---|---|")
    for b, n, k, m in SHAPES:
        forward, step = {}, {}
        for channel_major in (False, True):
            x = torch.randn(b, k, n) if channel_major else torch.randn(b, n, k)
            x.requires_grad_()
            w = torch.randn(b, m, k, requires_grad=True)
            bias = torch.randn(b, m, requires_grad=True)
            op = hk.batched_conv1x1 if channel_major else hk.batched_linear
            for backend in ("torch_bmm", "torch_conv"):
                def fn(op=op, x=x, w=w, bias=bias, backend=backend):
                    return op(x, w, bias, activation="relu", backend=backend)

                def no_grad(fn=fn):
                    with torch.no_grad():
                        return fn()

                grad = torch.randn_like(fn())

                def fwdbwd(fn=fn, x=x, w=w, bias=bias, grad=grad):
                    return torch.autograd.grad(fn(), (x, w, bias), grad)

                key = f"{'channel' if channel_major else 'token'}-major {backend}"
                forward[key], step[key] = no_grad, fwdbwd
        fwd, bwd = time_interleaved(forward, device, budget_s=1.0), time_interleaved(step, device, budget_s=1.0)
        cells = [f"{_ms(fwd[key])} / {_ms(bwd[key])}" for key in forward]
        print(f"| {b}, {n}, {k}, {m} | " + " | ".join(cells) + " |", flush=True)


def _ms(timing):
    return f"error: {timing.error}" if timing.error else f"{timing.median_ms:.2f}{'' if timing.trusted else ' !'}"


if __name__ == "__main__":
    main()
