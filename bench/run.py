"""The README's benchmark: every available hyperkernels backend against vmap(functional_call), bmm,
grouped conv and a Python loop, on embedded default shapes (``bench/cases*.py``).

    python bench/run.py                                   # table on this machine's device
    python bench/run.py --json r.json --plot r.png        # r.json is rewritten after every case
    python bench/run.py --cases "train step" --budget 4   # a subset, 4 s of timing per case
    python bench/run.py --from-json r.json                # the table of an earlier (even killed) run
    python bench/run.py --threads 1 --clock cpu           # CPU: steadier on a machine shared with other jobs

The methods of a case are timed interleaved (``timing.time_interleaved``): every round runs each method
once, so a noisy machine slows them all alike instead of whichever method it happened to hit. Before
timing, every method's output is compared with the baseline's: a method that computes something else is
reported as an error, never timed against it.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hyperkernels as hk  # noqa: E402
from cases import forward_backward  # noqa: E402
from timing import (UNTRUSTED_SPREAD, copy_bandwidth_gbs, matmul_tflops, paired_speedup,  # noqa: E402
                    peak_memory_mb, time_interleaved)

# Modules whose default_cases(device) feed the table (see cases.py for what a case provides).
CASE_MODULES = ["cases", "cases_training", "cases_hyper"]

# A method agrees with the baseline when ||out - ref|| / ||ref|| is at most this: rounding-level (TF32 convs
# on a GPU included), far below what a different computation gives.
AGREEMENT_RTOL = {torch.float64: 1e-9, torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 4e-2}

UNTRUSTED_FLAG = "!"


def _default_cases(device):
    return [case for name in CASE_MODULES for case in importlib.import_module(name).default_cases(device)]


def _environment(device: torch.device) -> dict:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=here).stdout.strip()
        # A number measured on uncommitted code must not pass for the commit's.
        if commit and subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                     text=True, cwd=here).stdout.strip():
            commit += "+uncommitted"
    except OSError:
        commit = ""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads")
    return {
        "device": name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda, "commit": commit,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }


def _clock(args):
    return time.process_time if args.clock == "cpu" else time.perf_counter


def _ceilings(device: torch.device, clock=time.perf_counter) -> dict:
    ceilings = {"copy_GBps": copy_bandwidth_gbs(device, 1 << 30 if device.type == "cuda" else 1 << 28, clock)}
    if device.type == "cuda":
        ceilings["bf16_matmul_TFLOPs"] = matmul_tflops(device, torch.bfloat16, 8192)
        ceilings["fp32_matmul_TFLOPs"] = matmul_tflops(device, torch.float32, 8192)
    else:
        ceilings["fp32_matmul_TFLOPs"] = matmul_tflops(device, torch.float32, 2048, clock)
    return ceilings


def _backends(device: torch.device, dtype: torch.dtype) -> list[str]:
    names = ["auto"]
    for name, reason in hk.available_backends().items():
        if reason is None and hk._dispatch.get_backend(name).check_support(device, dtype) is None:
            if device.type == "cpu" and name not in ("torch_bmm", "torch_conv"):
                continue  # interpreted kernels on CPU are a correctness tool, not a contender
            names.append(name)
    return names


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


def _disagreement(out, ref, dtype: torch.dtype):
    """None when ``out`` computes what ``ref`` does (same shape, relative error within the dtype's rounding),
    else what differs."""
    if not isinstance(out, torch.Tensor) or out.shape != ref.shape:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        return f"output shape {shape}, baseline {tuple(ref.shape)}"
    ref64, out64 = ref.detach().double(), out.detach().double()
    err = float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30))
    tol = AGREEMENT_RTOL.get(dtype, 1e-2)
    if not err <= tol:
        return f"output differs from the baseline's: relative error {err:.2e} > {tol:.0e}"
    return None


def _timing_fields(prefix: str, t) -> dict:
    return {f"{prefix}_ms": t.median_ms, f"{prefix}_min_ms": t.min_ms, f"{prefix}_spread": t.spread,
            f"{prefix}_rounds": t.rounds, f"{prefix}_trusted": t.trusted}


def run_case(case, device: torch.device, args) -> list[dict]:
    """The rows of one case: outputs checked against the baseline's, then every method's forward timed in one
    interleaved run and its forward+backward in another, then each method's peak memory."""
    if args.dtype:
        case.dtype = getattr(torch, args.dtype)
    try:
        problem = case.build(device, _backends(device, case.dtype))
    except Exception as exc:  # noqa: BLE001 - a case that cannot be built here is reported, not fatal
        return [{"case": case.name, "method": "(build)", "error": _error(exc)}]
    baseline = problem.baseline
    rows = {}
    methods = {}
    for method, fn in problem.methods.items():
        if method == "python loop" and getattr(case, "batch", 0) * getattr(case, "n", 1) > args.max_loop_work:
            continue  # a loop of B kernel launches per layer: minutes, and the verdict is already known
        methods[method] = fn
        rows[method] = {"case": case.name, "method": method, "dtype": str(case.dtype).replace("torch.", "")}
    why = None
    if baseline not in methods:
        why = f"its baseline {baseline!r} is not one of its methods {list(methods)}"
    elif problem.steps is not None and set(problem.steps) != set(problem.methods):
        why = f"its steps {sorted(problem.steps)} do not name the same methods as its methods {sorted(problem.methods)}"
    if why is not None:  # a bug in the case: reported like a case that cannot be built, the run goes on
        return [{"case": case.name, "method": "(build)", "error": f"ValueError: {why}"}]

    # The same computation or no row: each method's output against the baseline's, before any timing.
    with torch.no_grad():
        try:
            ref = methods[baseline]()
        except Exception as exc:  # noqa: BLE001
            for m in methods:
                rows[m]["error"] = _error(exc) if m == baseline else f"not timed: the baseline {baseline} failed"
            return list(rows.values())
        outputs = {baseline: ref}
        for m in methods:
            if m == baseline:
                continue
            try:
                outputs[m] = methods[m]()
                why = _disagreement(outputs[m], ref, case.dtype)
            except Exception as exc:  # noqa: BLE001
                why = _error(exc)
            if why is not None:
                rows[m]["error"] = why
        ok = [m for m in methods if "error" not in rows[m]]
        # The same gradient values for every method, each laid out like that method's own output (as an
        # elementwise loss would give it): a gradient in another layout makes the activation's backward mix two
        # layouts, which costs a CPU several times the backward itself and would time the layout, not the method.
        grad_values = torch.randn_like(ref)
        grad_outs = {m: torch.empty_like(outputs[m]).copy_(grad_values) for m in ok}
        del ref, outputs

    def no_grad(fn):
        def run():
            with torch.no_grad():
                return fn()
        return run

    steps = {m: problem.steps[m] if problem.steps else forward_backward(problem, methods[m], grad_outs[m]) for m in ok}
    half = args.budget / 2
    clock = _clock(args)
    passes = {"fwd": time_interleaved({m: no_grad(methods[m]) for m in ok}, device, half, clock=clock),
              "fwdbwd": time_interleaved(steps, device, half, clock=clock)}
    itemsize = torch.empty((), dtype=case.dtype).element_size()
    for m in ok:
        failed = [t.error for t in (passes["fwd"][m], passes["fwdbwd"][m]) if t.error]
        if failed:
            rows[m]["error"] = failed[0]
            continue
        try:
            peak = peak_memory_mb(steps[m], device)
        except Exception as exc:  # noqa: BLE001
            rows[m]["error"] = _error(exc)
            continue
        fwd = passes["fwd"][m].median_ms
        rows[m].update(**_timing_fields("fwd", passes["fwd"][m]), **_timing_fields("fwdbwd", passes["fwdbwd"][m]),
                       fwdbwd_peak_MB=peak, fwd_GBps=case.bytes_moved(itemsize) / (fwd * 1e-3) / 1e9,
                       fwd_TFLOPs=case.flops() / (fwd * 1e-3) / 1e12)
    if "error" not in rows[baseline]:
        for m in ok:
            if "error" not in rows[m]:
                rows[m]["baseline"] = baseline
                for p in passes:
                    rows[m][f"{p}_speedup"] = paired_speedup(passes[p][baseline], passes[p][m])
    for r in rows.values():
        if "error" in r:
            print(f"  {case.name:40s} {r['method']:28s} error: {r['error']}", file=sys.stderr, flush=True)
        else:
            print(f"  {case.name:40s} {r['method']:28s} fwd {r['fwd_ms']:9.3f} ms ({r['fwd_spread']:4.0%})   "
                  f"fwd+bwd {r['fwdbwd_ms']:9.3f} ms ({r['fwdbwd_spread']:4.0%})", file=sys.stderr, flush=True)
    return list(rows.values())


def write_json(result: dict, path: str) -> None:
    """Replace ``path`` atomically: a run killed at any moment leaves the previous complete file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)


def run(args, cases=None, result=None) -> dict:
    """Every case (``cases``, or the case modules' defaults filtered by ``args.cases``), one after another;
    ``args.json`` is rewritten after each, ``result["complete"]`` becoming True after the last. The rows go
    into ``result`` (a new dict by default) as they finish, so an interrupted caller still has them."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result = {} if result is None else result
    environment = {**_environment(device), "clock": args.clock}
    result.update({"environment": environment, "ceilings": _ceilings(device, _clock(args)), "rows": [],
                   "complete": False, "untrusted_spread": UNTRUSTED_SPREAD})
    if cases is None:
        cases = _default_cases(device)
    if args.cases:
        cases = [c for c in cases if any(s in c.name for s in args.cases)]
        if not cases:
            raise SystemExit(f"--cases: no case name contains any of {args.cases}")
    for case in cases:
        result["rows"] += run_case(case, device, args)
        if args.json:
            write_json(result, args.json)
    result["complete"] = True
    if args.json:
        write_json(result, args.json)
    return result


def _flag(*trusted) -> str:
    return "" if all(trusted) else f" {UNTRUSTED_FLAG}"


def format_table(result: dict) -> str:
    env, ceil = result["environment"], result["ceilings"]
    threshold = result.get("untrusted_spread", UNTRUSTED_SPREAD)
    lines = [
        f"device: {env['device']} | {env['date']} | torch {env['torch']} | triton {env['triton']} | "
        f"commit {env['commit']}",
        f"command: {env['command']}",
        "measured ceilings: " + ", ".join(f"{k} {v:.1f}" for k, v in ceil.items()),
        "",
        "The methods of a case are timed interleaved, round by round. Times: median (min) ms over the rounds"
        f"{' of CPU time (the process, all its threads)' if env.get('clock') == 'cpu' else ''}; "
        "spread: (p90 - p10) / median. Speedups are against each case's baseline (vmap(functional_call) unless "
        "the case says otherwise): the median of the per-round ratios.",
        "",
        "| case | method | fwd ms | spread | fwd+bwd ms | spread | fwd speedup | fwd+bwd speedup "
        "| fwd GB/s (% copy) | fwd TFLOP/s | fwd+bwd peak MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    flagged = False
    by_case = {}
    for r in result["rows"]:
        by_case.setdefault(r["case"], {})[r["method"]] = r
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['method']} | error: {r['error']} | | | | | | | | |")
            continue
        base = by_case[r["case"]].get(r.get("baseline"), {})
        cells = []
        for p in ("fwd", "fwdbwd"):
            flag = _flag(r[f"{p}_trusted"])
            flagged |= bool(flag)
            cells += [f"{r[f'{p}_ms']:.3f} ({r[f'{p}_min_ms']:.3f})", f"{r[f'{p}_spread']:.0%}{flag}"]
        for p in ("fwd", "fwdbwd"):
            speedup = r.get(f"{p}_speedup", math.nan)
            cells.append(f"{speedup:.2f}{_flag(r[f'{p}_trusted'], base.get(f'{p}_trusted', True))}")
        pct = 100 * r["fwd_GBps"] / ceil["copy_GBps"]
        peak = "" if r["fwdbwd_peak_MB"] is None else format(r["fwdbwd_peak_MB"], ".0f")
        cells += [f"{r['fwd_GBps']:.0f} ({pct:.0f}%)", f"{r['fwd_TFLOPs']:.2f}", peak]
        lines.append(f"| {r['case']} | {r['method']} | " + " | ".join(cells) + " |")
    if flagged:
        lines += ["", f"{UNTRUSTED_FLAG}: the rounds of this pass spread by more than {threshold:.0%} of their "
                      "median (or too few rounds ran): the machine was too noisy for this number, and a speedup "
                      "computed from it, to be trusted. Rerun with a larger --budget on a quieter machine."]
    if not result.get("complete", True):
        lines += ["", "(incomplete run: the cases after the last one listed did not finish)"]
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "fwdbwd_speedup" in r]
    if not rows:
        return
    cases = list(dict.fromkeys(r["case"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colors = plt.get_cmap("tab20").colors
    per_case = [[r for r in rows if r["case"] == c] for c in cases]
    width = 0.8 / max(len(found) for found in per_case)
    fig, ax = plt.subplots(figsize=(max(8, 1.8 * len(cases)), 5))
    labelled = set()
    for j, found in enumerate(per_case):  # each case's bars side by side, centred on its tick
        for i, r in enumerate(found):
            k = methods.index(r["method"])
            bar = ax.bar(j + (i - (len(found) - 1) / 2) * width, r["fwdbwd_speedup"], width,
                         color=colors[k % len(colors)], label=None if k in labelled else r["method"])
            labelled.add(k)
            if not r["fwdbwd_trusted"]:
                bar[0].set_hatch("//")  # untrusted: see the table's flag
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(cases)), cases, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel("forward+backward speedup vs the case's baseline")
    ax.set_yscale("log")
    env = result["environment"]
    ax.set_title(f"{env['device']}, {env['date'][:10]}, torch {env['torch']} (hatched: spread too large to trust)",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: never over a bar
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="override every case's dtype (float32, bfloat16, float16)")
    parser.add_argument("--cases", nargs="+", metavar="SUBSTRING",
                        help="run only the cases whose name contains one of these")
    parser.add_argument("--budget", type=float, default=2.0,
                        help="seconds of timed rounds per case (half forward, half forward+backward), after "
                             "warm-up; at least 5 rounds each whatever it takes")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU); the default is torch's")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="CPU only: 'cpu' times the process's CPU time instead of wall time, so time slices "
                             "given to other processes do not count (with --threads 1 no thread waits for a "
                             "descheduled one)")
    parser.add_argument("--max-loop-work", type=int, default=20000,
                        help="skip the Python loop where B*N exceeds this")
    parser.add_argument("--json", help="write the rows, ceilings and environment here, rewritten after every case")
    parser.add_argument("--plot", help="write a PNG bar chart of the speedups here, at the end")
    parser.add_argument("--from-json", metavar="PATH",
                        help="run nothing: print the table (and --plot) of the JSON of an earlier run, even a "
                             "killed one")
    args = parser.parse_args(argv)
    if not args.budget >= 0:
        parser.error(f"--budget: expected a non-negative number of seconds, got {args.budget}")
    if args.clock == "cpu" and args.device != "cpu":
        parser.error(f"--clock cpu: measures CPU time, for --device cpu only (got --device {args.device})")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads: expected a positive int, got {args.threads}")
    return args


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> None:
    args = parse_args(argv)
    interrupted = False
    if args.from_json:
        with open(args.from_json) as f:
            result = json.load(f)
    else:
        # `timeout` (the GPU session's time boxes) sends SIGTERM: end like Ctrl-C, with the finished rows printed.
        previous = signal.signal(signal.SIGTERM, _interrupt)
        result = {}
        try:
            run(args, result=result)
        except KeyboardInterrupt as exc:
            interrupted = True
            print(f"interrupted ({exc or 'Ctrl-C'}): the table holds the cases that finished", file=sys.stderr)
        finally:
            signal.signal(signal.SIGTERM, previous)
    if result.get("rows"):
        print(format_table(result))
        if args.plot:
            plot(result, args.plot)
    if interrupted:
        sys.exit(130)


if __name__ == "__main__":
    main()
