"""SFT steps of a 1.1B Llama (TinyLlama shape), bf16, 16k tokens per step: aligner vs transformers.

Run on the GPU machine after scripts/build_cuda.sh:  python3 bench/sft_bench.py [BUILD_DIR] [--checkpoint]
Every row does the same work per step: batch 8 x 2048 tokens, forward, mean cross-entropy over all
next tokens, backward, global-norm clipping at 1.0, AdamW. The baselines (issue 21):
  - transformers as its Trainer runs with bf16=True: float32 weights under bf16 autocast,
    torch.optim.AdamW (foreach);
  - transformers with bf16 weights, fused AdamW and SDPA attention (no float32 master weights);
  - the same under torch.compile.
aligner keeps bf16 weights with float32 master weights and moments (bench/sft_bench.cpp: the
trainer's step on fixed random tokens). The last row is the command itself: `aligner sft` on real
hh-rlhf chats (examples/data/hh-rlhf, Llama 2's tokenizer) packed into rows of 2048, 8 rows a step,
counting useful (non-pad) tokens; with two GPUs visible, again data parallel on both (per GPU: the
scaling efficiency). MFU counts 6 x parameters x tokens plus attention (6 x layers x
seq x hidden per token, causal) against 989 TFLOP/s.
"""
import json
import os
import subprocess
import sys
import tempfile

import torch
from tinyllama import CONFIG, add_tokenizer, command_steps, hf_sft_step, hh_rlhf_file, make_model, time_steps

B, T, WARMUP, ITERS = 8, 2048, 2, 6
ALIGNER_WARMUP = 10
PEAK = 989e12
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def main():
    build = next((a for a in sys.argv[1:] if not a.startswith("--")), "build-cuda")
    ckpt = "--checkpoint" in sys.argv
    cfg = CONFIG
    ids = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")
    rows = []

    def row(name, s, peak):
        rows.append((name, s * 1e3, B * T / s, peak))
        print(f"  measured {name}: {s * 1e3:.0f} ms", flush=True)

    model, folder = make_model(torch.float32)
    model.train()
    if ckpt:
        model.gradient_checkpointing_enable()
    n_params = sum(p.numel() for p in model.parameters()) - cfg.vocab_size * cfg.hidden_size  # no embedding lookup
    flops_per_token = 6 * n_params + 6 * cfg.num_hidden_layers * T * cfg.hidden_size
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
    version = __import__("transformers").__version__
    row(f"transformers {version} as its Trainer runs (fp32 weights, bf16 autocast, AdamW foreach)",
        *time_steps(lambda: hf_sft_step(model, opt, ids), WARMUP, ITERS))
    del opt
    # bf16 weights, fused AdamW: the fastest plain-PyTorch step (it keeps no float32 master weights).
    model.to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    row("transformers, bf16 weights + fused AdamW + SDPA",
        *time_steps(lambda: hf_sft_step(model, opt, ids, autocast=False), WARMUP, ITERS))
    compiled = torch.compile(model)
    row("the same under torch.compile",
        *time_steps(lambda: hf_sft_step(compiled, opt, ids, autocast=False), WARMUP + 1, ITERS))
    del model, compiled, opt
    torch.cuda.empty_cache()

    # aligner's rows of one length take flash attention until cuDNN's plan for them pays (8 steps
    # here, src/core/torch_compat.h): the timed steps start after that.
    out = subprocess.run([f"{build}/sft_bench", folder, str(B), str(T), str(ALIGNER_WARMUP), str(ITERS),
                          "1" if ckpt else "0"],
                         check=True, capture_output=True, text=True).stdout
    ours = json.loads(out.strip().splitlines()[-1])
    rows.append(("aligner (bench/sft_bench.cpp: the trainer's step, fp32 master weights)", ours["ms_per_step"],
                 ours["tokens_per_s"], ours["peak_gb"]))
    if not ckpt:
        add_tokenizer(folder)
        data = os.path.join(tempfile.mkdtemp(prefix="sft_bench_data_"), "hh.jsonl")
        hh_rlhf_file(data, sft=True)
        args = [f"model.path={folder}", "model.device=cuda", "model.dtype=bfloat16", f"data.train={data}",
                "data.format=text", "data.packing=true", f"data.max_length={T}", f"trainer.micro_batch_size={B}",
                "optim.lr=1e-5", "optim.scheduler=constant", "optim.warmup_steps=0"]
        ms, tps, peak = command_steps(build, "sft", [*args, f"trainer.global_batch_size={B}"], steps=12, warmup=3)
        rows.append(("`aligner sft`, packed hh-rlhf chats, useful tokens/s", ms, tps, peak))
        if torch.cuda.device_count() >= 2:
            # Data parallel on 2 GPUs, the same rows per GPU: tokens/s per GPU, so that the ratio to
            # the row above is the scaling efficiency.
            ms2, tps2, peak2 = command_steps(build, "sft", [*args, f"trainer.global_batch_size={2 * B}"], steps=12,
                                             warmup=3, ranks=2)
            rows.append((f"the same on 2 GPUs, per GPU ({tps2 / 2 / tps:.1%} of linear scaling)", ms2, tps2 / 2, peak2))

    compiled_tps = rows[2][2]
    print(f"\nSFT step, 1.1B Llama bf16, {B}x{T} tokens, activation checkpointing {'on' if ckpt else 'off'}, "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| impl | ms/step | tokens/s | MFU | peak GB | vs Trainer | vs compiled |")
    print("|---|---|---|---|---|---|---|")
    for name, ms, tps, peak in rows:
        print(f"| {name} | {ms:.0f} | {tps:,.0f} | {tps * flops_per_token / PEAK:.1%} | {peak:.1f} | "
              f"{tps / rows[0][2]:.2f}x | {tps / compiled_tps:.2f}x |")


if __name__ == "__main__":
    main()
