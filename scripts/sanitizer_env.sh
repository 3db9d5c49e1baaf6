# shellcheck shell=bash disable=SC2034
# Sourced by scripts/sanitize.sh and scripts/fuzz.sh: the build-asan build and how its sanitizers
# report. Only our code is instrumented; libtorch and the other Debian libraries are not.
# check_initialization_order: our static registries must not read each other's globals.
# UBSan stops at the first report (-fno-sanitize-recover) and prints where it happened.
# Nothing needs suppressing: libtorch's static registries stay reachable at exit, so LeakSanitizer
# does not report them, and libstdc++'s containers carry no ASan annotations to mismatch.
export ASAN_OPTIONS=${ASAN_OPTIONS:-check_initialization_order=1:strict_init_order=1:detect_stack_use_after_return=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1}
# Counted before OMP_NUM_THREADS is set: nproc reports that instead of the cores when it is.
cores=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
export OMP_NUM_THREADS=1

# clang for libFuzzer; chosen once, when the folder is first configured.
configure_asan_build() {
  local compiler=()
  [ -f build-asan/CMakeCache.txt ] || compiler=(-DCMAKE_CXX_COMPILER=clang++)
  cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DALIGNER_FUZZ=ON "${compiler[@]}" >/dev/null
}
