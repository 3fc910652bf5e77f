#!/usr/bin/env bash
# compute-sanitizer memcheck of every kernel path, in a run of its own (the sanitizer multiplies run times, and
# on a machine without it the first GPU run would be spent on nothing):
#
#   OUT=/some/dir bash bench/gpu_memcheck.sh
#
# gpu_session.sh's "memcheck" profile: env and build as in the session, then
#   memcheck_cuda    memcheck of tests/gpu/sanitize_cuda.py: every csrc/ kernel path on small shapes
#   memcheck_triton  memcheck of bench/gpu_smoke.py --backend triton: every Triton kernel and mode
#   racecheck_cuda   racecheck of tests/gpu/sanitize_cuda.py: shared-memory hazards of the csrc/ kernels
#   report           a digest (each log's ERROR SUMMARY) in session.log
# with the budgets `HK_PROFILE=memcheck bash bench/gpu_session.sh --budgets` prints (over 300 s, at most 540 s).
# Files in $OUT: session.log, build.log, memcheck_cuda.log, memcheck_triton.log, racecheck_cuda.log.
# compute-sanitizer ran on the Firecracker machines and refused the device on gVisor ones ("Device not
# supported"): the stages after the first then stop at once with a line that says so.
HK_PROFILE=memcheck exec bash "$(dirname "$0")/gpu_session.sh" "$@"
