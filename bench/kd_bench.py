"""Knowledge distillation's cost over plain SFT: `aligner sft` with and without a teacher, 1.1B, one GPU.

Run on the GPU machine after scripts/build_cuda.sh:  python3 bench/kd_bench.py [BUILD_DIR]
The 1.1B TinyLlama shape (random bf16 weights) is student and teacher (kd.teacher: the same folder),
on packed hh-rlhf chats, 8 x 2048 tokens a step, top-k 64 distillation. The teacher's top-k and the
student's KD loss are computed a chunk of rows at a time (model/transformer.h: lm_topk, head_topk_kd),
so neither holds the whole vocabulary's float32 logits: the peak over plain SFT is the teacher's
weights and its forward's activations of one layer at a time (it runs without gradients).
"""
import os
import sys
import tempfile

import torch
from tinyllama import add_tokenizer, command_steps, hh_rlhf_file, make_model

B, T = 8, 2048


def main():
    build = next((a for a in sys.argv[1:] if not a.startswith("--")), "build-cuda")
    model, folder = make_model(torch.bfloat16)
    weights_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    del model
    torch.cuda.empty_cache()
    add_tokenizer(folder)
    data = os.path.join(tempfile.mkdtemp(prefix="kd_bench_data_"), "hh.jsonl")
    hh_rlhf_file(data, sft=True)
    args = [f"model.path={folder}", "model.device=cuda", "model.dtype=bfloat16", f"data.train={data}",
            "data.format=text", "data.packing=true", f"data.max_length={T}", f"trainer.micro_batch_size={B}",
            f"trainer.global_batch_size={B}", "optim.lr=1e-5", "optim.scheduler=constant", "optim.warmup_steps=0"]
    rows = [("`aligner sft`", *command_steps(build, "sft", args, steps=10, warmup=3)),
            ("`aligner sft kd.teacher=` (the same 1.1B), top-k 64",
             *command_steps(build, "sft", [*args, f"kd.teacher={folder}", "kd.top_k=64"], steps=10, warmup=3))]
    print(f"\nKD, 1.1B bf16 student and teacher, {B} x {T} packed hh-rlhf tokens a step, "
          f"{torch.cuda.get_device_name()} (the teacher's bf16 weights: {weights_gb:.1f} GB; the step's "
          f"whole float32 logits would be {B * T * 32000 * 4 / 1e9:.1f} GB)")
    print("| run | ms/step | useful tokens/s | peak GB |")
    print("|---|---|---|---|")
    for name, ms, tps, peak in rows:
        print(f"| {name} | {ms:.0f} | {tps:,.0f} | {peak:.1f} |")


if __name__ == "__main__":
    main()
