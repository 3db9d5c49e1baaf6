#!/usr/bin/env bash
# The online algorithms on the GPU, end to end on the demo model in bf16 (after scripts/build_cuda.sh):
# a reward model from two `aligner rm` steps, then ppo with the reference swapped in from host memory
# and both optimizers' state in host memory during generation, reinforce (grpo, two minibatches)
# and rs, three steps each. Prints each run's last metrics row (ratio_max must be 1: the old
# log-probs of the first update are its own forward pass).
source "$(dirname "$0")/gpu_env.sh"
A=build-cuda/aligner
M=examples/models/tiny-llama
W=$OUT/online
rm -rf "$W" && mkdir -p "$W"
head -64 examples/data/hh-rlhf/harmless-test-600.jsonl >"$W/pairs.jsonl"
python3 - examples/data/hh-rlhf/harmless-test-600.jsonl "$W/prompts.jsonl" <<'PY'
import json, sys
with open(sys.argv[2], "w") as f:
    for line in list(open(sys.argv[1]))[:64]:
        t = json.loads(line)["chosen"]
        f.write(json.dumps({"text": t[:t.rindex("\n\nAssistant:") + 12], "answer": "yes"}) + "\n")
PY
COMMON="model.device=cuda model.dtype=bfloat16 data.train=$W/prompts.jsonl data.max_length=96 trainer.max_steps=3"
$A rm model.path=$M model.device=cuda data.train=$W/pairs.jsonl data.max_length=128 trainer.max_steps=2 \
  trainer.micro_batch_size=8 trainer.global_batch_size=8 output_dir=$W/rm >"$W/rm.log" 2>&1 || tail -5 "$W/rm.log"
last() { python3 -c 'import json,sys; r=[json.loads(l) for l in open(sys.argv[1]) if "\"train\"" in l][-1]; print(sys.argv[2], {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items() if k in sys.argv[3].split(",")})' "$1/metrics.jsonl" "$2" "$3"; }
$A ppo actor.path=$M reward.model=$W/rm/final $COMMON rollout.prompts_per_step=16 rollout.samples_per_prompt=2 \
  rollout.max_new_tokens=32 ppo.minibatches=2 trainer.micro_batch_size=8 reference.offload=true \
  ppo.offload_optimizer_during_generation=true output_dir=$W/ppo >"$W/ppo.log" 2>&1 || tail -5 "$W/ppo.log"
last $W/ppo ppo ratio_max,reward_mean,kl,value_loss,peak_memory_gb,step_seconds
$A reinforce model.path=$M reward.rule=exact_match reward.format_pattern='(?s).+' reward.format_weight=0.5 \
  reward.model=$W/rm/final $COMMON rollout.prompts_per_step=8 rollout.samples_per_prompt=4 rollout.max_new_tokens=32 \
  reinforce.advantage=grpo reinforce.minibatches=2 trainer.micro_batch_size=8 output_dir=$W/grpo >"$W/grpo.log" 2>&1 ||
  tail -5 "$W/grpo.log"
last $W/grpo grpo reward_mean,kl,clip_fraction,approx_kl,step_seconds
$A rs model.path=$M reward.model=$W/rm/final $COMMON rollout.prompts_per_step=8 rollout.samples_per_prompt=4 \
  rollout.max_new_tokens=32 trainer.micro_batch_size=8 output_dir=$W/rs >"$W/rs.log" 2>&1 || tail -5 "$W/rs.log"
last $W/rs rs reward_mean,reward_kept_mean,loss,step_seconds
