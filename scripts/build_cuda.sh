#!/usr/bin/env bash
# Builds aligner against the libtorch inside PyTorch 2.x (the GPU machine). That machine has no
# Debian dev packages and no network, so scripts/fetch_cuda_deps.sh (run where apt works) leaves
# the needed .debs in .deps/debs, which travel with the tree and are unpacked here.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build-cuda}
DEPS=$PWD/.deps/root
# Each .deb once, so that one added to .deps/debs later is unpacked too.
for f in .deps/debs/*.deb; do
  done_mark="$DEPS/.unpacked/$(basename "$f")"
  [ -e "$done_mark" ] && continue
  dpkg-deb -x "$f" "$DEPS"
  mkdir -p "$DEPS/.unpacked" && touch "$done_mark"
done
TORCH_PREFIX=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')
# The unpacked libraries (fmt, yaml-cpp, cpp-httplib and its Brotli) for the build's own runs (test
# discovery); scripts/gpu_env.sh puts them on the loader path for everything run afterwards.
export LD_LIBRARY_PATH="$DEPS/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$TORCH_PREFIX;$DEPS/usr" \
  -DCMAKE_CUDA_ARCHITECTURES=90 -DTORCH_CUDA_ARCH_LIST=9.0
ninja -C "$BUILD" ${TARGETS:-}
