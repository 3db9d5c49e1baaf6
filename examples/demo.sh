#!/usr/bin/env bash
# The demo: a real end-to-end alignment on a CPU. The tiny model in examples/models (pretrained by
# aligner itself, scripts/make_demo_model.sh) answers three real prompts, is fine-tuned on real
# chat data (validation loss falls), and answers again. Later stages grow from here.
set -euo pipefail
cd "$(dirname "$0")/.."
A=build/aligner
M=examples/models/tiny-llama
GEN="data.template=llama3 gen.max_new_tokens=48 gen.temperature=0.7 gen.top_p=0.9 gen.seed=1"
show() {  # the "text" field of each completion, escapes and all
  sed -n 's/.*"text":"\(\([^"\\]\|\\.\)*\)".*/  > \1/p' "$1"
}
mkdir -p runs/demo
echo "== before: $M answers three prompts from the hh-rlhf validation split"
$A generate --model $M --data examples/data/demo/prompts.jsonl --out runs/demo/before.jsonl $GEN 2>/dev/null
show runs/demo/before.jsonl
echo "== SFT on hh-rlhf conversations in the Llama 3 chat format (examples/demo_sft.yaml)"
$A sft --config examples/demo_sft.yaml 2>&1 | grep -E "validation loss|wrote|warning|error"
echo "== after"
$A generate --model runs/demo/sft/final --data examples/data/demo/prompts.jsonl --out runs/demo/after.jsonl $GEN 2>/dev/null
show runs/demo/after.jsonl
if [ -f examples/demo_preferences.sh ]; then bash examples/demo_preferences.sh; fi
