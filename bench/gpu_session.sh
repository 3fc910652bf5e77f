#!/usr/bin/env bash
# A first GPU check in one command of at most 10 minutes, built so that it cannot come back empty:
#
#   OUT=/some/dir bash bench/gpu_session.sh    # PYTHON defaults to python3: on the device image that is
#                                              # /opt/torch/.venv/bin/python3 (torch, triton, pybind11, xdist)
#
# Stages, in this order, each with its own budget in seconds (the table below; HK_BUDGET_<STAGE> overrides):
#   env     GPU (nvidia-smi), driver, Python, torch, triton, numpy, nvcc, Python.h, pybind11, setuptools, ...
#   build   the CUDA module for this GPU's architecture only (setup.py build_ext --inplace: no network)
#   smoke   bench/gpu_smoke.py: one case per kernel path against the float64 torch backend
#   tests   the test suite on the GPU, Triton and CUDA files first, in parallel (pytest -n); without
#           test_distributed.py, test_examples.py, test_gpu_compile.py, this script's dry run, the sanitizer
#   bench   bench/run.py --json --plot (its JSON is rewritten as cases finish); Triton autotuning off unless
#           HK_BENCH_AUTOTUNE=1 (see stage_bench)
#   report  the benchmark's table and plot from its JSON if the run was cut short; a digest in session.log
# Stage i must end by start + the sum of the budgets of stages 1..i: a stage also gets the time the ones before
# it left unused, never time of the ones after it, and the whole run ends within the sum (<= 540 s, inside a
# 600-s remote command). At its limit a stage's main process gets SIGINT (pytest then prints its summary, the
# smoke its tally); a few seconds later its whole process group is killed. Each stage runs whatever the one
# before it did (failed, timed out, was skipped). Everything is written to $OUT as it is produced, at most 8
# files (all a remote run may bring back): session.log (environment, one line per stage start and end, digest),
# build.log, smoke.log, tests.log, bench.log, bench.json, bench.png.
# Without a CUDA GPU (CI's dry run, tests/bench/test_gpu_session.py) the smoke runs under the Triton interpreter and
# the GPU stages are skipped with a line that says so. HK_STAGES="env smoke" runs a subset.
# compute-sanitizer gets its own call: bench/gpu_memcheck.sh (this script's "memcheck" profile).
set -u
SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$SELF")/.."
ROOT=$PWD
OUT=${OUT:-/tmp/hyperkernels-gpu}
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
TRITON_CACHE=${TRITON_CACHE_DIR:-$HOME/.triton/cache}

# Budgets in seconds (HK_BUDGET_<STAGE> overrides one), and the stages of each profile: "session" (this
# script's default) and "memcheck" (bench/gpu_memcheck.sh). `gpu_session.sh --budgets` prints a profile's.
declare -A BUDGET=(
  [env]=${HK_BUDGET_ENV:-20} [build]=${HK_BUDGET_BUILD:-90} [report]=${HK_BUDGET_REPORT:-20}
  [smoke]=${HK_BUDGET_SMOKE:-90} [tests]=${HK_BUDGET_TESTS:-220} [bench]=${HK_BUDGET_BENCH:-100}
  [memcheck_cuda]=${HK_BUDGET_MEMCHECK_CUDA:-120} [memcheck_triton]=${HK_BUDGET_MEMCHECK_TRITON:-200}
  [racecheck_cuda]=${HK_BUDGET_RACECHECK_CUDA:-90}
)
PROFILE=${HK_PROFILE:-session}
case "$PROFILE" in
  session) PROFILE_STAGES="env build smoke tests bench report" ;;
  memcheck) PROFILE_STAGES="env build memcheck_cuda memcheck_triton racecheck_cuda report" ;;
  *) echo "HK_PROFILE: expected session or memcheck, got $PROFILE" >&2; exit 2 ;;
esac
GPU_STAGES=" build tests bench memcheck_cuda memcheck_triton racecheck_cuda "
STAGES=${HK_STAGES:-$PROFILE_STAGES}
GRACE=${HK_GRACE:-15}   # SIGINT to KILL (at most a quarter of a stage's budget): pytest -n needs a few
                        # seconds to stop its workers and print its summary
STATE=${HK_STATE:-}     # where the env stage leaves the GPU's compute capability for the others

log() { echo "$*" >> "$OUT/session.log"; echo "$*"; }

# -- stage bodies (run as `gpu_session.sh --stage NAME`; the long ones exec their command, so that the
# SIGINT reaches it and not this shell) ----------------------------------------------------------------

stage_env() {
  exec >> "$OUT/session.log" 2>&1
  echo "environment:"
  echo "  date         $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "  host         $(uname -srm), $(nproc) cores, $(free -g 2>/dev/null | awk '/^Mem:/ {print $2 " GiB"}')"
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,compute_cap --format=csv,noheader \
      2>&1 | sed 's/^/  gpu          /'
  else
    echo "  gpu          nvidia-smi not found"
  fi
  local nvcc; nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
  if [ -x "$nvcc" ]; then
    echo "  nvcc         $nvcc: $("$nvcc" --version | tail -1)"
  else
    echo "  nvcc         not found"
  fi
  local tool
  for tool in cmake ninja; do
    if command -v "$tool" > /dev/null; then
      echo "  $tool$(printf '%*s' $((13 - ${#tool})) '')$("$tool" --version 2>&1 | head -1)"
    else
      echo "  $tool$(printf '%*s' $((13 - ${#tool})) '')not on PATH"
    fi
  done
  echo "  sanitizer    $(command -v compute-sanitizer || echo 'compute-sanitizer not on PATH')"
  echo "  commit       $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo 'no git here')"
  "$PYTHON" - "$STATE" <<'EOF'
import os, sys, sysconfig

def item(name, fn):
    try:
        print(f"  {name:12s} {fn()}", flush=True)
    except Exception as exc:  # each line on its own: one missing piece must not hide the others
        print(f"  {name:12s} MISSING: {type(exc).__name__}: {exc}", flush=True)

def version(dist):  # the installed version, without the seconds an import of matplotlib or triton takes
    from importlib.metadata import version
    return lambda: version(dist)

def python_h():
    path = os.path.join(sysconfig.get_paths()["include"], "Python.h")
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    return path

def pybind11():
    import pybind11
    return f"{pybind11.__version__}, cmake dir {pybind11.get_cmake_dir()}"

def torch_line():
    import torch
    line = f"{torch.__version__}, CUDA {torch.version.cuda}, GPU seen: {torch.cuda.is_available()}"
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        line += f" ({torch.cuda.get_device_name()}, capability {major}.{minor}, {torch.cuda.device_count()} device(s))"
        if sys.argv[1]:
            with open(os.path.join(sys.argv[1], "capability"), "w") as f:
                f.write(f"{major}{minor}\n")
    return line

item("python", lambda: f"{sys.version.split()[0]} at {sys.executable}")
item("Python.h", python_h)
item("torch", torch_line)
for dist in ("triton", "numpy", "setuptools", "pytest", "pytest-xdist", "matplotlib", "cmake", "ninja"):
    item(dist, version(dist))
item("pybind11", pybind11)
EOF
}

stage_build() {
  exec >> "$OUT/build.log" 2>&1
  local arch; arch=$(cat "$STATE/capability")
  echo "HYPERKERNELS_CUDA_ARCH=$arch $PYTHON setup.py build_ext --inplace"
  # build_ext --inplace needs neither network nor an install: the module lands in hyperkernels/, which
  # PYTHONPATH puts first.
  HYPERKERNELS_CUDA_ARCH=$arch CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$PYTHON" setup.py build_ext --inplace || exit
  "$PYTHON" -c "
import hyperkernels._cuda as ext
from hyperkernels.backends.cuda import unavailable_reason
print('built', ext.__file__, 'for', ext.CUDA_ARCHS, '; cuda backend:', unavailable_reason() or 'available')
raise SystemExit(unavailable_reason() is not None)"
}

stage_smoke() {
  exec > "$OUT/smoke.log" 2>&1
  # One config per Triton kernel, as in the tests (which then find the smoke's compiles in the cache).
  local jobs=${HK_SMOKE_JOBS:-}
  [ -n "$jobs" ] || { [ -s "$STATE/capability" ] && jobs=8 || jobs=0; }
  HYPERKERNELS_TRITON_AUTOTUNE=0 exec "$PYTHON" bench/gpu_smoke.py --jobs "$jobs"
}

stage_tests() {
  exec > "$OUT/tests.log" 2>&1
  local files=() f
  # Triton and CUDA files first (the GPU's own paths), then the rest of the tree.
  for f in tests/backends/triton/test_*.py tests/backends/cuda/test_*.py; do files+=("$f"); done
  for f in $(find tests -name 'test_*.py' | sort); do
    case " ${files[*]} " in *" $f "*) continue ;; esac
    # Not here: the multi-process and example runs, this script's own dry run, and
    # the offline compile check (CI's: it compiles for sm_80 and sm_90 on the CPUs the tests need).
    case "$f" in
      tests/ops/test_distributed.py|tests/docs/test_examples.py|tests/bench/test_gpu_session.py) continue ;;
      tests/backends/triton/test_gpu_compile.py) continue ;;
    esac
    files+=("$f")
  done
  local parallel=()
  if "$PYTHON" -c "import xdist" 2> /dev/null; then
    parallel=(-n "${HK_TEST_WORKERS:-$(nproc)}" --dist load)
  else
    echo "pytest-xdist is not installed: the tests run in one process"
  fi
  # Autotuning would benchmark up to 8 configs at each of hundreds of shapes; -o addopts= drops pytest.ini's
  # -ra, whose list of skips (every CPU-interpreter parametrisation) would bury the failures.
  HYPERKERNELS_TRITON_AUTOTUNE=0 HYPERKERNELS_REQUIRE_CUDA_BUILD=1 exec "$PYTHON" -m pytest "${parallel[@]}" \
    -o addopts= -p no:cacheprovider -v -rfE --durations=30 \
    --deselect tests/backends/cuda/test_cuda_gpu.py::test_compute_sanitizer "${files[@]}"
}

stage_bench() {
  exec > "$OUT/bench.log" 2>&1
  # Autotuning off by default: with it every Triton kernel of every case compiles all its kept configs (up to
  # 8 each, ~130 compiles for the GPU cases), in one process, and the stage would end after a few cases. The
  # first call wants every row; a later call tunes (HK_BENCH_AUTOTUNE=1). HK_BENCH_ARGS: e.g. "--cases MLP".
  local autotune=${HK_BENCH_AUTOTUNE:-0}
  if [ "$autotune" = 0 ]; then
    echo "bench: HYPERKERNELS_TRITON_AUTOTUNE=0: the first config the pruning keeps, not tuned"
  else
    echo "bench: HYPERKERNELS_TRITON_AUTOTUNE=$autotune: tuned"
  fi
  # shellcheck disable=SC2086
  HYPERKERNELS_TRITON_AUTOTUNE=$autotune exec "$PYTHON" bench/run.py --json "$OUT/bench.json" \
    --plot "$OUT/bench.png" ${HK_BENCH_ARGS:-}
}

stage_report() {
  # The digest first: the plot, which needs matplotlib, is the part a short budget may cut.
  {
    echo "digest:"
    if [ -f "$OUT/build.log" ]; then tail -1 "$OUT/build.log" | sed 's/^/  build: /'; fi
    if [ -f "$OUT/smoke.log" ]; then grep -E '^smoke: |  FAIL' "$OUT/smoke.log" | sed 's/^/  /'; fi
    if [ -f "$OUT/tests.log" ]; then
      grep -E '^(FAILED|ERROR) |^=+ .*(passed|failed|error|no tests).* =+$' "$OUT/tests.log" | tail -40 \
        | sed 's/^/  tests: /'
    fi
    if [ -f "$OUT/bench.json" ]; then
      "$PYTHON" -c "import json, sys; print('  bench:', len(json.load(open(sys.argv[1])).get('rows', [])), \
'rows in bench.json')" "$OUT/bench.json"
    fi
    for f in memcheck_cuda memcheck_triton racecheck_cuda; do
      if [ -f "$OUT/$f.log" ]; then
        grep -E 'ERROR SUMMARY|^sanitize_cuda: done|^smoke: [0-9]|^skipped:|worker .* exited' "$OUT/$f.log" \
          | sed "s/^/  $f: /"
      fi
    done
  } >> "$OUT/session.log" 2>&1
  if [ -s "$OUT/bench.json" ] && [ ! -s "$OUT/bench.png" ]; then
    "$PYTHON" - "$OUT/bench.json" "$OUT/bench.png" >> "$OUT/bench.log" 2>&1 <<'EOF'
import json, sys
sys.path.insert(0, "bench")
import run
result = json.load(open(sys.argv[1]))
print("\nThe run ended early; its table and plot, from the rows it had written to bench.json:")
print(run.format_table(result))
run.plot(result, sys.argv[2])
EOF
  fi
}

# compute-sanitizer (the memcheck profile). Without the caching allocator every tensor is its own cudaMalloc,
# so an access past a tensor's end is out of bounds instead of inside a cached segment.
sanitizer() {  # TOOL CMD...
  local tool=$1; shift
  local cs; cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  [ -x "$cs" ] || { echo "compute-sanitizer not found (PATH, /usr/local/cuda/bin)"; exit 1; }
  echo "$cs --tool $tool --error-exitcode 86 $*"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 exec "$cs" --tool "$tool" --error-exitcode 86 "$@"
}
sanitizer_refused() {  # the first sanitizer stage's program never started: the others would not either
  if [ -f "$OUT/memcheck_cuda.log" ] && ! grep -q "sanitize_cuda: start" "$OUT/memcheck_cuda.log"; then
    echo "skipped: compute-sanitizer did not let the program of memcheck_cuda start (see memcheck_cuda.log;"
    echo "on the gVisor runtime it answers 'Device not supported')"
    return 0
  fi
  return 1
}
stage_memcheck_cuda() {
  exec > "$OUT/memcheck_cuda.log" 2>&1
  sanitizer memcheck "$PYTHON" tests/gpu/sanitize_cuda.py
}
stage_memcheck_triton() {
  exec > "$OUT/memcheck_triton.log" 2>&1
  sanitizer_refused && exit 0
  # Workers compile in parallel; the sanitizer follows them (--target-processes all, its default).
  HYPERKERNELS_TRITON_AUTOTUNE=0 sanitizer memcheck "$PYTHON" bench/gpu_smoke.py --backend triton \
    --jobs "${HK_SMOKE_JOBS:-8}"
}
stage_racecheck_cuda() {
  exec > "$OUT/racecheck_cuda.log" 2>&1
  sanitizer_refused && exit 0
  sanitizer racecheck "$PYTHON" tests/gpu/sanitize_cuda.py
}

if [ "${1:-}" = "--stage" ]; then
  "stage_$2" < /dev/null
  exit
fi
if [ "${1:-}" = "--budgets" ]; then  # this profile's stages and budgets, one "stage seconds" a line
  for stage in $PROFILE_STAGES; do echo "$stage ${BUDGET[$stage]}"; done
  exit
fi

# -- the run ----------------------------------------------------------------------------------------------

mkdir -p "$OUT"
for stage in $STAGES; do  # a local re-run must not show an earlier run's results as its own
  case "$stage" in
    bench) rm -f "$OUT/bench.log" "$OUT/bench.json" "$OUT/bench.png" ;;
    env|report) ;;
    *) rm -f "$OUT/$stage.log" ;;
  esac
done
: > "$OUT/session.log"
if [ -z "$STATE" ]; then
  STATE=$(mktemp -d)
  trap 'rm -rf "$STATE"' EXIT
fi
export HK_STATE=$STATE OUT PYTHON
START=$(date +%s)
DEADLINE=$START
TOTAL=0
for stage in $STAGES; do TOTAL=$((TOTAL + ${BUDGET[$stage]:-0})); done
log "session: $(date -u +%Y-%m-%dT%H:%M:%SZ), profile $PROFILE; budgets (s):" \
    "$(for stage in $STAGES; do printf '%s %s, ' "$stage" "${BUDGET[$stage]:-?}"; done)total $TOTAL;" \
    "OUT=$OUT; PYTHON=$PYTHON"

compiles() { find "$TRITON_CACHE" -name '*.cubin' 2> /dev/null | wc -l; }

gpu_skip_reason() {
  [ -s "$STATE/capability" ] && return 1
  if command -v nvidia-smi > /dev/null && nvidia-smi -L > /dev/null 2>&1; then
    echo "nvidia-smi lists a GPU but torch does not see it (or the env stage did not finish): see session.log"
  else
    echo "no CUDA GPU here (torch.cuda.is_available() is False); CI runs the CPU suite (make test)"
  fi
}

run_stage() {  # NAME BUDGET: run the stage under its deadline, log its start and end
  local name=$1 budget=$2 now limit begin before rc verdict reason grace
  DEADLINE=$((DEADLINE + budget))
  grace=$((budget / 4 < GRACE ? budget / 4 : GRACE))
  now=$(date +%s)
  if [[ "$GPU_STAGES" == *" $name "* ]] && reason=$(gpu_skip_reason); then
    log "stage $(printf '%-7s' "$name") SKIP: $reason"
    return
  fi
  limit=$((DEADLINE - now - grace))
  if [ "$limit" -lt 1 ]; then
    log "stage $(printf '%-7s' "$name") SKIP: no time left of its budget ($budget s) after the stages before it"
    return
  fi
  before=$(compiles)
  log "stage $(printf '%-7s' "$name") start at +$((now - START)) s, budget $budget s, limit $limit s"
  begin=$(date +%s)
  # Its own process group: SIGINT reaches the stage's main process alone (pytest, not each of its workers at
  # once), and whatever the stage leaves running is killed with the group before the next stage starts.
  set -m
  timeout --foreground -s INT -k "$((grace > 0 ? grace : 1))" "$limit" bash "$SELF" --stage "$name" < /dev/null &
  local pid=$!
  wait "$pid"
  rc=$?
  set +m
  kill -KILL -- "-$pid" 2> /dev/null
  case $rc in
    0) verdict="ok" ;;
    124) verdict="TIMEOUT: SIGINT at its limit; partial results kept" ;;
    137) verdict="KILLED: still running $grace s after SIGINT; partial results kept" ;;
    *) verdict="FAILED" ;;
  esac
  log "stage $(printf '%-7s' "$name") end after $(($(date +%s) - begin)) s: rc $rc $verdict;" \
      "Triton compiles +$(($(compiles) - before))"
}

for stage in $STAGES; do
  if [ -z "${BUDGET[$stage]:-}" ] || ! declare -F "stage_$stage" > /dev/null; then
    log "stage $stage: unknown (known: ${!BUDGET[*]})"
    continue
  fi
  run_stage "$stage" "${BUDGET[$stage]}"
done
log "session: end after $(($(date +%s) - START)) s; files in OUT: $(ls "$OUT" | tr '\n' ' ')"
