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
import time

import torch
from tinyllama import CONFIG, make_model

B, T, WARMUP, ITERS = 8, 2048, 3, 10


def main():
    build = sys.argv[1] if len(sys.argv) > 1 else "build-cuda"
    model, d = make_model(torch.bfloat16)
    model.eval()
    cfg = CONFIG
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
