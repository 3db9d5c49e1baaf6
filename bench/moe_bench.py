"""A Mixtral-shape model scaled to one GPU (8 experts, 2 per token, hidden 2048), bf16: forward and
sampling generation, aligner vs transformers in the same run.

Run on the GPU machine after scripts/build_cuda.sh:  python3 bench/moe_bench.py [BUILD_DIR]
Forward: batch 8 x 2048 random tokens, logits for every token. Generation: 64 prompts of 128 random
tokens, 128 new tokens each at temperature 1, EOS ignored; transformers generates all 64 at once.
Training: SFT steps of 4 x 2048 tokens (forward, loss, backward, clipping, AdamW), transformers as its
Trainer runs with bf16=True (float32 weights under autocast), aligner with bf16 weights and float32
master weights and moments (bench/sft_bench).
aligner runs the same folder through bench/forward_bench, bench/generate_bench and bench/sft_bench;
its experts run as grouped GEMMs (torch._grouped_mm), in the captured CUDA decoder as well.
"""
import json
import subprocess
import sys
import tempfile
import time

import torch
import transformers
from tinyllama import hf_sft_step
from transformers import MixtralConfig, MixtralForCausalLM

CONFIG = MixtralConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                       num_key_value_heads=8, vocab_size=32000, num_local_experts=8, num_experts_per_tok=2,
                       max_position_embeddings=4096, sliding_window=None, tie_word_embeddings=False)
B, T, N, P, NEW = 8, 2048, 64, 128, 128
TRAIN_B = 4


def timed(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def main():
    build = sys.argv[1] if len(sys.argv) > 1 else "build-cuda"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = MixtralForCausalLM._from_config(CONFIG, attn_implementation="sdpa", dtype=torch.bfloat16).eval()
    folder = tempfile.mkdtemp(prefix="mixtral_")
    model.save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters()) / 1e9
    ids = torch.randint(0, CONFIG.vocab_size, (B, T), device="cuda")
    prompts = torch.randint(0, CONFIG.vocab_size, (N, P), device="cuda")
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        fwd_s = timed(lambda: model(input_ids=ids).logits[0, 0, 0].item(), 2, 5)
        gen_s = timed(lambda: model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                                             do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                             max_new_tokens=NEW, pad_token_id=0), 0, 1)
    del model
    torch.cuda.empty_cache()
    model = MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cuda").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
    train_s = timed(lambda: hf_sft_step(model, opt, ids[:TRAIN_B]), 2, 4)
    del model, opt
    torch.cuda.empty_cache()
    run = lambda *a: json.loads(subprocess.run([str(x) for x in a], check=True, capture_output=True,
                                               text=True).stdout.strip().splitlines()[-1])
    fwd = run(f"{build}/forward_bench", folder, B, T, 2, 5)
    gen = run(f"{build}/generate_bench", folder, N, P, NEW, N)
    train = run(f"{build}/sft_bench", folder, TRAIN_B, T, 2, 4, 0)
    hf_fwd, hf_gen, hf_train = B * T / fwd_s, N * NEW / gen_s, TRAIN_B * T / train_s
    print(f"\nMixtral shape ({params:.1f}B parameters: 8 experts, 2 per token, hidden 2048, 16 layers), bf16, "
          f"{torch.cuda.get_device_name()}, transformers {transformers.__version__}")
    print("| what | transformers | aligner | ratio |")
    print("|---|---|---|---|")
    print(f"| forward, {B} x {T} tokens | {hf_fwd:,.0f} tok/s | {fwd['tokens_per_s']:,.0f} tok/s | "
          f"{fwd['tokens_per_s'] / hf_fwd:.2f}x |")
    print(f"| generation, {N} prompts x {P} + {NEW} new, sampling | {hf_gen:,.0f} tok/s | "
          f"{gen['tokens_per_s']:,.0f} tok/s | {gen['tokens_per_s'] / hf_gen:.2f}x |")
    print(f"| SFT step, {TRAIN_B} x {T} tokens | {hf_train:,.0f} tok/s | {train['tokens_per_s']:,.0f} tok/s | "
          f"{train['tokens_per_s'] / hf_train:.2f}x |")


if __name__ == "__main__":
    main()
