#!/usr/bin/env bash
# Remakes examples/models/tiny-llama: a 4.4M-parameter Llama with the project's 6k BPE tokenizer,
# pretrained by aligner itself on the real text in ../shared. Needs a CUDA build (scripts/build_cuda.sh)
# and the corpus from scripts/make_pretrain_corpus.py (default: .deps/corpus).
set -euo pipefail
cd "$(dirname "$0")/.."
A=${ALIGNER:-build-cuda/aligner}
CORPUS=${CORPUS:-.deps/corpus}
RUN_DIR=${RUN_DIR:-runs/tiny-llama-pretrain}
$A init --config examples/models/tiny-llama.config.json --tokenizer tests/fixtures/tokenizers/llama3-style-bpe6k \
  --out runs/tiny-llama-init --overwrite --seed 1
$A sft --config examples/models/tiny-llama.pretrain.yaml model.path=runs/tiny-llama-init \
  data.train=$CORPUS/train.jsonl data.validation=$CORPUS/val.jsonl output_dir=$RUN_DIR
rm -rf examples/models/tiny-llama
cp -r $RUN_DIR/final examples/models/tiny-llama
