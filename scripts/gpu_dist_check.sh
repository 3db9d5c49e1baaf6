#!/usr/bin/env bash
# Two ranks on two GPUs (NCCL) through `aligner launch`, as CPU CI checks them on Gloo: SFT with
# packing on deliberately uneven shards ends together, and a run killed after a checkpoint resumes
# to the weights of the run never stopped. Prints one line per check.
source "$(dirname "$0")/gpu_env.sh"
A="$PWD/build-cuda/aligner"
D=/tmp/dist-check && rm -rf "$D" && mkdir -p "$D"
python3 - "$D/uneven.jsonl" <<'PY'
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(800):
        n = 60 if i % 2 == 0 else 2 + i % 5
        reply = " ".join(f"word{(i * 7 + w) % 13}" for w in range(n))
        f.write(json.dumps({"input": f"Question {i}?", "output": reply}) + "\n")
PY
ARGS="model.path=examples/models/tiny-llama model.device=cuda model.dtype=bfloat16 data.train=$D/uneven.jsonl
  data.packing=true data.shuffle=false data.max_length=128 trainer.micro_batch_size=2 trainer.global_batch_size=8
  trainer.max_steps=0 trainer.max_epochs=1 optim.lr=1e-3 optim.scheduler=constant trainer.save_interval=2
  trainer.keep_last=0"
run() { timeout -s KILL 300 "$A" launch --nproc-per-node 2 --master-port "$1" -- "$A" sft $ARGS output_dir="$2" "${@:3}"; }
run 29510 "$D/whole" > "$D/whole.log" 2>&1; echo "unbroken run: exit $?, $(grep -c '"train"' "$D/whole/metrics.jsonl") steps; $(grep -o 'every rank stops here' "$D/whole.log" | head -1)"
ALIGNER_KILL_AT_STEP=5 run 29520 "$D/killed" > "$D/killed.log" 2>&1; echo "killed run: exit $?, checkpoints: $(ls "$D/killed/checkpoints" | tr '\n' ' ')"
run 29530 "$D/killed" > "$D/resumed.log" 2>&1; echo "resumed run: exit $?, $(grep -o 'resuming from [^ ]*' "$D/resumed.log" | head -1)"
python3 - "$D/whole/final/model.safetensors" "$D/killed/final/model.safetensors" "$D/whole/metrics.jsonl" "$D/killed/metrics.jsonl" <<'PY'
import json, sys
from safetensors.torch import load_file
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
la = [json.loads(l)["loss"] for l in open(sys.argv[3]) if '"train"' in l]
lb = [json.loads(l)["loss"] for l in open(sys.argv[4]) if '"train"' in l]
print(f"resume on NCCL: max weight difference {diff}, {len(la)} vs {len(lb)} logged steps, losses equal: {la == lb}")
PY
