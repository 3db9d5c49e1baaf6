"""How long a checkpoint stalls training: `aligner sft` on a 1.1B Llama (bf16 weights, float32 master
weights and AdamW moments: a 15 GB checkpoint) on packed hh-rlhf chats, 8 x 2048 tokens a step,
checkpointed, written in place (trainer.async_checkpoint=false: once) or copied to
pinned host memory and written by a thread of its own while training goes on (true: three times).
Checkpoints come every 120 steps (32 s of training), far enough apart for each write to end
before the next copy, as in a real run.

Run on the GPU machine after scripts/build_cuda.sh:  python3 bench/checkpoint_bench.py [BUILD_DIR]
The script follows metrics.jsonl as it is written: a checkpoint's stall is the time between the rows
of its step and the next that the next step does not account for. The first asynchronous copy also
pays for pinning its host memory, which torch's host allocator keeps for the later ones.
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

EVERY = 120


def run(build, folder, data, async_checkpoint, checkpoints):
    steps = EVERY * checkpoints + 2
    out = tempfile.mkdtemp(prefix="checkpoint_bench_")
    metrics = os.path.join(out, "metrics.jsonl")
    cmd = [f"{build}/aligner", "sft", f"model.path={folder}", "model.device=cuda", "model.dtype=bfloat16",
           f"data.train={data}", "data.format=text", "data.packing=true", "data.max_length=2048",
           "trainer.micro_batch_size=8", "trainer.global_batch_size=8", f"trainer.max_steps={steps}",
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
    stalls = [rows[at + 1][0] - rows[at][0] - rows[at + 1][1] for at in range(EVERY, steps - 1, EVERY)]
    step_s = sum(rows[s][1] for s in range(2, steps + 1)) / (steps - 1)
    return stalls, step_s


def main():
    build = next((a for a in sys.argv[1:] if not a.startswith("--")), "build-cuda")
    model, folder = make_model(torch.bfloat16)
    del model
    torch.cuda.empty_cache()
    add_tokenizer(folder)
    data = os.path.join(folder, "hh.jsonl")
    hh_rlhf_file(data, sft=True)
    results = [("false", *run(build, folder, data, "false", 1)), ("true", *run(build, folder, data, "true", 3))]
    print(f"\n`aligner sft` 1.1B bf16 (float32 master weights and moments: 15 GB a checkpoint), "
          f"{torch.cuda.get_device_name()}")
    print("| trainer.async_checkpoint | training stalled by each checkpoint (s) | mean step (ms) |")
    print("|---|---|---|")
    for mode, stalls, step_s in results:
        print(f"| {mode} | {', '.join(f'{x:.2f}' for x in stalls)} | {step_s * 1e3:.0f} |")


if __name__ == "__main__":
    main()
