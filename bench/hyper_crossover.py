"""The measurement behind hyper_linear's "auto" rule (the cost model in hyperkernels/_dispatch.py): the fused op
against generate-then-apply (``F.linear(h, head_weight, head_bias)`` then ``batched_linear``), forward+backward
(the gradients of h, head_weight and head_bias, as in training a hypernetwork; of x too where the table says so)
and forward alone (under ``torch.no_grad``), on a grid of out < K, out = K, out > K and several N per sample.

    python bench/hyper_crossover.py                                  # CPU: the torch backend, float32
    python bench/hyper_crossover.py --threads 1 --clock cpu --fit    # and fit the CPU prices of the cost model
    python bench/hyper_crossover.py --device cuda --fit              # GPU: the triton backend (bf16, float32)
    ... --save raw.json / --load raw.json                            # keep the measurements / report them again
    python bench/hyper_crossover.py --threads 1 --clock cpu --networks    # whole HyperNetwork targets (CPU)

Times: the two ways run interleaved (``timing.time_interleaved``: every round calls each once, in alternating
order) for ``--rounds`` rounds after a warm-up, so both see the same machine load; each cell is the median of its
rounds, then the min. ``--clock cpu --threads 1`` times the CPU time of one thread instead of wall time: on a
machine shared with other jobs it is what the time slices of other processes (and, with one thread, threads
waiting for each other) do not inflate, and what the CPU prices of the cost model are fitted to. Peak memory: the most
bytes allocated at once during one call above what was allocated before it; on CPU counted from the allocator
events of ``torch.profiler`` (``profile_memory=True``), on CUDA by ``torch.cuda.max_memory_allocated``.

``--networks`` checks the rule where ``HyperNetwork(fused=None)`` uses it, summed over a whole target's layers:
for the targets of ``bench/cases_training.py``'s CPU rows (and a few more), ``hnet(cond, x)`` forward+backward
(the gradients of every parameter) and forward, with the head fused and generated, against the model's sums.

For each row, "auto" is what ``hyperkernels._dispatch.generate_is_better`` picks (the cost model with the
prices committed there), and the row is within bounds when auto's measured median time is at most 1.1x the
faster way's and its peak memory at most 1.25x the smaller way's.
"""
import argparse
import datetime
import itertools
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hyperkernels as hk  # noqa: E402
from hyperkernels import _dispatch  # noqa: E402
from hyperkernels._dispatch import HyperShape, Machine  # noqa: E402
from hyperkernels.backends.torch import hyper_linear as torch_hyper  # noqa: E402
from timing import peak_bytes, time_interleaved  # noqa: E402

# (B at N = 1, in, out, K): Linear(100, 5) generated from a 100-wide hidden state (the second layer of a 2-100-5
# target), the first layer of the same target (Linear(2, 100)), then out < K, out = K and out > K.
# Rows with N > 1 keep B*N = B (same number of rows r = (b, n) in every GEMM).
CPU_SHAPES = [(4096, 100, 5, 100), (4096, 2, 100, 100), (1024, 64, 16, 64), (1024, 64, 64, 64),
              (512, 32, 128, 128), (1024, 64, 256, 16), (256, 256, 256, 32)]
GPU_SHAPES = [(16384, 100, 5, 100), (16384, 2, 100, 100), (16384, 256, 256, 128), (16384, 128, 64, 64),
              (4096, 256, 256, 256), (65536, 64, 32, 32)]
NS = [1, 2, 4, 16]
# Shapes also measured with the gradient of x (a hidden layer of a target network): index into the shapes.
X_GRAD_SHAPES = (0, 3)

TIME_BOUND, MEMORY_BOUND = 1.10, 1.25


def _tensors(b, n, i, o, k, dtype, device, x_grad):
    x = torch.randn(b, n, i, device=device, dtype=dtype, requires_grad=x_grad)
    h = torch.randn(b, k, device=device, dtype=dtype, requires_grad=True)
    rows = o * i + o
    head_weight = (torch.randn(rows, k, device=device, dtype=dtype) / (k * i) ** 0.5).requires_grad_()
    head_bias = torch.zeros(rows, device=device, dtype=dtype, requires_grad=True)
    return x, h, head_weight, head_bias


def _ways(x, h, head_weight, head_bias, out_features, fused_backend, grad):
    """``{"fused": fn, "generate": fn}``: one call of forward (+ backward) each."""
    wrt = (x, h, head_weight, head_bias) if x.requires_grad else (h, head_weight, head_bias)

    def fused():
        return hk.hyper_linear(x, h, head_weight, head_bias, out_features=out_features, activation="relu",
                               backend=fused_backend)

    def generate():
        w, c = torch_hyper.generate(h, head_weight, head_bias, out_features, x.shape[-1], True)
        return hk.batched_linear(x, w, c, activation="relu")

    def step(fn):
        if not grad:
            def forward():
                with torch.no_grad():
                    fn()
            return forward

        def forward_backward():
            y = fn()
            torch.autograd.grad(y, wrt, torch.ones_like(y))
        return forward_backward

    return {"fused": step(fused), "generate": step(generate)}


def _work(way: str, fused_backend: str, shape: HyperShape):
    if way == "generate":
        return _dispatch.generate_work(shape)
    return (_dispatch.fused_work_triton if fused_backend == "triton" else _dispatch.fused_work_torch)(shape)


def fit_prices(samples) -> Machine:
    """Least squares on relative error: the non-negative prices (seconds per unit of each of the cost model's
    TIME_TERMS) that best predict the measured times; ``samples`` are ``(Work, seconds)``. Few unknowns: every
    subset of them is solved, and the best one without a negative price is kept."""
    terms = _dispatch.TIME_TERMS
    feats = torch.tensor([[getattr(w, t) for t in terms] for w, _ in samples], dtype=torch.float64)
    t = torch.tensor([s for _, s in samples], dtype=torch.float64)
    a, y = feats / t[:, None], torch.ones_like(t)
    scale = a.abs().max(0).values.clamp_min(1e-30)
    best = None
    for k in range(1, len(terms) + 1):
        for cols in itertools.combinations(range(len(terms)), k):
            cols = list(cols)
            sol = torch.linalg.lstsq(a[:, cols] / scale[cols], y[:, None]).solution[:, 0]
            if (sol < 0).any():
                continue
            coef = torch.zeros(len(terms), dtype=torch.float64)
            coef[cols] = sol / scale[cols]
            err = ((a @ coef - y) ** 2).sum().item()
            if best is None or err < best[0]:
                best = (err, coef)
    return Machine(dict(zip(terms, best[1].tolist())), source="fitted")


def _describe(machine: Machine) -> str:
    per = machine.seconds_per
    rate = lambda v: f"1 / {1 / v:.3g}" if v > 0 else "0"  # noqa: E731
    return (f"gemm_flops={rate(per['gemm_flops'])}, bmm_flops={rate(per['bmm_flops'])}, "
            f"bmm_products={per['bmm_products']:.3g}, bytes={rate(per['bytes'])}, "
            f"transpose_bytes={rate(per['transpose_bytes'])}, "
            f"fresh_bytes={rate(per['fresh_bytes'])}, calls={per['calls']:.3g}")


def _rows(device: torch.device):
    cuda = device.type == "cuda"
    shapes = GPU_SHAPES if cuda else CPU_SHAPES
    dtypes = [torch.bfloat16, torch.float32] if cuda else [torch.float32]
    for dtype, (index, (b1, i, o, k)), n in itertools.product(dtypes, enumerate(shapes), NS):
        b = max(1, b1 // n)
        for grad, x_grad in ((True, False), (True, True), (False, False)):
            if x_grad and index not in X_GRAD_SHAPES:
                continue
            yield dtype, b, n, i, o, k, grad, x_grad


def measure(device: torch.device, rounds: int, clock) -> list:
    """Every row of the grid: its shape, the per-round ms of both ways, and their peak bytes."""
    fused_backend = "triton" if device.type == "cuda" else "torch"
    rows = []
    for dtype, b, n, i, o, k, grad, x_grad in _rows(device):
        torch.manual_seed(0)
        tensors = _tensors(b, n, i, o, k, dtype, device, x_grad)
        fns = _ways(*tensors, o, fused_backend, grad)
        timings = time_interleaved(fns, device, budget_s=0, min_rounds=rounds, max_rounds=rounds, clock=clock)
        times = {name: list(t.times_ms) for name, t in timings.items()}
        peaks = {name: peak_bytes(fn, device) for name, fn in fns.items()}
        del tensors, fns
        rows.append(dict(dtype=str(dtype)[6:], b=b, n=n, i=i, o=o, k=k, grad=grad, x_grad=x_grad, times=times,
                         peaks=peaks))
        print(f"measured {rows[-1]['dtype']} B={b} N={n} {i}->{o} K={k} grad={grad} x_grad={x_grad}: "
              + ", ".join(f"{w} {statistics.median(t):.2f} ms {peaks[w] / 2**20:.1f} MiB" for w, t in times.items()),
              file=sys.stderr, flush=True)
    return rows


def _shape(row) -> HyperShape:
    itemsize = torch.empty(0, dtype=getattr(torch, row["dtype"])).element_size()
    return HyperShape(row["b"], row["n"], row["i"], row["o"], row["k"], True, True, itemsize, row["grad"],
                      row["x_grad"])


def report(rows: list, device: torch.device, header: list, fit: bool) -> list:
    """The markdown table of ``rows`` with the cost model's predictions and choices: at the prices committed in
    hyperkernels/_dispatch.py, or with ``fit`` at the prices fitted to these rows (then printed)."""
    impl = "triton" if device.type == "cuda" else "torch_bmm"
    fused_backend = "triton" if device.type == "cuda" else "torch"
    samples = [(_work(way, fused_backend, _shape(row)), min(ts) * 1e-3) for row in rows
               for way, ts in row["times"].items()]
    machine = fit_prices(samples) if fit else None
    lines = list(header) + [
        f"Model and auto: at the {'prices fitted to this table (below)' if fit else 'committed prices'}.",
        "",
        "| dtype | B | N | in | out | K | pass | fused ms | generate ms | fused MiB | generate MiB | model ms f / g "
        "| model MiB f / g | auto | auto/best time | auto/min peak | within |",
        "|---|---:|---:|---:|---:|---:|---|---|---|---:|---:|---|---|---|---:|---:|---|",
    ]
    ok_rows = attainable_rows = time_ok = 0
    for row in rows:
        dtype = getattr(torch, row["dtype"])
        times, peaks = row["times"], row["peaks"]
        shape = _shape(row)
        auto = "generate" if _dispatch.generate_is_better(device, dtype, [shape], machine=machine) else "fused"
        predicted = _dispatch.hyper_linear_costs(impl, device, [shape], machine)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        time_ratio = med[auto] / min(med.values())
        least = max(1, min(peaks.values()))
        mem_ratio = peaks[auto] / least
        ok = time_ratio <= TIME_BOUND and mem_ratio <= MEMORY_BOUND
        attainable = any(med[w] <= TIME_BOUND * min(med.values()) and peaks[w] <= MEMORY_BOUND * least for w in med)
        ok_rows += ok
        attainable_rows += attainable
        time_ok += time_ratio <= TIME_BOUND
        cells = [f"{statistics.median(times[w]):.2f} ({min(times[w]):.2f})" for w in ("fused", "generate")]
        cells += [f"{peaks[w] / 2**20:.1f}" for w in ("fused", "generate")]
        cells.append(f"{predicted['fused'][0] * 1e3:.1f} / {predicted['generate'][0] * 1e3:.1f}")
        cells.append(f"{predicted['fused'][1] / 2**20:.1f} / {predicted['generate'][1] / 2**20:.1f}")
        what = ("fwd+bwd, x grad" if row["x_grad"] else "fwd+bwd") if row["grad"] else "fwd"
        verdict = "yes" if ok else ("no" if attainable else "no: neither way meets both")
        lines.append(f"| {row['dtype']} | {row['b']} | {row['n']} | {row['i']} | {row['o']} | {row['k']} | {what} | "
                     + " | ".join(cells) + f" | {auto} | {time_ratio:.2f} | {mem_ratio:.2f} | {verdict} |")
    lines += ["", f"Rows: {len(rows)}. Auto within both bounds: {ok_rows}. Rows where some way is within both: "
              f"{attainable_rows} (in the others one way is faster, the other smaller). Auto within the time bound: "
              f"{time_ok}."]
    if fit:
        errors = sorted(abs(machine.seconds(w) / s - 1) for w, s in samples)
        committed = _dispatch._CPU if device.type != "cuda" else _dispatch._gpu_machine(4)
        now = sorted(abs(committed.seconds(w) / s - 1) for w, s in samples)
        lines += ["", f"Fitted prices (seconds per unit; least squares on relative error, the min of each cell, "
                  f"{len(samples)} cells): {_describe(machine)}; relative error of the fitted model: median "
                  f"{statistics.median(errors):.2f}, 90th percentile {errors[int(0.9 * (len(errors) - 1))]:.2f} "
                  f"(at the prices committed in hyperkernels/_dispatch.py when this ran: {statistics.median(now):.2f}, "
                  f"{now[int(0.9 * (len(now) - 1))]:.2f})."]
    return lines


# (target sizes, the hypernetwork's hidden widths, B, N): bench/cases_training.py's CPU targets, the same MLP at
# more samples and at 16 points, and a wide target from a narrow trunk (where the fused head should win).
NETWORKS = [([2, 100, 5], (100,), 512, 1), ([2, 100, 5], (100,), 4096, 1), ([16, 64, 64, 16], (128, 128), 256, 1),
            ([16, 64, 64, 16], (128, 128), 1024, 1), ([16, 64, 64, 16], (128, 128), 64, 16),
            ([2, 64, 64, 64, 3], (128, 128), 16, 256), ([32, 256, 256, 32], (32,), 512, 1)]


def networks(device: torch.device, rounds: int, clock) -> list:
    """Per network and pass: the median ms of ``HyperNetwork`` fused and generating, the model's sums over the
    target's layers (with and without crediting generate's fused batched_mlp op), and what fused=None takes."""
    from torch import nn

    lines = ["| target | K | B | N | pass | fused ms | generate ms | model ms f / g | model ms g, per-layer ops | "
             "fused=None | its time / best |", "|---|---:|---:|---:|---|---|---|---|---:|---|---:|"]
    for sizes, hidden, b, n in NETWORKS:
        k = hidden[-1]
        layers = []
        for j, (i, o) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers += [nn.Linear(i, o)] + ([nn.ReLU()] if j < len(sizes) - 2 else [])
        torch.manual_seed(0)
        hnet = hk.nn.HyperNetwork(nn.Sequential(*layers), 16, hidden=hidden).to(device)
        cond = torch.randn(b, 16, device=device)
        x = torch.rand((b, sizes[0]) if n == 1 else (b, n, sizes[0]), device=device)
        params = list(hnet.parameters())
        for grad in (True, False):
            def way(fused):
                def run():
                    hnet.fused = fused
                    if not grad:
                        with torch.no_grad():
                            return hnet(cond, x)
                    y = hnet(cond, x)
                    return torch.autograd.grad(y, params, torch.ones_like(y))
                return run
            fns = {"fused": way(True), "generate": way(False)}
            timings = time_interleaved(fns, device, budget_s=0, min_rounds=rounds, max_rounds=rounds, clock=clock)
            med = {w: t.median_ms for w, t in timings.items()}
            with torch.set_grad_enabled(grad):
                hnet.fused = None
                shapes = hnet._hyper_layers(x)
                picked = "fused" if hnet._fused_backend(x) is not None else "generate"
            impl = "triton" if device.type == "cuda" else "torch_bmm"
            model = _dispatch.hyper_linear_costs(impl, device, shapes)
            per_layer = _dispatch.hyper_linear_costs(impl, device, [HyperShape(**{**vars(s), "mlp_op": False})
                                                                    for s in shapes])
            lines.append(f"| {'-'.join(map(str, sizes))} | {k} | {b} | {n} | {'fwd+bwd' if grad else 'fwd'} | "
                         f"{med['fused']:.2f} | {med['generate']:.2f} | {model['fused'][0] * 1e3:.1f} / "
                         f"{model['generate'][0] * 1e3:.1f} | {per_layer['generate'][0] * 1e3:.1f} | {picked} | "
                         f"{med[picked] / min(med.values()):.2f} |")
            print(lines[-1], file=sys.stderr, flush=True)
    return lines


def _command() -> str:
    return "python " + " ".join([os.path.relpath(__file__, os.getcwd())] + sys.argv[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds per row")
    parser.add_argument("--fit", action="store_true", help="fit the cost model's prices to the measured times")
    parser.add_argument("--out", help="also write the table (markdown) to this file")
    parser.add_argument("--save", help="write the raw measurements (JSON) to this file")
    parser.add_argument("--load", help="report measurements saved by --save instead of measuring")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: elapsed time; cpu: this process's CPU time (CPU device only), which time slices "
                             "given to other processes do not inflate (with --threads 1, no thread waits for "
                             "another either)")
    parser.add_argument("--networks", action="store_true",
                        help="instead of the single-layer grid: whole HyperNetwork targets, fused against generated")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.clock == "cpu" and cuda:
        parser.error("--clock cpu measures CPU time: for --device cpu only")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.networks:
        threads = torch.get_num_threads()
        where = torch.cuda.get_device_name(device) if cuda else f"CPU, {threads} thread{'s' * (threads != 1)}"
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        what = "CPU time of the process" if args.clock == "cpu" else "wall time"
        lines = [f"Device: {where}; torch {torch.__version__}; measured "
                 f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z} by `{_command()}`; median ms of "
                 f"{args.rounds} interleaved rounds ({what}); the model's times are the target's layers only (the "
                 "trunk costs the same both ways).", ""]
        lines += networks(device, args.rounds, clock)
        print("\n".join(lines))
        if args.out:
            with open(args.out, "w") as f:
                f.write("\n".join(lines) + "\n")
        return
    if args.load:
        with open(args.load) as f:
            saved = json.load(f)
        rows, meta = saved["rows"], saved["meta"]
    else:
        threads = torch.get_num_threads()
        where = torch.cuda.get_device_name(device) if cuda else f"CPU, {threads} thread{'s' * (threads != 1)}"
        meta = dict(where=where, torch=torch.__version__, rounds=args.rounds, clock=args.clock,
                    date=f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
                    command=_command())
        rows = measure(device, args.rounds, time.process_time if args.clock == "cpu" else time.perf_counter)
        if args.save:
            with open(args.save, "w") as f:
                json.dump(dict(meta=meta, rows=rows), f)
    memory = "torch.cuda.max_memory_allocated" if cuda else "torch.profiler allocator events, profile_memory=True"
    header = [
        f"# hyper_linear: fused ({'triton' if cuda else 'torch'}) vs generate-then-apply, and what \"auto\" picks",
        "",
        f"Device: {meta['where']}; torch {meta['torch']}; measured {meta['date']} by `{meta['command']}`"
        + (f"; reported by `{_command()}`." if args.load else "."),
        "",
        f"Times: median (min) ms of {meta['rounds']} interleaved rounds "
        f"({'CPU time of the process' if meta.get('clock') == 'cpu' else 'wall time'}); relu; the target layer and "
        f"the head have biases. Peak: MiB allocated at once during one call ({memory}). Model: the cost model's "
        "predicted time and peak, fused / generate. auto: what it picks; auto/best time: auto's measured median over the "
        f"faster way's (bound {TIME_BOUND}); auto/min peak: its peak over the smaller one's (bound {MEMORY_BOUND}).",
        "",
    ]
    lines = report(rows, device, header, args.fit)
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
