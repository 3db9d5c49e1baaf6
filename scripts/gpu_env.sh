# What every GPU-machine script starts with (sourced): the repo root as the working folder, the
# unpacked Debian libraries on the loader path, unbuffered Python, and $OUT for logs.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/aligner-gpu}
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$PWD/.deps/root/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
export PYTHONUNBUFFERED=1
