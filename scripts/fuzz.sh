#!/usr/bin/env bash
# Builds the libFuzzer targets (fuzz/*.cpp) in build-asan, the ASan + UBSan build that
# scripts/sanitize.sh also uses, and runs each for FUZZ_SECONDS seconds (default 30), FUZZ_JOBS of
# them at a time (default: one per core). Usage: scripts/fuzz.sh [target ...] (default: all).
#
# Each target starts from its seeds in fuzz/corpus/<target> (small files made from tests/fixtures
# by fuzz/make_seeds.py), the inputs of past findings in fuzz/regressions/<target> and the fixture
# folders named below, and keeps what it learns in build-asan/fuzz-corpus/<target>, so that later
# local runs go deeper. A crash, a sanitizer report,
# an input that runs longer than 20 s or allocates more than 2 GB, or an exception other than
# aligner::Error is a finding: the script fails, prints the report and leaves the input in
# build-asan/fuzz-findings/<target>/ (replay it: build-asan/fuzz/fuzz_<target> FILE).
# The last line is "N passed, N failed", one count per target.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/sanitizer_env.sh

seconds=${FUZZ_SECONDS:-30}
jobs=${FUZZ_JOBS:-$cores}
build="build-asan"

configure_asan_build
all_targets=$(cd fuzz && ls *.cpp | sed 's/\.cpp$//')
targets=${*:-$all_targets}
ninja -C $build -j"$cores" $(for t in $targets; do echo fuzz/fuzz_$t; done)

# Longest input per target: room for the seeds, small enough to keep each run fast.
max_len() {
  case $1 in
    tokenizer_json | sentencepiece) echo 16384 ;;
    tokenizer_config) echo 8192 ;;
    *) echo 4096 ;;
  esac
}
# Seed folders beyond fuzz/corpus/<target>, read as they are: fixtures, and the inputs of findings
# already fixed, so that every run checks them again.
seed_dirs() {
  case $1 in
    config) echo configs ;;
    jinja) echo tests/fixtures/chat_templates ;;
  esac
  [ ! -d fuzz/regressions/$1 ] || echo fuzz/regressions/$1
}
dictionary() {
  case $1 in
    config) echo fuzz/dict/yaml.dict ;;
    jinja) echo fuzz/dict/jinja.dict ;;
    *) echo fuzz/dict/json.dict ;;
  esac
}

run_one() {
  local t=$1 log=$build/fuzz-logs/$1.log
  mkdir -p $build/fuzz-corpus/$t $build/fuzz-findings/$t $build/fuzz-logs
  # The first folder is where libFuzzer writes new inputs; the seed folders are only read.
  if $build/fuzz/fuzz_$t -max_total_time="$seconds" -max_len="$(max_len $t)" -timeout=20 -rss_limit_mb=2048 \
    -dict="$(dictionary $t)" -print_funcs=0 -print_final_stats=1 -artifact_prefix=$build/fuzz-findings/$t/ \
    $build/fuzz-corpus/$t fuzz/corpus/$t $(seed_dirs $t) >"$log" 2>&1; then
    echo "fuzz_$t: $(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | grep -o '[0-9]*$') executions," \
      "$(ls $build/fuzz-corpus/$t | wc -l) inputs in its corpus, nothing found"
  else
    echo "fuzz_$t: FAILED (whole log: $log)"
    # The report: from the sanitizer's or libFuzzer's first line to the input that caused it.
    sed -n '/^==[0-9]*==\|runtime error\|^terminate called\|ERROR: libFuzzer/,$p' "$log" | head -n 100
    return 1
  fi
}

passed=0 failed=0 running=0
for t in $targets; do
  if ((running >= jobs)); then
    if wait -n; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
    running=$((running - 1))
  fi
  run_one "$t" &
  running=$((running + 1))
done
while ((running > 0)); do
  if wait -n; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
  running=$((running - 1))
done
echo "$passed passed, $failed failed"
((failed == 0))
