"""The examples run end to end with tiny settings (a subprocess each, as a user runs them): the loss goes down,
and the field example writes its PNG."""
import importlib.util
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def run_example(name, *args):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, name), *args], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_conditional_field(tmp_path):
    png = tmp_path / "field.png"
    out = run_example("conditional_field.py", "--device", "cpu", "--steps", "20", "--size", "16", "--images", "64", "--out", str(png))
    first, last, held_out = map(float, re.search(r"train loss ([\d.]+) -> ([\d.]+) .*held-out loss ([\d.]+)",
                                                 out).groups())
    assert last < first, out
    assert held_out < 0.1, out
    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib is not installed" in out
    else:
        assert png.exists() and png.stat().st_size > 1000
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_conditional_field_siren():
    out = run_example("conditional_field.py", "--steps", "10", "--size", "8", "--images", "16", "--activation", "sine",
                      "--out", "")
    first, last = map(float, re.search(r"train loss ([\d.]+) -> ([\d.]+)", out).groups())
    assert last < first, out


def test_multitask_regression():
    out = run_example("multitask_regression.py", "--device", "cpu", "--steps", "20", "--train-tasks", "50", "--test-tasks", "20")
    rows = [tuple(map(float, m)) for m in re.findall(r"train mse\s+([\d.]+)\s+held-out mse\s+([\d.]+)", out)]
    assert len(rows) >= 2, out
    assert rows[-1][0] < rows[0][0] and rows[-1][1] < rows[0][1], out
