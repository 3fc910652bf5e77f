"""Timing and the device's measured ceilings, the same way on CPU and GPU."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_ms(fn: Callable[[], object], device: torch.device, budget_s: float = 0.5, min_reps: int = 3,
               max_reps: int = 200) -> float:
    """Median wall time of ``fn`` in milliseconds, after warm-up; as many repetitions as fit the budget.

    CUDA: each repetition is bracketed by events on the current stream, so host overhead that the GPU
    hides is not counted, and launch-bound methods (a Python loop) still pay theirs.
    """
    fn()
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    once = time.perf_counter() - start
    reps = int(max(min_reps, min(max_reps, budget_s / max(once, 1e-6))))
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs(device: torch.device, nbytes: int) -> float:
    """Device memory bandwidth as a large copy achieves it (bytes read + bytes written per second)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = measure_ms(lambda: dst.copy_(src), device, budget_s=0.3)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """Dense n x n x n matmul throughput on random data: the compute ceiling of this device and dtype."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = measure_ms(lambda: a @ b, device, budget_s=0.3)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Extra device memory one call of ``fn`` allocates at its peak, above what was allocated before it
    (CUDA only: the CPU allocator keeps no such count; None there)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20
