#!/usr/bin/env bash
# Installs every system dependency of aligner from Debian's packages. Safe to run again.
# libopenblas0-pthread replaces the reference BLAS that libtorch-dev would otherwise load (10x
# slower matrix products on the CPU). clang, its sanitizer and libFuzzer runtimes (libclang-rt-14-dev)
# and llvm-symbolizer (llvm) build and report the sanitizer tests and fuzzers (scripts/sanitize.sh,
# scripts/fuzz.sh).
set -euo pipefail
pkgs=(
  build-essential cmake ninja-build pkg-config clang-format python3
  libtorch-dev libopenblas0-pthread libgloo-dev
  libyaml-cpp-dev nlohmann-json3-dev libcli11-dev libfmt-dev libspdlog-dev
  libpcre2-dev libcpp-httplib-dev
  libgtest-dev libgmock-dev
  clang libclang-rt-14-dev llvm
)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
