"""The measurement behind hyper_linear's "auto" rule in hyperkernels/_dispatch.py: the fused op against
generate-then-apply (``F.linear(h, head_weight, head_bias)`` then ``batched_linear``), forward and
forward+backward (gradients of h, head_weight and head_bias, as in training a hypernetwork), over N.

    python bench/hyper_crossover.py                  # CPU: the torch backend
    python bench/hyper_crossover.py --device cuda    # GPU: the triton backend (bfloat16 and float32)

Each row prints the fused / generate time ratio: below 1 the fused op is faster.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hyperkernels as hk  # noqa: E402
from hyperkernels.backends.torch import hyper_linear as torch_hyper  # noqa: E402
from timing import measure_ms  # noqa: E402

# (B, in = out, K): a hypernetwork's target layer, from narrow to wide, with a few head widths.
CPU_SHAPES = [(512, 64, 16), (512, 64, 64), (128, 128, 64), (64, 256, 32), (32, 256, 128)]
GPU_SHAPES = [(16384, 256, 128), (16384, 128, 64), (4096, 256, 256), (65536, 64, 32)]
NS = [1, 2, 3, 4, 8, 16]


def _methods(x, h, weight, bias, out_features, fused_backend):
    def fused():
        return hk.hyper_linear(x, h, weight, bias, out_features=out_features, activation="relu",
                               backend=fused_backend)

    def generate():
        w, c = torch_hyper.generate(h, weight, bias, out_features, x.shape[-1], True)
        return hk.batched_linear(x, w, c, activation="relu")

    return fused, generate


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--budget", type=float, default=0.3, help="seconds of timing per method and pass")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    shapes = GPU_SHAPES if cuda else CPU_SHAPES
    dtypes = [torch.bfloat16, torch.float32] if cuda else [torch.float32]
    fused_backend = "triton" if cuda else "torch"
    where = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"# hyper_linear: fused ({fused_backend}) vs generate-then-apply, {where}, torch {torch.__version__}\n")
    print("ms fused / generate (ratio), relu, target bias and head bias; fwd+bwd takes grads of h and the head.\n")
    print("| dtype | B, in=out, K | N | fwd | fwd+bwd |")
    print("|---|---|---:|---|---|")
    for dtype in dtypes:
        for b, width, k in shapes:
            for n in NS:
                torch.manual_seed(0)
                x = torch.randn(b, n, width, device=device, dtype=dtype)
                h = torch.randn(b, k, device=device, dtype=dtype, requires_grad=True)
                rows = width * width + width
                weight = (torch.randn(rows, k, device=device, dtype=dtype) / (k * width) ** 0.5).requires_grad_()
                bias = torch.zeros(rows, device=device, dtype=dtype, requires_grad=True)
                cells = []
                fns = _methods(x, h, weight, bias, width, fused_backend)
                with torch.no_grad():
                    fwd = [measure_ms(fn, device, budget_s=args.budget) for fn in fns]
                grad = torch.randn(b, n, width, device=device, dtype=dtype)
                steps = [lambda fn=fn: torch.autograd.grad(fn(), (h, weight, bias), grad) for fn in fns]
                bwd = [measure_ms(step, device, budget_s=args.budget) for step in steps]
                for f, g in (fwd, bwd):
                    cells.append(f"{f:.2f} / {g:.2f} ({f / g:.2f})")
                print(f"| {str(dtype)[6:]} | {b}, {width}, {k} | {n} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
