"""LoRA training steps, bf16 base: aligner vs transformers + PEFT on a 1.1B (TinyLlama) and an 8B
(Llama 3) shape, then aligner's LoRA DPO on the 8B shape with the reference run or cached.

Run on the GPU machine after scripts/build_cuda.sh:  python3 bench/lora_bench.py [BUILD_DIR] [--shape=1.1B|8B]
Both do the same work per step: batch 8 x 2048 random tokens, forward, mean cross-entropy over all
next tokens, backward, global-norm clipping at 1.0, AdamW on the adapters alone: rank 16, alpha 32,
no dropout, on q/k/v/o/gate/up/down of every layer; the base frozen in bf16. Activation
checkpointing is on for both implementations and both shapes (the 8B does not fit without it).
transformers + PEFT runs as PEFT's defaults do: get_peft_model keeps the adapters in float32 and
computes them in float32; non-reentrant gradient checkpointing, torch.optim.AdamW (foreach) on the
trainable parameters. aligner keeps the adapters' weights in float32 and runs them in bf16.
The DPO part (aligner only): 8 pairs of 1024 tokens (256-token prompts shared by each pair), the
reference the base with the adapters off as `aligner dpo` runs it with LoRA, either run every step
(dpo.cache_reference=false) or its log-probs computed once (dpo.cache_reference=true).
"""
import gc
import json
import shutil
import subprocess
import sys
import tempfile

import torch
from peft import LoraConfig, get_peft_model
from tinyllama import CONFIG, LLAMA3_8B, make_8b, make_model, time_steps

B, T, RANK = 8, 2048, 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {"1.1B": (CONFIG, 2, 6), "8B": (LLAMA3_8B, 1, 3)}  # config, warm-up steps, timed steps
DPO_PAIRS, DPO_T, DPO_PROMPT = 8, 1024, 256


def free():
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def hf_peft(base, cfg, warmup, iters):
    """(seconds per step, peak GB) of transformers + PEFT LoRA steps on `base` (bf16, on the GPU)."""
    base.train()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.enable_input_require_grads()
    model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, lora_dropout=0.0))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    ids = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")

    def step():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return time_steps(step, warmup, iters)


def ours(build, d, warmup, iters, *mode):
    p = subprocess.run([f"{build}/lora_bench", d, str(DPO_PAIRS if mode else B), str(DPO_T if mode else T),
                        str(warmup), str(iters), "1", str(RANK), *mode], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"lora_bench {' '.join(mode)} exited with status {p.returncode}:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    build = next((a for a in sys.argv[1:] if not a.startswith("--")), "build-cuda")
    only = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--shape=")), None)
    gpu = torch.cuda.get_device_name()
    for shape, (cfg, warmup, iters) in SHAPES.items():
        if only and only != shape:
            continue
        base, d = make_model(torch.bfloat16) if shape == "1.1B" else make_8b()
        hf_s, hf_peak = hf_peft(base, cfg, warmup, iters)
        del base
        free()
        o = ours(build, d, warmup, iters)
        hf_tps = B * T / hf_s
        print(f"\nLoRA SFT step (rank {RANK}, all 7 projections), {shape} Llama, bf16 base, {B}x{T} tokens, "
              f"activation checkpointing on for both, {gpu}")
        print("| impl | ms/step | tokens/s | peak GB | vs transformers+peft |")
        print("|---|---|---|---|---|")
        rows = [(f"transformers {__import__('transformers').__version__} + peft {__import__('peft').__version__}",
                 hf_s * 1e3, hf_tps, hf_peak), ("aligner", o["ms_per_step"], o["tokens_per_s"], o["peak_gb"])]
        for name, ms, tps, peak in rows:
            print(f"| {name} | {ms:.0f} | {tps:,.0f} | {peak:.1f} | {tps / hf_tps:.2f}x |")
        if shape == "8B":
            runs = [("aligner, reference = base with adapters off every step (dpo.cache_reference=false)",
                     ours(build, d, warmup, iters, "dpo-model", str(DPO_PROMPT))),
                    ("aligner, cached reference log-probs (dpo.cache_reference=true)",
                     ours(build, d, warmup, iters, "dpo-cached", str(DPO_PROMPT)))]
            print(f"\nLoRA DPO step (rank {RANK}), 8B Llama, bf16 base, {DPO_PAIRS} pairs x {DPO_T} tokens "
                  f"({DPO_PROMPT}-token prompts), activation checkpointing on, {gpu}")
            print("| impl | ms/step | pairs/s | peak GB | vs reference every step |")
            print("|---|---|---|---|---|")
            for name, r in runs:
                print(f"| {name} | {r['ms_per_step']:.0f} | {r['pairs_per_s']:.2f} | {r['peak_gb']:.1f} | "
                      f"{r['pairs_per_s'] / runs[0][1]['pairs_per_s']:.2f}x |")
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
