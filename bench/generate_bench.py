"""Sampling generation with a 1.1B Llama (TinyLlama shape), bf16: aligner vs transformers.

Run on the GPU machine after scripts/build_cuda.sh:  python3 bench/generate_bench.py [BUILD_DIR]
256 prompts of 128 random tokens, 256 new tokens each, sampled at temperature 1 without top-k or
top-p (the policy's own distribution, as PPO samples it), EOS ignored so that every sequence runs to
its full length in both. transformers generates in batches of the largest of 256, 128, ... that
fits; aligner decodes in as many KV-cache slots as fit (all 256 here) with continuous batching.
Prints generated tokens/s (end to end, prefill included) and aligner's fraction of the memory-
bandwidth bound: the weights plus the live KV cache read by every decoding step, over a measured
device copy bandwidth; end to end, and for the decoding steps alone.
"""
import json
import subprocess
import sys
import time

import torch
from tinyllama import CONFIG, make_model

N, P, NEW = 256, 128, 256


def hf_run(model, ids, batch):
    outs = []
    for s in range(0, N, batch):
        x = ids[s:s + batch]
        outs.append(model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=True,
                                   temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=NEW, pad_token_id=0))
    return outs


def main():
    build = sys.argv[1] if len(sys.argv) > 1 else "build-cuda"
    model, d = make_model(torch.bfloat16)
    model.eval()
    cfg = CONFIG
    model.generation_config.eos_token_id = None  # run every sequence to NEW tokens, as aligner does
    ids = torch.randint(0, cfg.vocab_size, (N, P), device="cuda")
    with torch.no_grad():
        model.generate(input_ids=ids[:8], attention_mask=torch.ones_like(ids[:8]), do_sample=True,
                       max_new_tokens=8, pad_token_id=0)  # warm-up
        batch = N
        while True:
            try:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                outs = hf_run(model, ids, batch)
                torch.cuda.synchronize()
                hf_s = time.perf_counter() - t0
                break
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                batch //= 2
    hf_tokens = sum(o.shape[0] * (o.shape[1] - P) for o in outs)
    assert hf_tokens == N * NEW, hf_tokens
    del model, outs
    torch.cuda.empty_cache()
    out = subprocess.run([f"{build}/generate_bench", d, str(N), str(P), str(NEW), str(N)],
                         check=True, capture_output=True, text=True).stdout
    ours = json.loads(out.strip().splitlines()[-1])
    hf_tps = hf_tokens / hf_s
    print(f"\ngeneration, 1.1B Llama bf16, {N} prompts x {P} tokens, {NEW} new tokens each, sampling "
          f"(temperature 1), {torch.cuda.get_device_name()}")
    print("| impl | batch | s | generated tokens/s | vs transformers |")
    print("|---|---|---|---|---|")
    print(f"| transformers {__import__('transformers').__version__} generate (sdpa) | {batch} | {hf_s:.1f} | "
          f"{hf_tps:,.0f} | 1.00x |")
    print(f"| aligner | {ours['batch']} | {ours['seconds']:.1f} | {ours['tokens_per_s']:,.0f} | "
          f"{ours['tokens_per_s'] / hf_tps:.2f}x |")
    print(f"\naligner: {ours['first_step_s']:.3f} s to the first decoding step's end, of which "
          f"{ours['prefill_s']:.3f} s setup and prefill of all prompts")
    print(f"memory-bandwidth bound: {ours['weight_gb']:.2f} GB of weights + {ours['kv_gb_per_step']:.2f} GB of "
          f"KV cache (mean) read per decoding step at {ours['copy_gb_per_s']:,.0f} GB/s (device copy)")
    print("| aligner | generated tokens/s | bound tokens/s | fraction of bound |")
    print("|---|---|---|---|")
    print(f"| end to end (prefill included) | {ours['tokens_per_s']:,.0f} | {ours['bound_tokens_per_s']:,.0f} | "
          f"{ours['fraction_of_bound']:.1%} |")
    if ours['decode_tokens_per_s'] > 0:
        print(f"| decoding steps | {ours['decode_tokens_per_s']:,.0f} | {ours['decode_bound_tokens_per_s']:,.0f} | "
              f"{ours['decode_tokens_per_s'] / ours['decode_bound_tokens_per_s']:.1%} |")


if __name__ == "__main__":
    main()
