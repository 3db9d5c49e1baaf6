#!/usr/bin/env bash
# RLHF on a CPU in a few minutes: from the 4.4M-parameter demo model, a pairwise reward model
# trained by `aligner rm` on real hh-rlhf preference pairs, then PPO on the prompts of those
# conversations (the actor generates from its live weights each step, the reward model scores the
# responses, the critic starts from the reward model). It prints the held-out prompts' mean reward
# and the KL to the reference (the starting model) before and after PPO. Responses run to their
# full 24 tokens (gen.ignore_eos): a reward model this small scores a bare EOS highly, and a policy
# free to stop at once learns to say nothing within a dozen steps.
set -euo pipefail
cd "$(dirname "$0")/.."
A=${ALIGNER:-build/aligner}
M=examples/models/tiny-llama
OUT=runs/demo-rlhf
mkdir -p $OUT
head -540 examples/data/hh-rlhf/harmless-test-600.jsonl >$OUT/pairs.jsonl
# PPO's prompts: each conversation up to its last "Assistant:" turn, in NeMo-Aligner's {"text"} layout;
# the first 540 to train on, the last 60 held out.
python3 - examples/data/hh-rlhf/harmless-test-600.jsonl $OUT <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def prompt(r):
    text = r["chosen"]
    return text[:text.rindex("\n\nAssistant:") + len("\n\nAssistant:")]
for name, part in (("train", rows[:540]), ("heldout", rows[540:])):
    with open(f"{sys.argv[2]}/prompts-{name}.jsonl", "w") as f:
        for r in part:
            f.write(json.dumps({"text": prompt(r)}) + "\n")
PY

echo "== reward model: Bradley-Terry on 540 hh-rlhf pairs"
$A rm model.path=$M model.device=cpu data.train=$OUT/pairs.jsonl data.skip_bad_lines=true data.max_length=128 \
  trainer.micro_batch_size=16 trainer.global_batch_size=16 trainer.log_interval=10 optim.lr=3e-4 \
  optim.scheduler=constant trainer.seed=1 resume=false overwrite=true output_dir=$OUT/rm 2>&1 |
  grep -E "\] step [0-9]+" || true

echo "== PPO: actor from $M, critic from the reward model, reward model in this process"
$A ppo actor.path=$M reward.model=$OUT/rm/final model.device=cpu \
  data.train=$OUT/prompts-train.jsonl data.validation=$OUT/prompts-heldout.jsonl data.max_length=96 \
  rollout.prompts_per_step=16 rollout.samples_per_prompt=2 rollout.max_new_tokens=24 \
  gen.temperature=1.0 gen.ignore_eos=true ppo.epochs=2 ppo.minibatches=2 ppo.kl_coef=0.05 \
  ppo.mask_unfinished=false actor.optim.lr=5e-5 critic.optim.lr=3e-4 trainer.micro_batch_size=8 \
  trainer.max_steps=30 trainer.val_interval=10 trainer.log_interval=5 trainer.seed=1 resume=false overwrite=true \
  output_dir=$OUT/ppo 2>&1 | grep -E "\] step [0-9]+|validation|wrote" || true

python3 - $OUT/ppo/metrics.jsonl <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for r in rows:
    if r["split"] == "validation":
        print("  step %3d: held-out mean reward %+.3f, KL to the reference %.3f, response length %.1f"
              % (r["step"], r["reward"], r["kl"], r["response_length"]))
train = [r for r in rows if r["split"] == "train"]
t = train[-1]
print("  last step: %.2f s (generation %.2f s, reference+critic+reward %.2f s, updates %.2f s), %.0f generated tok/s"
      % (t["step_seconds"], t["time_generation"], t["time_inference"], t["update_seconds"], t["gen_tokens_per_s"]))
PY
echo "  the trained actor and critic: $OUT/ppo/final/actor, $OUT/ppo/final/critic"
