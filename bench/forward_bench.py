"""Forward pass of a 1.1B Llama (TinyLlama shape), bf16, batch 8 x 2048: aligner vs transformers.

Run on the GPU machine after scripts/build_cuda.sh:  python3 bench/forward_bench.py [BUILD_DIR]
Makes a random-weight model with transformers, times transformers' forward (sdpa attention, logits
for every token, as LlamaForCausalLM computes them), then runs build/forward_bench on the same
folder and prints both side by side.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

B, T, WARMUP, ITERS = 8, 2048, 3, 10


def main():
    build = sys.argv[1] if len(sys.argv) > 1 else "build-cuda"
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.bfloat16).eval()
    d = tempfile.mkdtemp(prefix="tinyllama_")
    model.save_pretrained(d)
    ids = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")
    with torch.no_grad():
        for _ in range(WARMUP):
            model(input_ids=ids).logits[0, 0, 0].item()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(ITERS):
            model(input_ids=ids).logits[0, 0, 0].item()
        torch.cuda.synchronize()
        hf_s = (time.perf_counter() - t0) / ITERS
    del model
    torch.cuda.empty_cache()
    out = subprocess.run([os.path.join(build, "forward_bench"), d, str(B), str(T), str(WARMUP), str(ITERS)],
                         check=True, capture_output=True, text=True).stdout
    ours = json.loads(out.strip().splitlines()[-1])
    hf_tps = B * T / hf_s
    print(f"\nforward, 1.1B Llama bf16, batch {B} x {T} tokens, {torch.cuda.get_device_name()}")
    print(f"| impl | ms/forward | tokens/s | vs transformers |")
    print(f"|---|---|---|---|")
    print(f"| transformers {__import__('transformers').__version__} (sdpa) | {hf_s * 1e3:.1f} | {hf_tps:,.0f} | 1.00x |")
    print(f"| aligner | {ours['ms_per_forward']:.1f} | {ours['tokens_per_s']:,.0f} | "
          f"{ours['tokens_per_s'] / hf_tps:.2f}x |")


if __name__ == "__main__":
    main()
