"""Timing and the device's measured ceilings, the same way on CPU and GPU.

The methods of one benchmark case are timed *interleaved*: after a warm-up, every round calls each method
once, and the order changes from round to round. Timing each method in its own block of repetitions lets
anything that changes over time (another process taking a core, the scheduler's time slice, clocks, the
allocator) land on one method and not on the others: on a 2-core machine with one busy process that gave
rows quantised at the scheduler's ~24 ms slice and speedups of 17x that were not there. Interleaved, every
method sees the same conditions, and the spread of its rounds says when those conditions were too noisy
for its row to mean anything.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch

# A row whose spread ((p90 - p10) / median over its rounds) is above this is flagged as untrusted: its middle
# 80 % of rounds cover more than a quarter of its median, so differences of that order between methods are not
# resolved by it. On this project's 2-core CPU machine shared with other jobs and one busy loop (2026-11-30),
# rows spread by 4-86 % (5-6 rounds each): most were flagged, as they should have been.
UNTRUSTED_SPREAD = 0.25


@dataclass(frozen=True)
class Timing:
    """One method's times over the rounds of :func:`time_interleaved`, in milliseconds.

    ``spread`` is ``(p90 - p10) / median`` of the per-round times (deciles with linear interpolation; NaN with
    fewer than two rounds); ``trusted`` is False when the spread is above the threshold (or NaN), i.e. when
    the rounds disagree too much for the median to be a measurement. ``times_ms`` holds the per-round times
    in round order, so two methods of one run can be compared round by round. A method that raised has
    ``error`` set (its type and message), NaN times and ``rounds`` 0.
    """

    median_ms: float
    min_ms: float
    spread: float
    rounds: int
    trusted: bool
    times_ms: tuple = ()
    error: Optional[str] = None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(times_ms, untrusted_spread: float = UNTRUSTED_SPREAD) -> Timing:
    """The :class:`Timing` of a method's per-round times."""
    times = [float(t) for t in times_ms]
    if not times:
        raise ValueError("times_ms: expected at least one time, got none")
    median = statistics.median(times)
    if len(times) < 2:
        spread = math.nan
    else:
        deciles = statistics.quantiles(times, n=10, method="inclusive")
        spread = (deciles[8] - deciles[0]) / median if median > 0 else math.nan
    trusted = not math.isnan(spread) and spread <= untrusted_spread
    return Timing(median, min(times), spread, len(times), trusted, tuple(times))


def round_orders(m: int) -> list:
    """The orders of one cycle of rounds for ``m`` methods (lists of indices), a Williams design: over a
    cycle every method runs in every position equally often and directly after every other method equally
    often, so no method always follows the same one (whatever one leaves behind, a cold cache, a busy
    allocator, a queued launch, is spread evenly). ``m`` rounds for even ``m``, ``2 m`` for odd ``m``. From three
    methods on, no method runs twice in a row, across round boundaries included."""
    if m < 1:
        raise ValueError(f"m: expected at least one method, got {m}")
    # 0, 1, m-1, 2, m-2, ...: consecutive differences are all distinct mod m (for even m), so the rows
    # shifted by 0..m-1 hold every ordered pair exactly once.
    base = [0] + [(j + 1) // 2 if j % 2 else m - j // 2 for j in range(1, m)]
    rows = [[(b + r) % m for b in base] for r in range(m)]
    if m % 2:
        rows += [r[::-1] for r in rows]  # odd m: with the mirror images, every ordered pair exactly twice
    # The rows' order does not change that balance; pick it so that no method runs twice in a row across a
    # round boundary (nor from the end of a cycle to the start of the next): greedily, first fit.
    ordered, left = [rows[0]], rows[1:]
    while left:
        i = next((i for i, r in enumerate(left) if r[0] != ordered[-1][-1]), 0)
        ordered.append(left.pop(i))
    return ordered


def _error_timing(exc: BaseException) -> Timing:
    return Timing(math.nan, math.nan, math.nan, 0, False, (), f"{type(exc).__name__}: {exc}"[:300])


def time_interleaved(methods: Mapping[str, Callable[[], object]], device: torch.device, budget_s: float = 1.0,
                     min_rounds: int = 5, max_rounds: int = 200, *, warmup: int = 1,
                     clock: Callable[[], float] = time.perf_counter,
                     untrusted_spread: float = UNTRUSTED_SPREAD) -> dict:
    """Time every method of ``methods`` (name -> callable) in interleaved rounds; returns name -> :class:`Timing`
    in the order given.

    Each method is called ``warmup`` times first (compilation, autotuning, allocator growth). Then each round
    calls every method once, in the order :func:`round_orders` gives for that round, until ``budget_s``
    seconds of rounds have passed (at least ``min_rounds``, at most ``max_rounds`` rounds).

    CPU: a call's time is ``clock()`` after it minus before it. CUDA: each call is bracketed by events on the
    current stream and waited for before the next one starts, so host overhead the GPU hides is not counted,
    a launch-bound method (a Python loop) still pays its launches, and no method's queued work lands in the
    next one's time. ``clock`` (seconds) also measures the budget; tests pass a fake one.

    A method that raises is dropped from the remaining rounds and reported as a :class:`Timing` with
    ``error`` set; the others go on.
    """
    if not isinstance(budget_s, (int, float)) or not budget_s >= 0:
        raise ValueError(f"budget_s: expected a non-negative number of seconds, got {budget_s!r}")
    if not (isinstance(min_rounds, int) and isinstance(max_rounds, int) and 1 <= min_rounds <= max_rounds):
        raise ValueError(f"min_rounds, max_rounds: expected ints with 1 <= min_rounds <= max_rounds, got "
                         f"{min_rounds!r}, {max_rounds!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup: expected a non-negative int, got {warmup!r}")
    names = list(methods)
    results: dict = {}
    times: dict = {name: [] for name in names}
    cuda = device.type == "cuda"

    def call(name):
        fn = methods[name]
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            return begin.elapsed_time(end)
        t0 = clock()
        fn()
        return (clock() - t0) * 1e3

    for name in names:
        try:
            for _ in range(warmup):
                methods[name]()
            synchronize(device)
        except Exception as exc:  # noqa: BLE001 - a method that cannot run is reported, the others go on
            results[name] = _error_timing(exc)
    orders = round_orders(len(names)) if names else []
    start = clock()
    rounds = 0
    while rounds < max_rounds and any(name not in results for name in names):
        for i in orders[rounds % len(orders)]:
            name = names[i]
            if name in results:
                continue
            try:
                times[name].append(call(name))
            except Exception as exc:  # noqa: BLE001
                synchronize(device)
                results[name] = _error_timing(exc)
        rounds += 1
        if rounds >= min_rounds and clock() - start >= budget_s:
            break
    return {name: results[name] if name in results else summarize(times[name], untrusted_spread)
            for name in names}


def paired_speedup(baseline: Timing, method: Timing) -> float:
    """How many times faster ``method`` is than ``baseline``, timed in the same :func:`time_interleaved` run:
    the median over rounds of the per-round ratio, so that noise common to a round (and slow drift) cancels."""
    pairs = [b / t for b, t in zip(baseline.times_ms, method.times_ms) if t > 0]
    return statistics.median(pairs) if pairs else math.nan


def measure_ms(fn: Callable[[], object], device: torch.device, budget_s: float = 0.5, min_reps: int = 3,
               max_reps: int = 200, *, clock: Callable[[], float] = time.perf_counter) -> float:
    """Median time of ``fn`` in milliseconds, after warm-up: :func:`time_interleaved` of one method. To
    compare methods, time them together with :func:`time_interleaved` instead."""
    timing = time_interleaved({"fn": fn}, device, budget_s, min_reps, max_reps, clock=clock)["fn"]
    if timing.error is not None:
        raise RuntimeError(f"measure_ms: the timed function raised {timing.error}")
    return timing.median_ms


def copy_bandwidth_gbs(device: torch.device, nbytes: int, clock: Callable[[], float] = time.perf_counter) -> float:
    """Device memory bandwidth as a large copy achieves it (bytes read + bytes written per second); on CPU
    timed with ``clock``, the clock of the rows it is compared with."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = measure_ms(lambda: dst.copy_(src), device, budget_s=0.3, clock=clock)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int,
                  clock: Callable[[], float] = time.perf_counter) -> float:
    """Dense n x n x n matmul throughput on random data: the compute ceiling of this device and dtype (on CPU
    timed with ``clock``)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = measure_ms(lambda: a @ b, device, budget_s=0.3, clock=clock)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """The most bytes allocated at once during one call of ``fn``, above what was allocated before it: CUDA's
    allocator statistics, or on CPU the allocation events of torch.profiler (it runs ``fn`` under the profiler)."""
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    peak = current = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Extra device memory one call of ``fn`` allocates at its peak, in MiB (CUDA only, None on CPU: the table's
    rows are not profiled; :func:`peak_bytes` measures a CPU peak where it is wanted)."""
    if device.type != "cuda":
        return None
    return peak_bytes(fn, device) / 2**20
