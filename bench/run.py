"""The README's benchmark: every available hyperkernels backend against vmap(functional_call), bmm,
grouped conv and a Python loop, on embedded default shapes (``bench/cases.py``).

    python bench/run.py                       # table on this machine's device
    python bench/run.py --json r.json --plot r.png
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hyperkernels as hk  # noqa: E402
from cases import forward_backward  # noqa: E402
from timing import copy_bandwidth_gbs, matmul_tflops, measure_ms, peak_memory_mb  # noqa: E402

# Modules whose default_cases(device) feed the table (see cases.py for what a case provides).
CASE_MODULES = ["cases", "cases_training", "cases_hyper"]


def _default_cases(device):
    import importlib

    return [case for name in CASE_MODULES for case in importlib.import_module(name).default_cases(device)]


def _environment(device: torch.device) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        commit = ""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    return {
        "device": name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda, "commit": commit,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }


def _backends(device: torch.device, dtype: torch.dtype) -> list[str]:
    names = ["auto"]
    for name, reason in hk.available_backends().items():
        if reason is None and hk._dispatch.get_backend(name).check_support(device, dtype) is None:
            if device.type == "cpu" and name not in ("torch_bmm", "torch_conv"):
                continue  # interpreted kernels on CPU are a correctness tool, not a contender
            names.append(name)
    return names


def run(args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    env = _environment(device)
    ceilings = {"copy_GBps": copy_bandwidth_gbs(device, 1 << 30 if device.type == "cuda" else 1 << 28)}
    if device.type == "cuda":
        ceilings["bf16_matmul_TFLOPs"] = matmul_tflops(device, torch.bfloat16, 8192)
        ceilings["fp32_matmul_TFLOPs"] = matmul_tflops(device, torch.float32, 8192)
    else:
        ceilings["fp32_matmul_TFLOPs"] = matmul_tflops(device, torch.float32, 2048)
    rows, baselines = [], {}
    cases = _default_cases(device)
    if args.cases:
        cases = [c for c in cases if any(s in c.name for s in args.cases)]
    for case in cases:
        if args.dtype:
            case.dtype = getattr(torch, args.dtype)
        problem = case.build(device, _backends(device, case.dtype))
        baselines[case.name] = problem.baseline
        grad_out = None
        for method, fn in problem.methods.items():
            if method == "python loop" and getattr(case, "batch", 0) * getattr(case, "n", 1) > args.max_loop_work:
                continue  # a loop of B kernel launches per layer: minutes, and the verdict is already known
            try:
                with torch.no_grad():
                    fwd = measure_ms(fn, device, budget_s=args.budget)
                if grad_out is None:
                    grad_out = torch.randn_like(fn())
                step = forward_backward(problem, fn, grad_out)
                fwdbwd = measure_ms(step, device, budget_s=args.budget)
                peak = peak_memory_mb(step, device)
            except Exception as exc:  # a method that cannot run this shape is reported, not fatal
                rows.append({"case": case.name, "method": method, "error": f"{type(exc).__name__}: {exc}"[:200]})
                continue
            itemsize = torch.empty((), dtype=case.dtype).element_size()
            rows.append({
                "case": case.name, "method": method, "dtype": str(case.dtype).replace("torch.", ""),
                "fwd_ms": fwd, "fwdbwd_ms": fwdbwd, "fwdbwd_peak_MB": peak,
                "fwd_GBps": case.bytes_moved(itemsize) / (fwd * 1e-3) / 1e9,
                "fwd_TFLOPs": case.flops() / (fwd * 1e-3) / 1e12,
            })
            print(f"  {case.name:32s} {method:26s} fwd {fwd:9.3f} ms   fwd+bwd {fwdbwd:9.3f} ms", file=sys.stderr,
                  flush=True)
        del problem
    for case_name in dict.fromkeys(r["case"] for r in rows):
        ref = next((r for r in rows if r["case"] == case_name and r["method"] == baselines[case_name]
                    and "error" not in r), None)
        for r in rows:
            if r["case"] == case_name and "error" not in r and ref is not None:
                r["baseline"] = baselines[case_name]
                r["fwd_speedup"] = ref["fwd_ms"] / r["fwd_ms"]
                r["fwdbwd_speedup"] = ref["fwdbwd_ms"] / r["fwdbwd_ms"]
    return {"environment": env, "ceilings": ceilings, "rows": rows}


def format_table(result: dict) -> str:
    env, ceil = result["environment"], result["ceilings"]
    lines = [
        f"device: {env['device']} | {env['date']} | torch {env['torch']} | triton {env['triton']} | "
        f"commit {env['commit']}",
        f"command: {env['command']}",
        "measured ceilings: " + ", ".join(f"{k} {v:.1f}" for k, v in ceil.items()),
        "",
        "Speedups are against each case's baseline (vmap(functional_call) unless the case says otherwise).",
        "",
        "| case | method | fwd ms | fwd+bwd ms | fwd speedup | fwd+bwd speedup | fwd GB/s (% copy) | fwd TFLOP/s "
        "| fwd+bwd peak MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['method']} | error: {r['error']} | | | | | | |")
            continue
        pct = 100 * r["fwd_GBps"] / ceil["copy_GBps"]
        lines.append(
            f"| {r['case']} | {r['method']} | {r['fwd_ms']:.3f} | {r['fwdbwd_ms']:.3f} | "
            f"{r.get('fwd_speedup', float('nan')):.2f} | {r.get('fwdbwd_speedup', float('nan')):.2f} | "
            f"{r['fwd_GBps']:.0f} ({pct:.0f}%) | {r['fwd_TFLOPs']:.2f} | "
            f"{'' if r['fwdbwd_peak_MB'] is None else format(r['fwdbwd_peak_MB'], '.0f')} |"
        )
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "fwdbwd_speedup" in r]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(8, 1.8 * len(cases)), 5))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        values = [next((r["fwdbwd_speedup"] for r in rows if r["case"] == c and r["method"] == method), 0)
                  for c in cases]
        ax.bar([j + i * width for j in range(len(cases))], values, width, label=method)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))], cases, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel("forward+backward speedup vs the case's baseline")
    ax.set_yscale("log")
    env = result["environment"]
    ax.set_title(f"{env['device']}, {env['date'][:10]}, torch {env['torch']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="override every case's dtype (float32, bfloat16, float16)")
    parser.add_argument("--cases", nargs="*", help="run only cases whose name contains one of these")
    parser.add_argument("--budget", type=float, default=0.5, help="seconds of timing per method and pass")
    parser.add_argument("--max-loop-work", type=int, default=20000,
                        help="skip the Python loop where B*N exceeds this")
    parser.add_argument("--json", help="write the rows, ceilings and environment here")
    parser.add_argument("--plot", help="write a PNG bar chart of the speedups here")
    args = parser.parse_args()
    result = run(args)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        plot(result, args.plot)


if __name__ == "__main__":
    main()
