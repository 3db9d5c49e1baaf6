#!/usr/bin/env bash
# The preference half of the demo, on the CPU in a minute or two per stage: from the
# 4.4M-parameter demo model, one epoch of a pairwise reward model and then one of DPO on real
# hh-rlhf preference pairs (540 to train on, the last 60 held out), each printing how often it
# ranks a held-out pair's chosen answer above the rejected one as it trains. Between the two, the
# reward model scores the held-out pairs with rm-score.
set -euo pipefail
cd "$(dirname "$0")/.."
A=${ALIGNER:-build/aligner}
M=examples/models/tiny-llama
OUT=runs/demo-preferences
mkdir -p $OUT
head -540 examples/data/hh-rlhf/harmless-test-600.jsonl >$OUT/train.jsonl
tail -60 examples/data/hh-rlhf/harmless-test-600.jsonl >$OUT/heldout.jsonl
# Two pairs of the data have an empty chosen answer: skipped and counted.
DATA="data.train=$OUT/train.jsonl data.validation=$OUT/heldout.jsonl data.skip_bad_lines=true data.max_length=128"
RUN="model.path=$M model.device=cpu trainer.micro_batch_size=16 trainer.global_batch_size=16 trainer.log_interval=5
  trainer.val_interval=10 optim.scheduler=constant trainer.seed=1 resume=false overwrite=true"

# Held-out accuracy per validation step, from a run's metrics.jsonl.
accuracy() {
  python3 -c '
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r["split"] == "validation":
        print("  step %3d: held-out accuracy %.3f, loss %.4f" % (r["step"], r["accuracy"], r["loss"]))
' "$1/metrics.jsonl"
}

echo "== reward model: Bradley-Terry on chosen/rejected pairs"
$A rm $RUN $DATA optim.lr=3e-4 output_dir=$OUT/rm 2>&1 | grep -E "\] step [0-9]+"
accuracy $OUT/rm

echo "== rm-score on the held-out pairs: how often the chosen one scores higher"
$A rm-score --model $OUT/rm/final --data $OUT/heldout.jsonl --device cpu --batch-size 16 \
  data.skip_bad_lines=true data.max_length=128 >$OUT/scores.jsonl
head -2 $OUT/scores.jsonl
python3 -c '
import json, sys
s = json.loads(open(sys.argv[1]).readlines()[-1])
print("  chosen scored higher in %.0f of %d pairs (accuracy %.3f)" % (s["accuracy"] * s["pairs"], s["pairs"], s["accuracy"]))
' $OUT/scores.jsonl

# DPO's accuracy counts the pairs whose implicit reward beta log(pi/ref) is higher for the chosen
# answer; at step 0 the policy is the reference, every reward is 0 and none is higher.
echo "== DPO from the same model (reference log-probs computed once, before training)"
$A dpo $RUN $DATA optim.lr=3e-5 dpo.beta=0.1 output_dir=$OUT/dpo 2>&1 | grep -E "reference log-probs|\] step [0-9]+"
accuracy $OUT/dpo
