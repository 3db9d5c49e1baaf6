#!/usr/bin/env bash
# One GPU-machine session: build the CUDA target, run the whole test suite against it (generation
# tests on the GPU), check bf16 parity and Hugging Face round trips, check TensorBoard files with
# TensorBoard's own reader, and (with MAKE_DEMO=1) remake the demo model. Results go to $OUT when set.
source "$(dirname "$0")/gpu_env.sh"
bash scripts/build_cuda.sh >"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
echo "build: ok, $(grep -c 'warning:' "$OUT/build.log") warnings"
(cd build-cuda && ALIGNER_TEST_DEVICE=cuda ctest -j16 --timeout 600 >"$OUT/ctest.log" 2>&1); grep -E "tests passed|Failed|\*\*\*" "$OUT/ctest.log" | head -20
python3 scripts/gpu_check.py build-cuda 2>&1 | grep -v -E "Loading|Writing" | tail -14
rm -rf /tmp/tb && mkdir -p /tmp/tb && ALIGNER_TB_OUT=/tmp/tb build-cuda/tests/aligner_tests --gtest_filter='TensorBoard.*' >/dev/null 2>&1
python3 scripts/check_tensorboard.py /tmp/tb /tmp/tb/expected.json 2>&1 | tail -2
if [ "${MAKE_DEMO:-0}" = 1 ]; then
  t0=$(date +%s)
  bash scripts/make_demo_model.sh >"$OUT/demo.log" 2>&1 || tail -20 "$OUT/demo.log"
  grep -E "validation loss|wrote" "$OUT/demo.log" | tail -8
  echo "demo model: $(( $(date +%s) - t0 )) s"
  cp runs/tiny-llama-pretrain/metrics.jsonl "$OUT/demo_metrics.jsonl" 2>/dev/null
  tar czf "$OUT/tiny-llama.tgz" examples/models/tiny-llama 2>/dev/null
fi
