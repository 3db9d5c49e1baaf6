#!/usr/bin/env bash
# Builds the library, the CLI and the test suite with AddressSanitizer and UndefinedBehaviorSanitizer
# (clang, -O1, in build-asan; scripts/fuzz.sh fuzzes the same build) and runs the test suite under
# them: any sanitizer report fails the test that triggers it (or the process, for a leak found at
# exit). The last line is "N passed, N failed".
#
# Which tests: all but those named in scripts/sanitize_skip.txt, the end-to-end runs that take more
# than 8 s each under the sanitizers. Those spend their time in libtorch, which is not instrumented
# (every one of its allocations still goes through ASan's allocator), and together they would take
# ~45 minutes on two cores, more than CI has; the code of ours they run is run here by the unit
# tests of each part and the short runs of each command. SANITIZE_FILTER (a gtest filter) runs
# those instead, SANITIZE_FILTER='*' everything; each shard's JSON report
# (build-asan/sanitize-logs/shard-N.json) holds every test's time.
#
# The tests run in one gtest process per core rather than ctest's one per test: under ASan each start
# costs a second (libtorch's start-up), which over the ~500 tests would be most of the time.
# Sharding by name, not by GTEST_TOTAL_SHARDS: the multi-rank tests start the test binary again as
# their workers, which would inherit the shard variables and select no test.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/sanitizer_env.sh

configure_asan_build
ninja -C build-asan -j"$cores" aligner aligner_tests

tests=build-asan/tests/aligner_tests
# "Suite." lines, then "  Test" lines (parameterised ones followed by "  # GetParam() = ...").
filter=${SANITIZE_FILTER:-*-$(grep -v '^#' scripts/sanitize_skip.txt | paste -sd:)}
mapfile -t names < <($tests --gtest_filter="$filter" --gtest_list_tests |
  awk '/^[^ ]/ { suite = $1 } /^  / { print suite $1 }')
shards=$cores
groups=()
for i in "${!names[@]}"; do
  groups[i % shards]+="${names[i]}:"
done

mkdir -p build-asan/sanitize-logs
pids=()
for ((i = 0; i < ${#groups[@]}; ++i)); do
  # A hung test must not hold CI until its own time limit.
  rm -f build-asan/sanitize-logs/shard-$i.json
  timeout 900 $tests --gtest_filter="${groups[i]%:}" --gtest_output=json:build-asan/sanitize-logs/shard-$i.json \
    >build-asan/sanitize-logs/shard-$i.log 2>&1 &
  pids+=($!)
done
passed=0 failed=0
for ((i = 0; i < ${#pids[@]}; ++i)); do
  log=build-asan/sanitize-logs/shard-$i.log
  code=0
  wait "${pids[i]}" || code=$?
  # The JSON report counts this process's tests only; the log also holds what the multi-rank tests'
  # workers print, but it is all there is when a sanitizer stopped the process.
  if [ -f build-asan/sanitize-logs/shard-$i.json ]; then
    read -r ran ok < <(python3 -c 'import json, sys; r = json.load(open(sys.argv[1]))
print(r["tests"], r["tests"] - r["failures"])' build-asan/sanitize-logs/shard-$i.json)
  else
    ok=$(grep -c '^\[       OK \]' "$log" || true)
    ran=$(grep -c '^\[ RUN      \]' "$log" || true)
  fi
  passed=$((passed + ok))
  failed=$((failed + ran - ok))
  if ((code != 0)); then
    echo "sanitizer tests, shard $i: FAILED with status $code (whole log: $log)"
    grep -E '^\[  FAILED  \] [A-Za-z]' "$log" | sort -u || true
    # The sanitizer's report, if any, from its first line.
    sed -n '/^==[0-9]*==ERROR\|runtime error/,$p' "$log" | head -n 100
    # A report after the last test (a leak at exit) fails no test, only the process.
    ((ran > ok)) || failed=$((failed + 1))
  fi
done
echo "$passed passed, $failed failed"
((failed == 0))
