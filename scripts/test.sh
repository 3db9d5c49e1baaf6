#!/usr/bin/env bash
# Installs dependencies (if missing), builds everything and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
ninja -C build -j"$(nproc)"
OMP_NUM_THREADS=1 ctest --test-dir build --output-on-failure -j"$(nproc)"
