"""SFT steps of a 1.1B Llama (TinyLlama shape), bf16, 16k tokens per step: aligner vs transformers.

Run on the GPU machine after scripts/build_cuda.sh:  python3 bench/sft_bench.py [BUILD_DIR] [--checkpoint]
Both do the same work per step: batch 8 x 2048 tokens, forward, mean cross-entropy over all next
tokens, backward, global-norm clipping at 1.0, AdamW. transformers runs the way its Trainer does
with bf16=True: float32 weights under bf16 autocast, torch.optim.AdamW (foreach). aligner keeps
bf16 weights with float32 master weights and moments. MFU counts 6 x parameters x tokens plus
attention (6 x layers x seq x hidden per token, causal) against 989 TFLOP/s.
"""
import json
import subprocess
import sys

import torch
from tinyllama import CONFIG, hf_sft_step, make_model, time_steps

B, T, WARMUP, ITERS = 8, 2048, 2, 6
PEAK = 989e12


def main():
    build = next((a for a in sys.argv[1:] if not a.startswith("--")), "build-cuda")
    ckpt = "--checkpoint" in sys.argv
    model, d = make_model(torch.float32)
    model.train()
    cfg = CONFIG
    if ckpt:
        model.gradient_checkpointing_enable()
    n_params = sum(p.numel() for p in model.parameters()) - cfg.vocab_size * cfg.hidden_size  # no embedding lookup
    flops_per_token = 6 * n_params + 6 * cfg.num_hidden_layers * T * cfg.hidden_size
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
    ids = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")

    hf_s, hf_peak = time_steps(lambda: hf_sft_step(model, opt, ids), WARMUP, ITERS)
    del model, opt
    torch.cuda.empty_cache()
    out = subprocess.run([f"{build}/sft_bench", d, str(B), str(T), str(WARMUP), str(ITERS), "1" if ckpt else "0"],
                         check=True, capture_output=True, text=True).stdout
    ours = json.loads(out.strip().splitlines()[-1])
    hf_tps = B * T / hf_s
    rows = [(f"transformers {__import__('transformers').__version__} + torch AdamW", hf_s * 1e3, hf_tps, hf_peak),
            ("aligner", ours["ms_per_step"], ours["tokens_per_s"], ours["peak_gb"])]
    print(f"\nSFT step, 1.1B Llama bf16, {B}x{T} tokens, activation checkpointing {'on' if ckpt else 'off'}, "
          f"{torch.cuda.get_device_name()}")
    print("| impl | ms/step | tokens/s | MFU | peak GB | vs transformers |")
    print("|---|---|---|---|---|---|")
    for name, ms, tps, peak in rows:
        print(f"| {name} | {ms:.0f} | {tps:,.0f} | {tps * flops_per_token / PEAK:.1%} | {peak:.1f} | {tps / hf_tps:.2f}x |")


if __name__ == "__main__":
    main()
