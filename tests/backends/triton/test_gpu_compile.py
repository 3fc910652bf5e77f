"""The offline GPU compile check in CI (no GPU): the fixed CI subset of offline_compile.py (beside this file) compiles
every Triton kernel for sm_90 and sm_80 through its real launcher, and csrc/ through nvcc, within the limits a GPU
launch needs (shared memory, threads, grid, spills). ``make compile-check`` runs every case and rewrites
bench/results/gpu_resources.md.

The Triton compile runs in a subprocess: this process runs the kernels under the interpreter (conftest), and a
process can only be one or the other.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import offline_compile as oc
from offline_cases import backend_kernels

HERE = os.path.dirname(os.path.abspath(__file__))


def _kernels_in_backend() -> set:
    """Every kernel the Triton backend defines, found by walking its modules (not from the harness's cases), so
    that a new kernel the CI subset misses fails the test below."""
    return set(backend_kernels())


# Minutes of CPU compiling that a machine with a GPU spends better on the GPU tests, which compile the same kernels.
needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only check (the GPU tests compile for real)")


@pytest.fixture(scope="module")
def ci_results(tmp_path_factory):
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("compile") / "ci.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, os.path.join(HERE, "offline_compile.py"), "--set", "ci", "--jobs", "2",
                          "--no-csrc", "--json", str(out)], cwd=oc.ROOT, env=env, capture_output=True, text=True,
                         timeout=1800)
    if not out.exists():
        pytest.fail(f"the offline compile check did not finish (exit {res.returncode}):\n{res.stdout[-3000:]}\n"
                    f"{res.stderr[-3000:]}")
    return json.loads(out.read_text()), res


@needs_no_gpu
def test_ci_subset_compiles_within_the_limits(ci_results):
    results, res = ci_results
    assert not results["problems"], "\n".join(results["problems"])
    assert res.returncode == 0, res.stdout[-3000:]


@needs_no_gpu
def test_ci_subset_covers_every_kernel_on_both_archs(ci_results):
    results, _ = ci_results
    compiled = {(r["kernel"], r["arch"]) for r in results["records"]}
    wanted = {(k, a) for k in _kernels_in_backend() for a in oc.ARCHS}
    assert len(wanted) >= 2 * 12  # the walk found the kernels: 5 linear, 4 MLP, 3 hyper_linear
    assert wanted <= compiled, f"not compiled by the CI subset: {sorted(wanted - compiled)}"
    # Every launch's autotune-off pick is among what was compiled (the config every GPU test run uses).
    assert any(r["default"] for r in results["records"])


@needs_no_gpu
def test_csrc_has_no_spills_no_stack_and_little_static_smem():
    if oc.find_nvcc() is None:
        pytest.skip("nvcc not found (CUDACXX, PATH, /usr/local/cuda/bin)")
    kernels, problems, _ = oc.check_csrc()
    assert not problems, "\n".join(problems)
    assert {k["arch"] for k in kernels} == set(oc.ARCHS)


# -- the checker itself (pure Python: it must catch what it is there to catch) -----------------------------

_LOG_36 = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_fwd_gemm_kernel' for 'sm_90a'
ptxas info    : Function properties for _fwd_gemm_kernel
    56 bytes stack frame, 56 bytes spill stores, 52 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 56 bytes cumulative stack size
"""


def test_ptxas_log_parses_both_triton_versions():
    assert oc._parse_ptxas(_LOG_36) == dict(registers=255, stack=56, spill_stores=56, spill_loads=52)
    blackwell = _LOG_36.replace("ptxas info", "ptxas-blackwell info")  # triton 3.9 names its ptxas so
    assert oc._parse_ptxas(blackwell) == oc._parse_ptxas(_LOG_36)
    assert oc._parse_ptxas("nothing here") is None


def _record(**kw):
    r = dict(case="linear.gemm bf16 relu small", arch=90, kernel="linear._fwd_gemm_kernel", hash="h",
             config={"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}, default=True, grid=[10], shared=1024,
             threads=128, ptxas=dict(registers=100, stack=0, spill_stores=0, spill_loads=0), compile_s=1.0)
    r.update(kw)
    return r


@pytest.mark.parametrize("change, message", [
    (dict(), None),
    (dict(shared=oc.SMEM_LIMIT[90] + 1), "shared memory"),
    (dict(arch=80, shared=oc.SMEM_LIMIT[80] + 1), "shared memory"),
    (dict(threads=2048), "threads"),
    (dict(grid=[2**31]), "grid"),
    (dict(grid=[4, 2]), "grid"),
    (dict(ptxas=dict(registers=255, stack=8, spill_stores=8, spill_loads=8)), "autotune-off pick spills"),
    (dict(default=False, ptxas=dict(registers=255, stack=8, spill_stores=oc.SPILL_BUDGET + 4, spill_loads=8)),
     "kept config spills"),
    (dict(ptxas=None), "no ptxas log"),
])
def test_checker_flags_each_limit(change, message):
    problems = oc.check(dict(records=[_record(**change)], errors=[]))
    if message is None:
        assert problems == []
    else:
        assert len(problems) == 1 and message in problems[0], problems


def test_checker_allows_a_small_spill_in_a_kept_config_and_reports_failures():
    small = _record(default=False, ptxas=dict(registers=255, stack=8, spill_stores=oc.SPILL_BUDGET, spill_loads=8))
    assert oc.check(dict(records=[small], errors=[])) == []
    failed = oc.check(dict(records=[], errors=[dict(case="mlp.gemm fp32 relu w64 atomic", arch=80,
                                                    error="PTXASError: boom")]))
    assert len(failed) == 1 and "PTXASError" in failed[0]

