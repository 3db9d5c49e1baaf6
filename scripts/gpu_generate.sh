#!/usr/bin/env bash
# The generation engine on the GPU machine: the CUDA build, the engine's tests on the GPU (the
# fixtures' greedy parity and log-prob checks through the CUDA decoder, and the kernel tests), and
# the generation benchmark. Logs go to $OUT when set.
source "$(dirname "$0")/gpu_env.sh"
t0=$(date +%s)
TARGETS="aligner aligner_tests generate_bench" bash scripts/build_cuda.sh >"$OUT/build.log" 2>&1 ||
  { grep -E "error" -A4 "$OUT/build.log" | head -60; tail -5 "$OUT/build.log"; exit 1; }
echo "build: $(($(date +%s) - t0)) s, $(grep -c 'warning:' "$OUT/build.log") warnings"
ALIGNER_TEST_DEVICE=cuda timeout 400 build-cuda/tests/aligner_tests --gtest_filter="${TESTS:-Generate*:Cuda*}" \
  >"$OUT/tests.log" 2>&1
grep -E "^\[  (FAILED|PASSED|SKIPPED) |Failure|Expected|Which is|actual|error|tests ran" "$OUT/tests.log" | head -40
if [ "${BENCH:-1}" = 1 ]; then python3 bench/generate_bench.py build-cuda 2>&1 | grep -v -E "Loading|Writing|it/s\]" | tail -14; fi
if [ "${PROFILE:-0}" = 1 ]; then timeout 300 python3 scripts/profile_decode.py build-cuda 2>&1 | grep -v -E "Loading|Writing"; fi
