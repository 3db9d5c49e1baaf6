"""How long a checkpoint stalls training: `aligner sft` on a 1.1B Llama (bf16 weights, float32 master
weights and AdamW moments: a 15 GB checkpoint) on packed hh-rlhf chats, 8 x 2048 tokens a step,
checkpointing every 4 steps, written in place (trainer.async_checkpoint=false) or copied to host
memory and written by a thread of its own while training goes on (true).

Run on the GPU machine after scripts/build_cuda.sh:  python3 bench/checkpoint_bench.py [BUILD_DIR]
The script follows metrics.jsonl as it is written: the stall is the time between the rows of steps
4 and 9 (and 8 and 13) that no step accounts for, per checkpoint.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch
from tinyllama import add_tokenizer, hh_rlhf_file, make_model

STEPS, EVERY = 13, 4


def run(build, folder, data, async_checkpoint):
    out = tempfile.mkdtemp(prefix="checkpoint_bench_")
    metrics = os.path.join(out, "metrics.jsonl")
    cmd = [f"{build}/aligner", "sft", f"model.path={folder}", "model.device=cuda", "model.dtype=bfloat16",
           f"data.train={data}", "data.format=text", "data.packing=true", "data.max_length=2048",
           "trainer.micro_batch_size=8", "trainer.global_batch_size=8", f"trainer.max_steps={STEPS}",
           "trainer.max_epochs=100", "trainer.val_interval=0", f"trainer.save_interval={EVERY}", "trainer.keep_last=1",
           f"trainer.async_checkpoint={async_checkpoint}", "optim.lr=1e-5", "optim.warmup_steps=0", f"output_dir={out}"]
    seen, rows = 0, {}
    logfile = open(out + ".log", "w+")
    p = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT)
    while True:
        done = p.poll() is not None
        lines = open(metrics).readlines() if os.path.exists(metrics) else []
        for line in lines[seen:]:
            if not line.endswith("\n"):
                break
            r = json.loads(line)
            if r.get("split") == "train":
                rows[r["step"]] = (time.perf_counter(), r["step_seconds"])
            seen += 1
        if done:
            break
        time.sleep(0.02)
    logfile.seek(0)
    log = logfile.read()
    if p.wait() != 0:
        sys.exit(f"aligner sft failed:\n{log[-3000:]}")
    os.remove(out + ".log")
    shutil.rmtree(out, ignore_errors=True)
    stalls = []
    for first in range(EVERY, STEPS - EVERY + 1, EVERY):
        span = rows[first + EVERY][0] - rows[first][0]
        stalls.append(span - sum(rows[s][1] for s in range(first + 1, first + EVERY + 1)))
    step_s = sum(rows[s][1] for s in range(2, STEPS + 1)) / (STEPS - 1)
    return sum(stalls) / len(stalls), step_s


def main():
    build = next((a for a in sys.argv[1:] if not a.startswith("--")), "build-cuda")
    model, folder = make_model(torch.bfloat16)
    del model
    torch.cuda.empty_cache()
    add_tokenizer(folder)
    data = os.path.join(folder, "hh.jsonl")
    hh_rlhf_file(data, sft=True)
    results = [(mode, *run(build, folder, data, mode)) for mode in ("false", "true")]
    print(f"\nCheckpoint every {EVERY} steps, `aligner sft` 1.1B bf16 (float32 master weights and moments), "
          f"{torch.cuda.get_device_name()}")
    print("| trainer.async_checkpoint | training stalled per checkpoint (s) | mean step (ms) |")
    print("|---|---|---|")
    for mode, stall, step_s in results:
        print(f"| {mode} | {stall:.2f} | {step_s * 1e3:.0f} |")


if __name__ == "__main__":
    main()
