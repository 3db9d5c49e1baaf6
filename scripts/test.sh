#!/usr/bin/env bash
# Installs dependencies (if missing), builds everything and runs the test suite; then the tests
# again under AddressSanitizer and UndefinedBehaviorSanitizer (scripts/sanitize.sh) and each fuzz
# target for half a minute (scripts/fuzz.sh). ALIGNER_QUICK=1 skips those two locally; CI (CI=true)
# always runs them. The last line counts every test, sanitizer test and fuzz target; the status is
# non-zero if any failed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
# A new build folder is built with clang (installed for the sanitizer build): GCC reads its 320 MB
# precompiled libtorch headers in full for every file, clang only what the file uses, which takes
# the build from ~20 to ~9 minutes on two cores. A folder already configured keeps its compiler.
compiler=()
[ -f build/CMakeCache.txt ] || compiler=(-DCMAKE_CXX_COMPILER=clang++)
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo "${compiler[@]}" >/dev/null
ninja -C build -j"$(nproc)"
if [ "${ALIGNER_QUICK:-0}" = 1 ] && [ "${CI:-}" != true ]; then
  exec env OMP_NUM_THREADS=1 ctest --test-dir build --output-on-failure -j"$(nproc)"
fi

status=0
OMP_NUM_THREADS=1 ctest --test-dir build --output-on-failure -j"$(nproc)" | tee build/ctest.log || status=1
# "99% tests passed, 1 tests failed out of 272"
read -r failed total < <(sed -n 's/.* \([0-9]*\) tests failed out of \([0-9]*\)$/\1 \2/p' build/ctest.log) ||
  failed=1 total=1
passed=$((total - failed))

for step in sanitize fuzz; do
  start=$SECONDS
  bash scripts/$step.sh | tee build/$step.log || status=1
  echo "scripts/$step.sh: $((SECONDS - start)) s"
  counts=$(tail -n 1 build/$step.log | sed -n 's/^\([0-9]*\) passed, \([0-9]*\) failed$/\1 \2/p')
  # A step that stopped before counting (a build error) counts as one failure.
  read -r p f <<<"${counts:-0 1}"
  passed=$((passed + p))
  failed=$((failed + f))
done
echo "$passed passed, $failed failed"
exit $status
