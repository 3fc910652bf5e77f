"""The float32 precision rule of the GPU backends (hyperkernels/backends/_precision.py): TF32 exactly when torch's own
CUDA matmuls may use it, read from whichever of torch's two APIs set it."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _seen_in_a_fresh_process(steps: str) -> list:
    """tf32_allowed() after each step; a fresh process because once the new API is used, torch's legacy getter
    raises for good."""
    code = (
        "import torch\n"
        "from hyperkernels.backends._precision import tf32_allowed\n"
        "m = torch.backends.cuda.matmul\n"
        "seen = [tf32_allowed()]\n"
        + "".join(f"{step}; seen.append(tf32_allowed())\n" for step in steps.split("\n") if step)
        + "print(seen)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return eval(out.stdout.strip().splitlines()[-1])  # a printed list of bools


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"),
                    reason="this torch has only the legacy TF32 flag (fp32_precision came with torch 2.9)")
def test_tf32_allowed_follows_both_torch_apis():
    steps = ("m.allow_tf32 = True\nm.allow_tf32 = False\nm.fp32_precision = 'tf32'\nm.fp32_precision = 'ieee'\n")
    assert _seen_in_a_fresh_process(steps) == [False, True, False, True, False]


@pytest.mark.skipif(not hasattr(torch.backends, "fp32_precision"),
                    reason="this torch has no global fp32_precision (it came with torch 2.9)")
def test_tf32_allowed_defers_to_the_global_setting_when_matmuls_say_none():
    steps = "torch.backends.fp32_precision = 'tf32'\nm.fp32_precision = 'ieee'\nm.fp32_precision = 'none'\n"
    assert _seen_in_a_fresh_process(steps) == [False, True, False, True]
