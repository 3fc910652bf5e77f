#!/usr/bin/env bash
# One device session's whole GPU check, in one call: build the CUDA module, run the GPU test suite, the
# CUDA sanitizer on a sample of launches, and the benchmark. Everything it finds goes to $OUT
# (at most 8 files come back from a device call: keep it that way).
#
#   OUT=/some/dir bash bench/gpu_session.sh [test-seconds] [bench-seconds]
#
# The stages are time-boxed so that the call ends inside a 10-minute device command limit.
set -u
OUT=${OUT:-/tmp/hyperkernels-gpu}
TEST_S=${1:-240}
BENCH_S=${2:-200}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -1
  git rev-parse --short HEAD 2>/dev/null
} > "$OUT/environment.txt" 2>&1

# The image's python3 has torch, triton, pybind11, cmake, ninja: build in place, no downloads.
python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
  || echo "BUILD FAILED (see build.log)" >> "$OUT/environment.txt"

# Tests: one Triton config per kernel (autotuning hundreds of test shapes would cost more than the tests).
HYPERKERNELS_TRITON_AUTOTUNE=0 HYPERKERNELS_REQUIRE_CUDA_BUILD=1 timeout "$TEST_S" \
  python3 -m pytest tests -q -p no:cacheprovider --durations=15 -k "not sanitizer" > "$OUT/tests.log" 2>&1
echo "pytest exit $?" >> "$OUT/tests.log"

# compute-sanitizer works on the Firecracker machines only (TOOLCHAIN.md); the test skips elsewhere.
timeout 120 python3 -m pytest tests -q -p no:cacheprovider -k sanitizer -rs >> "$OUT/tests.log" 2>&1
echo "sanitizer pytest exit $?" >> "$OUT/tests.log"

# Benchmark with autotuning on: the numbers that get reported.
timeout "$BENCH_S" python3 bench/run.py --json "$OUT/bench.json" --plot "$OUT/bench.png" \
  > "$OUT/bench.md" 2> "$OUT/bench.err"
echo "bench exit $?" >> "$OUT/bench.err"
