"""The first-call GPU scripts, dry-run on CPU so that they cannot rot between the rare calls that have a GPU:
bench/gpu_session.sh end to end (the smoke under the Triton interpreter, the GPU stages skipped with a line that
says so), a stage cut off at its limit, the stage budgets, and bench/gpu_smoke.py's own failure paths."""
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import pytest
import torch

from conftest import ROOT

SESSION = os.path.join(ROOT, "bench", "gpu_session.sh")
MEMCHECK = os.path.join(ROOT, "bench", "gpu_memcheck.sh")
SMOKE = os.path.join(ROOT, "bench", "gpu_smoke.py")
# What the script may write to $OUT: these 7 files (a remote run brings back at most 8).
SESSION_FILES = {"session.log", "build.log", "smoke.log", "tests.log", "bench.log", "bench.json", "bench.png"}
DEVICE_COMMAND_LIMIT = 600  # seconds: the limit of the command that runs the script on a GPU machine
SESSION_LIMIT = 540  # what the stages may take together, leaving room for the machine's own start-up

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="a dry run of the GPU scripts on a CPU machine; with a GPU, run them for real")


def _env(**extra):
    """This process's environment without the scripts' own overrides, so the defaults are what is tested."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HK_")}
    env.update(PYTHON=sys.executable, **extra)
    return env


def _budgets(script):
    out = subprocess.run(["bash", script, "--budgets"], capture_output=True, text=True, env=_env(), check=True).stdout
    return [(name, int(seconds)) for name, seconds in (line.split() for line in out.splitlines())]


def _smoke_case_names():
    out = subprocess.run([sys.executable, SMOKE, "--list"], capture_output=True, text=True, env=_env(), check=True)
    return [(line.split()[0], line.split()[1]) for line in out.stdout.splitlines()]


def _stage_lines(log):
    return [line for line in log.splitlines() if line.startswith("stage ")]


def test_stage_budgets_fit_one_device_command():
    session = _budgets(SESSION)
    assert [name for name, _ in session] == ["env", "build", "smoke", "tests", "bench", "report"]
    assert all(seconds > 0 for _, seconds in session), session
    assert sum(s for _, s in session) <= SESSION_LIMIT < DEVICE_COMMAND_LIMIT, session
    memcheck = _budgets(MEMCHECK)
    assert [name for name, _ in memcheck][:2] == ["env", "build"] and "memcheck_cuda" in dict(memcheck)
    # The sanitizer multiplies run times: its call gets at least 300 s, and still fits one command.
    assert 300 <= sum(s for _, s in memcheck) <= SESSION_LIMIT, memcheck


def test_session_dry_run_on_cpu(tmp_path):
    out = tmp_path / "out"
    start = time.monotonic()
    # The default budgets, but room for a busy CI machine's imports (the stages' time checks are the next test's).
    env = _env(OUT=str(out), HK_BUDGET_ENV="60", HK_BUDGET_SMOKE="240")
    proc = subprocess.run(["bash", SESSION], env=env, capture_output=True, text=True, timeout=600)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr
    written = set(os.listdir(out))
    assert written == {"session.log", "smoke.log"} and written <= SESSION_FILES, written
    log = (out / "session.log").read_text()

    # The environment first: every piece the build and the tests need has a line, found or MISSING.
    for item in ("gpu", "nvcc", "python", "Python.h", "torch", "triton", "numpy", "setuptools", "pybind11",
                 "pytest-xdist"):
        assert re.search(rf"^  {re.escape(item)} +\S", log, re.M), f"no environment line for {item}:\n{log}"
    assert re.search(r"^  torch +\S+, CUDA .*GPU seen: False", log, re.M), log

    stages = _stage_lines(log)
    names = [line.split()[1] for line in stages]
    assert names == ["env", "env", "build", "smoke", "smoke", "tests", "bench", "report", "report"], stages
    for name in ("env", "smoke", "report"):
        assert any(re.match(rf"stage {name} +start at \+\d+ s, budget \d+ s, limit \d+ s$", s) for s in stages), stages
        ok = rf"stage {name} +end after \d+ s: rc 0 ok; Triton compiles \+0$"
        assert any(re.match(ok, s) for s in stages), stages
    for name in ("build", "tests", "bench"):
        assert any(re.match(rf"stage {name} +SKIP: no CUDA GPU here", s) for s in stages), stages
    assert re.search(r"^session: end after \d+ s", log, re.M), log
    assert elapsed < 60 + 240 + 10 + 30

    # The smoke: one line per case, the Triton ones run under the interpreter, the CUDA-module ones skipped.
    smoke = (out / "smoke.log").read_text()
    lines = {line.split()[0]: line for line in smoke.splitlines() if line and not line.startswith("smoke:")}
    cases = _smoke_case_names()
    assert {name for name, _ in cases} <= set(lines), smoke
    for name, backend in cases:
        line = lines[name]
        if backend == "triton":
            assert re.search(r" first +\d+\.\d+ s +err \d\.\de[-+]\d+ \(\w+, tol \de[-+]\d+\) +PASS$", line), line
        else:
            assert re.search(r" SKIP +the cuda backend is unavailable: ", line), line
    n_triton = sum(backend == "triton" for _, backend in cases)
    assert re.search(rf"^smoke: {n_triton} PASS, 0 FAIL, {len(cases) - n_triton} SKIP in ", smoke, re.M), smoke
    assert re.search(r"^smoke: coverage: (\d+) of \1 Triton kernels launched$", smoke, re.M), smoke
    assert "digest:" in log and f"smoke: {n_triton} PASS, 0 FAIL" in log


def test_a_stage_past_its_limit_is_interrupted_and_the_next_ones_still_run(tmp_path):
    out = tmp_path / "out"
    env = _env(OUT=str(out), HK_STAGES="smoke tests bench report", HK_BUDGET_SMOKE="4")
    start = time.monotonic()
    proc = subprocess.run(["bash", SESSION], env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stages = _stage_lines((out / "session.log").read_text())
    assert re.match(r"stage smoke +start at \+\d+ s, budget 4 s, limit [1-3] s$", stages[0]), stages
    assert re.match(r"stage smoke +end after \d+ s: rc (124 TIMEOUT|137 KILLED)", stages[1]), stages
    assert [line.split()[1] for line in stages[2:]] == ["tests", "bench", "report", "report"], stages
    assert stages[-1].endswith("rc 0 ok; Triton compiles +0"), stages
    assert (out / "smoke.log").exists()  # whatever the smoke wrote before it was cut off
    assert elapsed < 4 + 60  # the smoke was stopped at its limit, not run to its end


def _processes_with(tag):
    """Pids of the processes whose environment holds ``tag`` (the smoke's workers inherit it)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if tag.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


def test_smoke_sigint_prints_its_tally_and_ends_its_workers():
    """SIGINT to the smoke's main process alone (what the session sends at a stage's limit): it reports what it
    did not run, exits 130, and leaves none of its worker processes behind."""
    tag = f"HK_SMOKE_TEST_TAG={uuid.uuid4().hex}"
    key, value = tag.split("=")
    proc = subprocess.Popen([sys.executable, SMOKE, "--backend", "triton", "--jobs", "2"], env=_env(**{key: value}),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:  # header, then the first case's line
            lines.append(line)
            if re.search(r" (PASS|FAIL)", line):
                break
        proc.send_signal(signal.SIGINT)
        lines += proc.stdout.readlines()
        assert proc.wait(timeout=60) == 130, "".join(lines)
    finally:
        proc.kill()
    text = "".join(lines)
    assert re.search(r"^smoke: INTERRUPTED after \d+ s; not run: \w+", text, re.M), text
    assert re.search(r"^smoke: \d+ PASS, 0 FAIL, 0 SKIP, \d+ not run$", text, re.M), text
    deadline = time.monotonic() + 10
    while _processes_with(tag) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _processes_with(tag), "smoke workers left running"


def test_smoke_fails_a_case_whose_path_was_not_taken():
    """Without the interpreter's forced decisions the split / atomic cases run the default path: their numbers
    are right, and each still fails, naming the decision that did not happen."""
    proc = subprocess.run([sys.executable, SMOKE, "--backend", "triton", "--cases", "split,atomic", "--no-force",
                           "--jobs", "0"], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    failed = re.findall(r"^(\w+) .* FAIL  (.*)$", proc.stdout, re.M)
    assert {name for name, _ in failed} == {"linear_split_dw_fp16", "mlp_gemm_atomic_fp32", "mlp_gemm_split_bf16",
                                           "hyper_split_dg_fp32"}, proc.stdout
    assert all("expected path not taken" in why and "relative error" not in why for _, why in failed), failed
