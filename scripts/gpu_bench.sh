#!/usr/bin/env bash
# Benchmarks on the GPU machine (after or including the CUDA build): each prints a table comparing
# aligner with transformers in the same run. BENCHES picks which (default: all).
source "$(dirname "$0")/gpu_env.sh"
bash scripts/build_cuda.sh >"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
for b in ${BENCHES:-forward sft dpo generate ppo grpo lora}; do
  python3 bench/${b}_bench.py build-cuda 2>&1 | grep -v -E "Loading|Writing|it/s\]" | tail -14
done
