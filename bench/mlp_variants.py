"""The measurements behind the Triton fused MLP's design choices (hyperkernels/backends/triton/mlp.py), on a GPU:

* keep vs recompute for N = 1: the op with ``save_layers`` (the forward stores each layer's value, the backward
  reads them) against without (the backward reruns the forward), forward+backward;
* the dW reduction for N > 1: one program per tile with float32 atomics, one program per sample looping over its
  tiles, and the deterministic splits, backward only;
* every GEMM config candidate of the forward and backward (HYPERKERNELS_TRITON_AUTOTUNE picks among them).

    python bench/mlp_variants.py                 # the bench nets (GPU only)
    python bench/mlp_variants.py --quick         # fewer configs

The variants of each comparison are timed interleaved (bench/timing.py). Each row: the variant, its median
time and spread over the rounds (flagged "!" where too large to trust), and its time relative to the variant the
code uses by default (the median of the per-round ratios).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hyperkernels as hk  # noqa: E402
from hyperkernels.ops import batched_mlp_backward_op, batched_mlp_op  # noqa: E402
from timing import paired_speedup, time_interleaved  # noqa: E402

# (name, B, N, sizes, dtype): bench/cases.py's MLP cases, plus a small-batch field where the dW reduction matters.
DEVICE = "cuda"

NETS = [
    ("N=1 [16,64,64,64,16]", 16384, 1, [16, 64, 64, 64, 16], torch.float32),
    ("N=1 [16,64,64,64,16] bf16", 16384, 1, [16, 64, 64, 64, 16], torch.bfloat16),
    ("field N=1024 w64 bf16", 128, 1024, [2, 64, 64, 64, 3], torch.bfloat16),
    ("field N=1024 w128 bf16", 128, 1024, [2, 128, 128, 128, 3], torch.bfloat16),
    ("field B=4 N=65536 w64 bf16", 4, 65536, [2, 64, 64, 64, 3], torch.bfloat16),
]


def _problem(batch, n, sizes, dtype, act="relu"):
    layout = hk.ParamLayout.from_module(
        torch.nn.Sequential(*[torch.nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:])]))
    spec = layout.mlp_spec()
    x = torch.randn(batch, n, sizes[0], device=DEVICE, dtype=dtype)
    flat = (torch.randn(batch, layout.numel, device=DEVICE) / max(sizes) ** 0.5).to(dtype)
    common = (spec.sizes, spec.weight_offsets, spec.bias_offsets, act, "none", 30.0)
    return x, flat, common


def keep_vs_recompute(batch, n, sizes, dtype):
    x, flat, common = _problem(batch, n, sizes, dtype)
    y = batched_mlp_op(x, flat, *common, False, "triton")[0]
    dy = torch.randn_like(y)

    def step(save):
        y, saved = batched_mlp_op(x, flat, *common, save, "triton")
        return batched_mlp_backward_op(dy, x, flat, y, saved, *common, [True, True], "triton")

    return time_interleaved({"recompute (default)": lambda: step(False), "keep": lambda: step(True)}, x.device)


def dw_modes(batch, n, sizes, dtype):
    from hyperkernels.backends.triton import mlp

    x, flat, common = _problem(batch, n, sizes, dtype)
    y = batched_mlp_op(x, flat, *common, False, "triton")[0]
    dy = torch.randn_like(y)
    default = mlp._dw_mode(batch, n, True, x.device)
    modes = {"atomic": (True, 1), "one program per sample": (False, 1),
             "deterministic splits": (False, max(1, min(mlp._programs_wanted(x.device) // batch, n // 128)))}
    original = mlp._dw_mode

    def with_mode(mode):
        # Interleaved rounds switch modes call by call: each call sets its own and puts the original back.
        def run():
            mlp._dw_mode = lambda *args: mode
            try:
                return batched_mlp_backward_op(dy, x, flat, y, [], *common, [True, True], "triton")
            finally:
                mlp._dw_mode = original
        return run

    # Two names may give the same mode (the splits collapse to one on a small problem): label the first one.
    first_default = next(name for name, mode in modes.items() if mode == default) if default in modes.values() else None
    return time_interleaved({name + (" (default)" if name == first_default else ""): with_mode(mode)
                             for name, mode in modes.items()}, x.device)


def gemm_configs(batch, n, sizes, dtype, backward):
    """Each candidate alone: the kernel's autotuner is given one config at a time."""
    from hyperkernels.backends.triton import mlp_gemm, mlp_tiles
    from hyperkernels.backends.triton._launch import dot_precision

    x, flat, common = _problem(batch, n, sizes, dtype)
    y = batched_mlp_op(x, flat, *common, False, "triton")[0]
    dy = torch.randn_like(y)
    kernel = mlp_gemm._bwd_gemm_kernel if backward else mlp_gemm._fwd_gemm_kernel
    pads = tuple(mlp_tiles.pad(s) for s in sizes)
    table = mlp_tiles.GEMM_BWD_CANDIDATES if backward else mlp_tiles.GEMM_FWD_CANDIDATES
    candidates = table[(max(64, max(pads)), mlp_tiles.operand_class(dtype.itemsize, dot_precision(dtype)))]
    all_configs = kernel.configs

    def with_config(configs):
        # One config at a time, set call by call (interleaved rounds): the autotuner runs the only one it has.
        def run():
            kernel.configs = configs
            kernel.cache.clear()
            try:
                if backward:
                    return batched_mlp_backward_op(dy, x, flat, y, [], *common, [True, True], "triton")
                return batched_mlp_op(x, flat, *common, False, "triton")
            finally:
                kernel.configs = all_configs
                kernel.cache.clear()
        return run

    variants = {}
    for i, (bn, warps) in enumerate(candidates):
        configs = [c for c in all_configs if (c.kwargs["BLOCK_N"], c.num_warps) == (bn, warps)]
        if configs:
            variants[f"BLOCK_N={bn} warps={warps}" + (" (first choice)" if i == 0 else "")] = with_config(configs)
    return time_interleaved(variants, x.device)


def _print(title, timings):
    base = next((t for k, t in timings.items() if "default" in k or "first choice" in k), None)
    print(f"  {title}")
    for k, t in timings.items():
        if t.error:
            print(f"    {k:40s} error: {t.error}")
            continue
        ratio = f"{1 / paired_speedup(base, t):6.2f}x" if base is not None and not base.error else ""
        flag = "" if t.trusted else " !"
        print(f"    {k:40s} {t.median_ms * 1e3:10.1f} us ({t.spread:4.0%}{flag})  {ratio}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the per-config timings")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/mlp_variants.py measures GPU kernels: it needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}")
    for name, batch, n, sizes, dtype in NETS:
        print(name)
        if n == 1:
            _print("keep vs recompute, forward+backward", keep_vs_recompute(batch, n, sizes, dtype))
            continue
        _print("dW reduction, backward", dw_modes(batch, n, sizes, dtype))
        if not args.quick:
            _print("forward configs", gemm_configs(batch, n, sizes, dtype, backward=False))
            _print("backward configs", gemm_configs(batch, n, sizes, dtype, backward=True))


if __name__ == "__main__":
    main()
