#!/usr/bin/env bash
# The demo: scores real token sequences with a small model folder from the test fixtures, and
# converts it to bf16 and back through the Hugging Face format. It grows with each algorithm.
set -euo pipefail
cd "$(dirname "$0")/.."
A=build/aligner
M=tests/fixtures/models/llama3
echo "== perplexity of $M (float32)"
$A perplexity --model $M --data $M/data.jsonl
echo "== the same model written as bfloat16, then scored in bfloat16"
$A convert --model $M --out runs/demo/llama3-bf16 --dtype bfloat16
$A perplexity --model runs/demo/llama3-bf16 --data $M/data.jsonl --dtype bfloat16 | tail -1
