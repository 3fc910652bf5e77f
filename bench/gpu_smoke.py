"""Smoke check: one case per kernel path, each against the float64 torch backend, one line per case.

    python bench/gpu_smoke.py                  # every case, in parallel worker processes
    python bench/gpu_smoke.py --list           # the cases and the path each one forces
    python bench/gpu_smoke.py --cases mlp_,hyper --jobs 0    # a subset, in this process

Each case runs one backend's forward and backward (the backend object itself, so that the flags the ops layer
would choose, such as keeping the pre-activation, can be forced) and the same calls on the torch backend in
float64 on the same rounded inputs, and prints:

    name  backend  dtype  first <s>  err <max relative error> (<which>, tol <tol>)  PASS|FAIL|SKIP  [detail]

``first`` is the wall time of the first forward + backward, Triton's compiles included (the smoke runs
before the tests, so these are the cold compiles). ``err`` is the largest ``||out - ref|| / ||ref||`` over
the outputs and gradients; the tolerances are the test suite's (``tests/reference.py``). A case also fails
when the path it is meant to force did not run (a kernel not launched, a reduction not split), so that a
change of the dispatch rules cannot turn a case into a copy of another. A failing or raising case never
stops the others: cases run in worker processes (``--jobs``); a worker that crashes or hits a CUDA error
(which poisons its context) is replaced and the case is reported as failed. Exit code 1 if any case
failed, 130 when interrupted (SIGINT, as the session script's time limit sends), else 0.

On a machine without a CUDA GPU the Triton kernels run under the interpreter (``TRITON_INTERPRET=1``, set
here before triton is imported) on tiny shapes, and the decisions that depend on the GPU's size (split the
dW reduction, atomics) are forced through the same seams the tests use; the CUDA-module cases are skipped
with a line that says why. ``bench/gpu_session.sh`` runs this as its smoke stage.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
import traceback
from typing import Callable, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

# The interpreter must be chosen before the first `import triton` (tests/conftest.py does the same).
GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

from hyperkernels._dispatch import available_backends, get_backend  # noqa: E402
from hyperkernels.backends._precision import tf32_allowed  # noqa: E402
from reference import FORWARD_RTOL, GRAD_RTOL, relative_error  # noqa: E402
from gpu_smoke_cases import CASES, CASES_BY_NAME, PROBLEMS, Case, case_generator  # noqa: E402

# TF32 keeps 10 mantissa bits: its error is that of float16 inputs, not float32 ones.
TF32_RTOL = {"forward": FORWARD_RTOL[torch.float16], "grad": GRAD_RTOL[torch.float16]}
MARK = "@@smoke@@ "  # starts a worker's result lines; anything else a worker prints is passed through
NO_FORCE = os.environ.get("HK_SMOKE_NO_FORCE") == "1"  # --no-force, handed to the workers


assert len(CASES_BY_NAME) == len(CASES), "case names must be unique"


# ------------------------------------------------------------------------------------------------------
# What ran: every Triton kernel launch and dispatch decision of the current case
# ------------------------------------------------------------------------------------------------------

class Recorder:
    """Wraps the kernels and decision functions of the backend modules in place (the launchers look them up
    as module globals at each call), so a case can say what it ran. Forced seams replace a decision only for
    the duration of one case."""

    def __init__(self):
        self.launches: list[tuple[str, dict]] = []
        self.decisions: list[tuple[str, object]] = []
        self.kernels: list[str] = []  # every Triton kernel of the backend, launched or not
        self._impls: dict[str, Callable] = {}
        self._modules: dict[str, object] = {}

    def install(self) -> None:
        if available_backends()["triton"] is None:
            from hyperkernels.backends.triton import (hyper_linear, linear, linear_gemm, linear_gemv, mlp, mlp_gemm,
                                                      mlp_gemv)

            # The seams (decisions) live in the entry modules; the kernels in the regime modules, labelled by op.
            self._modules.update(linear=linear, mlp=mlp, hyper_linear=hyper_linear)
            kernel_modules = (("linear", linear_gemv), ("linear", linear_gemm), ("mlp", mlp_gemv), ("mlp", mlp_gemm),
                              ("hyper_linear", hyper_linear))
            for short, module in kernel_modules:
                for attr, obj in list(vars(module).items()):
                    if attr.endswith("_kernel") and hasattr(type(obj), "__getitem__"):
                        setattr(module, attr, _KernelSpy(f"{short}.{attr}", obj, self.launches))
                        self.kernels.append(f"{short}.{attr}")
            for seam in ("linear._dw_splits", "mlp._dw_mode", "mlp._programs_wanted", "hyper_linear._dg_splits"):
                self._wrap(seam)
        if available_backends()["cuda"] is None:
            from hyperkernels.backends.cuda import linear as cuda_linear

            ext = cuda_linear._ext()
            cuda_linear._ext = lambda: _ExtSpy(ext, self)

    def _wrap(self, seam: str) -> None:
        short, attr = seam.split(".")
        module = self._modules[short]
        self._impls[seam] = getattr(module, attr)

        def decision(*args, **kwargs):
            value = self._impls[seam](*args, **kwargs)
            self.decisions.append((seam, value))
            return value

        setattr(module, attr, decision)

    @contextlib.contextmanager
    def forced(self, seams):
        saved = {name: self._impls[name] for name, _ in seams}
        try:
            for name, fn in seams:
                self._impls[name] = fn
            yield
        finally:
            self._impls.update(saved)

    def reset(self) -> None:
        self.launches.clear()
        self.decisions.clear()


class _KernelSpy:
    def __init__(self, name, kernel, log):
        self._name, self._kernel, self._log = name, kernel, log

    def __getitem__(self, grid):
        launch = self._kernel[grid]

        def run(*args, **kwargs):
            self._log.append((self._name, {k: v for k, v in kwargs.items() if k.isupper()}))
            return launch(*args, **kwargs)

        return run

    def __getattr__(self, attr):
        return getattr(self._kernel, attr)


class _ExtSpy:
    """hyperkernels._cuda as the wrappers see it, recording launches and the backward's workspace size."""

    def __init__(self, ext, recorder: Recorder):
        self._ext, self._rec = ext, recorder

    def linear_forward(self, args):
        self._rec.launches.append(("cuda.linear_forward", {"allow_tf32": args.allow_tf32}))
        return self._ext.linear_forward(args)

    def linear_backward(self, args):
        self._rec.launches.append(("cuda.linear_backward", {"allow_tf32": args.allow_tf32}))
        return self._ext.linear_backward(args)

    def linear_backward_workspace_size(self, **kw):
        value = self._ext.linear_backward_workspace_size(**kw)
        self._rec.decisions.append(("cuda.workspace_bytes", value))
        return value

    def __getattr__(self, attr):
        return getattr(self._ext, attr)




# ------------------------------------------------------------------------------------------------------
# One case
# ------------------------------------------------------------------------------------------------------

def _device(case: Case) -> torch.device:
    if case.backend == "triton" and INTERPRETED:
        return torch.device("cpu")
    return torch.device("cuda")


def skip_reason(case: Case) -> Optional[str]:
    reason = available_backends()[case.backend]
    if reason is not None:
        return f"the {case.backend} backend is unavailable: {reason}"
    if case.cpu is None and not GPU:
        return "GPU-only case (no CUDA GPU here)"
    return get_backend(case.backend).check_support(_device(case), case.dtype)


@contextlib.contextmanager
def _modes(case: Case, recorder: Recorder):
    tf32 = tf32_allowed()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.backends.cuda.matmul.allow_tf32 = case.tf32
    torch.use_deterministic_algorithms(case.deterministic, warn_only=True)
    try:
        with recorder.forced(case.force if INTERPRETED and not NO_FORCE else ()):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def _path_problems(case: Case, recorder: Recorder) -> list[str]:
    problems = []
    def meets(value, wanted):
        return wanted(value) if callable(wanted) else value == wanted

    for name, flags in case.expect:
        if not any(n == name and all(meets(f.get(key), v) for key, v in flags.items()) for n, f in recorder.launches):
            what = name + (" with " + ", ".join(f"{k}={getattr(v, '__name__', v)}" for k, v in flags.items())
                           if flags else "")
            problems.append(f"expected path not taken: {what} was not launched")
    for name, ok in case.decide:
        values = [v for n, v in recorder.decisions if n == name]
        if not values or not any(ok(v) for v in values):
            problems.append(f"expected path not taken: {name} returned {values or 'nothing'}")
    return problems


def run_case(case: Case, recorder: Recorder) -> dict:
    """The case's result as a dict (see ``format_result``). Exceptions become a FAIL with the error."""
    result = {"name": case.name, "backend": case.backend, "dtype": str(case.dtype).replace("torch.", "")}
    reason = skip_reason(case)
    if reason is not None:
        return {**result, "status": "SKIP", "detail": reason}
    device = _device(case)
    shape = case.gpu if device.type == "cuda" else case.cpu
    leaves, run = PROBLEMS[case.op](case, shape, case_generator(case))
    low = {name: v.to(case.dtype).to(device) for name, v in leaves.items()}
    ref = {name: v.double() for name, v in low.items()}  # the same rounded numbers, in float64
    recorder.reset()
    start = time.perf_counter()
    try:
        with _modes(case, recorder):
            out = run(get_backend(case.backend), low, case.save)
            if device.type == "cuda":
                torch.cuda.synchronize()  # a fault is reported against this case
        first = time.perf_counter() - start
        expected = run(get_backend("torch_bmm"), ref, True)
    except Exception as exc:  # reported, never fatal to the other cases
        text = f"{type(exc).__name__}: {exc}"
        return {**result, "status": "FAIL", "first": time.perf_counter() - start, "detail": text[:600],
                "fatal": device.type == "cuda" and _poisons_context(text), "trace": traceback.format_exc()[-3000:],
                "launched": sorted({n for n, _ in recorder.launches})}
    tf32 = case.tf32 and case.dtype == torch.float32
    worst, problems = None, []
    for name, ref_t in expected.items():
        kind = "forward" if name == "y" else "grad"
        tol = TF32_RTOL[kind] if tf32 else (FORWARD_RTOL if kind == "forward" else GRAD_RTOL)[case.dtype]
        got = out.get(name)
        if got is None or tuple(got.shape) != tuple(ref_t.shape):
            problems.append(f"{name}: shape {None if got is None else tuple(got.shape)} != {tuple(ref_t.shape)}")
            continue
        err = relative_error(got, ref_t)
        if worst is None or not err / tol <= worst[1] / worst[2]:
            worst = (name, err, tol)
        if not err <= tol:  # NaN fails
            problems.append(f"{name}: relative error {err:.2e} > {tol:.0e}")
    problems += _path_problems(case, recorder)
    launched = sorted({n for n, _ in recorder.launches})
    return {**result, "status": "FAIL" if problems else "PASS", "first": first,
            "err": None if worst is None else worst[1], "which": None if worst is None else worst[0],
            "tol": None if worst is None else worst[2], "detail": "; ".join(problems), "launched": launched}


def _poisons_context(text: str) -> bool:
    """CUDA errors after which every later call in the process fails too (a sticky context error)."""
    sticky = ("illegal memory access", "illegal instruction", "misaligned address", "unspecified launch failure",
              "device-side assert", "an illegal", "CUDA error: launch timeout", "CUDA_ERROR_ILLEGAL")
    return any(s.lower() in text.lower() for s in sticky)


def format_result(r: dict) -> str:
    first = f"first {r['first']:7.2f} s" if r.get("first") is not None else "first       - "
    if r.get("err") is not None:
        err = f"err {r['err']:.1e} ({r['which']}, tol {r['tol']:.0e})"
    else:
        err = "err -"
    line = f"{r['name']:34s} {r['backend']:6s} {r['dtype']:8s} {first}  {err:32s} {r['status']}"
    return line + (f"  {r['detail']}" if r.get("detail") else "")


# ------------------------------------------------------------------------------------------------------
# Running many: worker processes, one case at a time each
# ------------------------------------------------------------------------------------------------------

def _worker() -> int:
    """Reads case names on stdin, answers one MARK line per case; exits after a context-poisoning error."""
    recorder = Recorder()
    recorder.install()
    print(MARK + json.dumps({"ready": True, "kernels": recorder.kernels}), flush=True)
    for line in sys.stdin:
        name = line.strip()
        if not name:
            continue
        r = run_case(CASES_BY_NAME[name], recorder)
        if r.get("trace") and r["status"] == "FAIL":
            print(r.pop("trace"), file=sys.stderr, flush=True)
        print(MARK + json.dumps(r), flush=True)
        if r.get("fatal"):
            return 3
    return 0


class _Worker:
    def __init__(self, events: "queue.Queue"):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1, env=os.environ.copy())
        self.case: Optional[str] = None
        self.since = 0.0
        self.ready = False
        threading.Thread(target=self._read, args=(events,), daemon=True).start()

    def _read(self, events):
        for line in self.proc.stdout:
            if line.startswith(MARK):
                events.put((self, json.loads(line[len(MARK):])))
            else:
                sys.stdout.write(line)
        events.put((self, None))

    def give(self, name: str) -> None:
        self.case, self.since = name, time.monotonic()
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()

    def stop(self, wait: float) -> None:
        """Ends the worker: EOF on its stdin lets it exit by itself (under compute-sanitizer that prints its
        ERROR SUMMARY and sets the exit code, reported here); after ``wait`` seconds it is killed."""
        with contextlib.suppress(Exception):
            self.proc.stdin.close()
        try:
            code = self.proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return
        if code != 0:
            print(f"smoke: worker {self.proc.pid} exited with code {code}", flush=True)


def _failure(name: str, detail: str) -> dict:
    case = CASES_BY_NAME[name]
    return {"name": name, "backend": case.backend, "dtype": str(case.dtype).replace("torch.", ""), "status": "FAIL",
            "detail": detail}


def _run_parallel(cases: list, jobs: int, case_timeout: float, emit) -> list[str]:
    """Runs the cases on ``jobs`` worker processes; returns the kernels the workers found."""
    events: queue.Queue = queue.Queue()
    # The fused MLP's N > 1 kernels compile slowest (one kernel holds the whole network): started first, they
    # overlap the many short compiles instead of ending the run alone.
    pending = [c.name for c in sorted(cases, key=lambda c: not (c.op == "mlp" and c.gpu["n"] > 1))]
    workers = [_Worker(events) for _ in range(min(jobs, len(pending)))]
    kernels: list[str] = []
    try:
        while pending or any(w.case for w in workers):
            try:
                worker, msg = events.get(timeout=5.0)
            except queue.Empty:
                worker, msg = None, None
            if worker is not None and msg is not None and msg.get("ready"):
                worker.ready, kernels = True, kernels or msg["kernels"]
            elif worker is not None and msg is not None:
                emit(msg)
                worker.case = None
            elif worker is not None:  # the worker exited
                if worker.case is not None:
                    emit(_failure(worker.case, f"the worker process died (exit code {worker.proc.wait()}) while "
                                               "running this case; its stderr is above"))
                workers.remove(worker)
                if not worker.ready:  # it died importing: so would a replacement
                    code = worker.proc.wait()
                    for name in pending:
                        emit(_failure(name, f"the worker process could not start (exit code {code}): see above"))
                    pending.clear()
                elif pending:
                    workers.append(_Worker(events))
            now = time.monotonic()
            for w in list(workers):
                if w.case is not None and now - w.since > case_timeout:
                    name, w.case = w.case, None
                    emit({**_failure(name, f"no result after {case_timeout:.0f} s: worker killed"),
                          "first": now - w.since})
                    w.proc.kill()  # its reader thread reports the exit, which starts a replacement
                elif w.case is None and w.ready and w.proc.poll() is None and pending:
                    w.give(pending.pop(0))
    except KeyboardInterrupt:
        for w in workers:
            w.stop(wait=0)
        raise
    for w in workers:
        w.stop(wait=30)
    return kernels


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="", help="comma-separated substrings: only the cases whose name has one")
    parser.add_argument("--backend", choices=["triton", "cuda"], help="only this backend's cases")
    parser.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                        help="worker processes (each compiles its own cases); 0: run in this process")
    parser.add_argument("--case-timeout", type=float, default=240.0, help="seconds before a worker's case is abandoned")
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    parser.add_argument("--no-force", action="store_true",
                        help="under the interpreter, do not force the GPU's decisions (those cases' path checks fail)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.no_force:
        global NO_FORCE
        NO_FORCE = True
        os.environ["HK_SMOKE_NO_FORCE"] = "1"  # for the workers
    if args.worker:
        return _worker()
    wanted = [s for s in args.cases.split(",") if s]
    cases = [c for c in CASES if (not wanted or any(s in c.name for s in wanted))
             and (args.backend is None or c.backend == args.backend)]
    if args.list:
        for c in cases:
            print(f"{c.name:34s} {c.backend:6s} {str(c.dtype)[6:]:8s} {c.why}")
        return 0
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device = torch.cuda.get_device_name() if GPU else "no CUDA GPU"
    print(f"smoke: {len(cases)} cases on {device}; torch {torch.__version__}, triton {triton_version}, "
          f"interpreter {'on' if INTERPRETED else 'off'}, autotune "
          f"{'off' if os.environ.get('HYPERKERNELS_TRITON_AUTOTUNE') == '0' else 'on'}, jobs {args.jobs}", flush=True)
    counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}
    done: set = set()
    launched: set = set()
    start = time.perf_counter()

    def emit(r):
        counts[r["status"]] += 1
        done.add(r["name"])
        launched.update(r.get("launched", ()))
        print(format_result(r), flush=True)

    try:
        if args.jobs <= 0:
            recorder = Recorder()
            recorder.install()
            kernels = recorder.kernels
            for c in cases:
                r = run_case(c, recorder)
                if r.get("trace") and r["status"] == "FAIL":
                    print(r.pop("trace"), file=sys.stderr, flush=True)
                emit(r)
        else:
            kernels = _run_parallel(cases, args.jobs, args.case_timeout, emit)
    except KeyboardInterrupt:
        missing = [c.name for c in cases if c.name not in done]
        print(f"smoke: INTERRUPTED after {time.perf_counter() - start:.0f} s; not run: {', '.join(missing)}",
              flush=True)
        print(f"smoke: {counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP, {len(missing)} not run",
              flush=True)
        return 130
    if not wanted and args.backend in (None, "triton") and kernels:
        # Every Triton kernel of the backend must be launched by some case: a new kernel needs a case here.
        never = [k for k in kernels if k not in launched]
        counts["FAIL"] += bool(never)
        print(f"smoke: coverage: {len(kernels) - len(never)} of {len(kernels)} Triton kernels launched"
              + (f": FAIL, never launched: {', '.join(never)}" if never else ""), flush=True)
    print(f"smoke: {counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP in "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
