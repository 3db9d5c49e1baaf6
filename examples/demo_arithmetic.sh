#!/usr/bin/env bash
# Online RL where the learning is visible, on a CPU in a few minutes: the 4.4M-parameter demo model
# is fine-tuned (SFT) on additions "A+B=" -> "A+B's sum" (examples/data/arithmetic, made by
# scripts/make_arithmetic_data.py) until it gets part of the held-out problems right; then, each
# from that SFT model, `aligner reinforce` (GRPO) and `aligner rs` (rejection sampling) learn from
# a verifiable reward alone: reward.rule=numeric, 1 when the response's number is the prompt line's
# "answer", else 0. Held-out accuracy is the validation reward: the 300 held-out problems decoded
# greedily, so it is their exact-match accuracy. Both RL runs see the same rollouts' worth of
# prompts: 100 steps x 32 prompts x 8 samples. The prompt text is the same in SFT and RL, and
# data.template=plain gives the model exactly its tokens in both.
set -euo pipefail
cd "$(dirname "$0")/.."
A=${ALIGNER:-build/aligner}
M=examples/models/tiny-llama
D=examples/data/arithmetic
OUT=runs/demo-arithmetic
mkdir -p $OUT
COMMON="model.device=cpu data.template=plain resume=false overwrite=true"
RL="$COMMON reward.rule=numeric data.train=$D/rl.jsonl data.validation=$D/heldout.jsonl
  rollout.prompts_per_step=32 rollout.samples_per_prompt=8 rollout.max_new_tokens=8 gen.temperature=1.0
  trainer.max_steps=100 trainer.val_interval=25 trainer.log_interval=25"
now() { date +%s.%N; }
took() { python3 -c "print(f'{$(now) - $1:.0f}')"; }
shown() { grep -E "$1" | sed 's/^\[[^]]*\] /  /' || true; }

echo "== SFT: $M on $(wc -l <$D/sft.jsonl) additions of $D/sft.jsonl (200 steps of 16)"
t=$(now)
$A sft model.path=$M data.train=$D/sft.jsonl data.max_length=32 trainer.max_steps=200 \
  trainer.micro_batch_size=16 trainer.global_batch_size=16 trainer.log_interval=50 optim.lr=1e-3 \
  optim.warmup_steps=10 optim.min_lr=1e-4 output_dir=$OUT/sft $COMMON 2>&1 | shown "step [0-9]+/" | sed -E 's/ lr=.*//'
T_SFT=$(took $t)

echo "== reinforce: GRPO from the SFT model, the reward a numeric check of the answer"
t=$(now)
$A reinforce model.path=$OUT/sft/final reinforce.advantage=grpo reinforce.kl_coef=0.01 optim.lr=2e-4 \
  trainer.micro_batch_size=64 output_dir=$OUT/reinforce $RL 2>&1 | shown "validation reward"
T_RL=$(took $t)

echo "== rs: rejection sampling from the SFT model: SFT on each prompt's best sample that is right"
t=$(now)
$A rs model.path=$OUT/sft/final rs.top_n=1 rs.min_reward=1 optim.lr=2e-4 optim.scheduler=constant \
  trainer.micro_batch_size=8 output_dir=$OUT/rs $RL 2>&1 | shown "validation reward"
T_RS=$(took $t)

python3 - $OUT $T_SFT $T_RL $T_RS <<'PY'
import json, sys
out, t_sft, t_rl, t_rs = sys.argv[1:]
def val(run):
    return [r for r in map(json.loads, open(f"{out}/{run}/metrics.jsonl")) if r["split"] == "validation"]
rl, rs = val("reinforce"), val("rs")
print()
print("held-out exact-match accuracy (300 problems, greedy), by step:")
for name, rows in (("reinforce", rl), ("rs", rs)):
    print(f"  {name:9s} " + "  ".join(f"{r['step']}: {r['reward']:.1%}" for r in rows))
print()
print("| model | held-out accuracy | wall time |")
print("|---|---|---|")
print(f"| SFT (200 steps) | {rl[0]['reward']:.1%} | {t_sft} s |")
print(f"| + reinforce (GRPO, 100 steps) | {rl[-1]['reward']:.1%} | {t_rl} s |")
print(f"| + rs (100 steps) | {rs[-1]['reward']:.1%} | {t_rs} s |")
PY
