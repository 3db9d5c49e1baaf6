#!/usr/bin/env bash
# Benchmarks on the GPU machine (after or including the CUDA build): each prints a table comparing
# aligner with transformers in the same run. BENCHES picks which (default: all).
set -uo pipefail
cd "$(dirname "$0")/.."
export LD_LIBRARY_PATH="$PWD/.deps/root/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
export PYTHONUNBUFFERED=1
bash scripts/build_cuda.sh >/tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
for b in ${BENCHES:-forward sft generate}; do
  python3 bench/${b}_bench.py build-cuda 2>&1 | grep -v -E "Loading|Writing|it/s\]" | tail -8
done
