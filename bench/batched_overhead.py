"""batched() against a user's vmap(functional_call) on views of the flat params, on one small model with its own
forward, where batched()'s fixed per-call work weighs most: CPU time of many calls, one process.

    python bench/batched_overhead.py --threads 1
"""
import argparse
import os
import sys
import time

import torch
from torch.func import functional_call, vmap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hyperkernels as hk  # noqa: E402
from batched_models import ResidualMLP  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    template = ResidualMLP(3, args.width, 3, 3)
    net = hk.nn.batched(template)
    flat = (torch.randn(args.batch, net.num_params) * 0.1).requires_grad_()
    x = torch.randn(args.batch, 3)

    def theirs():
        return vmap(lambda p, xb: functional_call(template, p, (xb,)))(net.layout.unflatten(flat), x)

    def ours():
        return net(x, flat)

    def step(fn):
        def run():
            y = fn()
            torch.autograd.grad(y, [flat], torch.ones_like(y))
        return run

    def cpu_ms(fn):
        for _ in range(30):
            fn()
        start = time.process_time()
        for _ in range(args.calls):
            fn()
        return (time.process_time() - start) / args.calls * 1e3

    torch.testing.assert_close(ours(), theirs())
    print(f"residual MLP width {args.width}, B={args.batch}, one point per sample; ms per call (CPU time, "
          f"{args.calls} calls, alternated twice)")
    for _ in range(2):
        fwd = (cpu_ms(ours), cpu_ms(theirs))
        both = (cpu_ms(step(ours)), cpu_ms(step(theirs)))
        print(f"forward: batched {fwd[0]:.3f} vmap {fwd[1]:.3f} ({fwd[1] / fwd[0]:.2f}x) | forward+backward: "
              f"batched {both[0]:.3f} vmap {both[1]:.3f} ({both[1] / both[0]:.2f}x)")


if __name__ == "__main__":
    main()
