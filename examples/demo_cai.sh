#!/usr/bin/env bash
# Constitutional AI on a CPU in a few minutes, every stage on the 4.4M-parameter demo model and the
# first human turns of hh-rlhf's harmless conversations as prompts:
#   1. SL-CAI data: the model answers 64 prompts, critiques each answer by a principle of
#      examples/cai/constitution.json (three few-shot exchanges from examples/cai/few_shot.jsonl
#      before it) and revises it: `aligner cai critique`;
#   2. SFT on the revisions;
#   3. RL-CAI data: the SFT model answers 64 other prompts at two temperatures and the demo model,
#      as judge, picks the better of each pair under a principle by the log-probabilities of (A)
#      and (B): `aligner cai compare`;
#   4. a reward model on those pairs (the judge's probability as each pair's margin), and
#   5. DPO from the SFT model on the same pairs.
# A model this small writes little sense; the demo shows the data and the chain, not the gains.
set -euo pipefail
cd "$(dirname "$0")/.."
A=${ALIGNER:-build/aligner}
M=examples/models/tiny-llama
OUT=runs/demo-cai
mkdir -p $OUT
# Each conversation's first human turn as a prompt line; the first 64 for the critiques, the next
# 64 for the comparisons.
python3 - examples/data/hh-rlhf/harmless-test-600.jsonl $OUT <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def first_turn(text):
    start = text.index("\n\nHuman:") + len("\n\nHuman:")
    return text[start:text.index("\n\nAssistant:", start)].strip()
for name, part in (("critique", rows[:64]), ("compare", rows[64:128])):
    with open(f"{sys.argv[2]}/prompts-{name}.jsonl", "w") as f:
        for r in part:
            f.write(json.dumps({"prompt": first_turn(r["chosen"])}) + "\n")
PY
GEN="--device cpu data.template=llama3 gen.max_new_tokens=40 gen.top_p=0.9 prompts_per_batch=32 overwrite=true"
RUN="model.device=cpu data.template=llama3 data.max_length=256 trainer.micro_batch_size=8 trainer.global_batch_size=8
  trainer.log_interval=4 optim.scheduler=constant trainer.seed=1 resume=false overwrite=true"

echo "== 1. critiques and revisions (aligner cai critique)"
$A cai critique --model $M --prompts $OUT/prompts-critique.jsonl --constitution examples/cai/constitution.json \
  --few-shot examples/cai/few_shot.jsonl --out $OUT/sl-cai.jsonl $GEN gen.temperature=0.7 2>&1 |
  grep -E "cai critique:|wrote|warning"
python3 - $OUT/sl-cai.jsonl <<'PY'
import json, sys
r = json.loads(open(sys.argv[1]).readline())
for name, text in (("prompt", r["conversations"][0]["value"]), ("principle", r["principle"]),
                   ("answer", r["response"]), ("critique", r["critique"]),
                   ("revision", r["conversations"][-1]["value"])):
    print("  %-10s %s" % (name + ":", " ".join(text.split())[:100]))
PY

echo "== 2. SFT on the revisions"
$A sft model.path=$M data.train=$OUT/sl-cai.jsonl $RUN trainer.max_epochs=2 optim.lr=3e-4 output_dir=$OUT/sft 2>&1 |
  grep -E "\] step [0-9]+|wrote"

echo "== 3. AI preference pairs (aligner cai compare), the demo model as judge"
$A cai compare --model $OUT/sft/final --judge $M --prompts $OUT/prompts-compare.jsonl \
  --constitution examples/cai/constitution.json --out $OUT/pairs.jsonl $GEN judge.template=llama3 \
  'gen.temperatures=[0.7,1.2]' 2>&1 | grep -E "cai compare:|wrote|warning"
python3 - $OUT/pairs.jsonl <<'PY'
import collections, json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
margins = [r["margin"] for r in rows]
print("  %d pairs, judge's probability of the chosen answer: mean %.3f, max %.3f" %
      (len(rows), sum(margins) / len(margins), max(margins)))
print("  principles:", dict(collections.Counter(r["principle"] for r in rows)))
print("  chosen answer shown as:", dict(collections.Counter(r["chosen_option"] for r in rows)))
PY

echo "== 4. reward model on the pairs (margin: the judge's probability)"
$A rm model.path=$OUT/sft/final data.train=$OUT/pairs.jsonl $RUN optim.lr=3e-4 output_dir=$OUT/rm 2>&1 |
  grep -E "\] step [0-9]+|wrote"

echo "== 5. DPO from the SFT model on the same pairs"
$A dpo model.path=$OUT/sft/final data.train=$OUT/pairs.jsonl $RUN optim.lr=3e-5 dpo.beta=0.1 output_dir=$OUT/dpo 2>&1 |
  grep -E "\] step [0-9]+|wrote"
echo "  the models: $OUT/sft/final (SL-CAI), $OUT/rm/final (reward model), $OUT/dpo/final (RL-CAI by DPO)"
