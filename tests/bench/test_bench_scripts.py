"""Every script in bench/ still imports what it uses: its --help runs (a renamed library name breaks a script no
other test runs), and every helper module imports."""
import importlib
import os
import subprocess
import sys

import pytest

from conftest import ROOT

BENCH = os.path.join(ROOT, "bench")
FILES = sorted(f for f in os.listdir(BENCH) if f.endswith(".py"))
SCRIPTS = [f for f in FILES if "argparse" in open(os.path.join(BENCH, f)).read()]
MODULES = [f for f in FILES if f not in SCRIPTS]


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_help_runs(script):
    out = subprocess.run([sys.executable, os.path.join(BENCH, script), "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "usage:" in out.stdout


@pytest.mark.parametrize("module", MODULES)
def test_module_imports(module, monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    importlib.import_module(module.removesuffix(".py"))


def test_the_lists_are_not_empty():
    assert "run.py" in SCRIPTS and "hyper_crossover.py" in SCRIPTS and "timing.py" in MODULES
