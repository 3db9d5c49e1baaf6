#!/usr/bin/env bash
# Downloads (does not install) the Debian packages that scripts/build_cuda.sh unpacks on the GPU
# machine, which cannot reach a package registry itself.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .deps/debs
cd .deps/debs
# httplib.h includes Brotli's headers (Debian builds it with Brotli support), which the GPU machine
# lacks; it has OpenSSL's and zlib's.
apt-get download libyaml-cpp-dev libyaml-cpp0.7 nlohmann-json3-dev libcli11-dev libfmt-dev libfmt9 \
  libpcre2-dev libpcre2-8-0 libgtest-dev libgmock-dev \
  libcpp-httplib-dev libcpp-httplib0.11 libbrotli1 libbrotli-dev
