"""Checks on the GPU machine, after scripts/build_cuda.sh: bf16 parity with transformers, and that
folders written by `aligner convert` load in transformers with the same outputs.

bf16 tolerance: bf16 keeps 8 significant bits, so any bf16 run drifts from the float32 answer by an
amount that grows with depth and length. We hold ours to what transformers' own bf16 run achieves:
|ours_bf16 - fp32| <= 2 * |transformers_bf16 - fp32| + 0.05 per sequence (the 0.05 absorbs
sequences where transformers happens to land very close). float32 on the GPU must match within 1e-3.
"""
import json
import os
import subprocess
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM

FIX = "tests/fixtures/models"
BUILD = sys.argv[1] if len(sys.argv) > 1 else "build-cuda"
NAMES = ["llama2", "llama3", "llama_linear", "llama_bias", "mistral", "mixtral", "qwen2", "qwen3", "nemotron",
         "llama2_sharded"]


def ours(model_dir, dtype):
    out = subprocess.run([os.path.join(BUILD, "aligner"), "perplexity", "--model", model_dir, "--data",
                          os.path.join(model_dir, "data.jsonl"), "--dtype", dtype, "--device", "cuda",
                          "--batch-size", "8"], check=True, capture_output=True, text=True).stdout
    rows = [json.loads(l) for l in out.splitlines()]
    return [r["logprob"] for r in rows if "index" in r]


def hf_logprobs(model_dir, dtype):
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").cuda().eval()
    res = []
    with torch.no_grad():
        for ids in json.load(open(os.path.join(model_dir, "reference.json")))["sequences"]:
            x = torch.tensor([ids], device="cuda")
            lp = torch.log_softmax(m(input_ids=x).logits[0].float(), -1)
            res.append(float(lp[:-1].gather(1, x[0, 1:, None]).sum()) if len(ids) > 1 else 0.0)
    return res


def main():
    ok = True
    print("| model | max abs err fp32 (ours) | max abs err bf16 (transformers) | max abs err bf16 (ours) | pass |")
    print("|---|---|---|---|---|")
    for name in NAMES:
        d = os.path.join(FIX, name)
        ref = json.load(open(os.path.join(d, "reference.json")))["logprob"]
        o32, o16, h16 = ours(d, "float32"), ours(d, "bfloat16"), hf_logprobs(d, torch.bfloat16)
        e32 = max(abs(a - b) for a, b in zip(o32, ref))
        eh = [abs(a - b) for a, b in zip(h16, ref)]
        eo = [abs(a - b) for a, b in zip(o16, ref)]
        good = e32 < 1e-3 and all(o <= 2 * h + 0.05 for o, h in zip(eo, eh))
        ok &= good
        print(f"| {name} | {e32:.2e} | {max(eh):.3f} | {max(eo):.3f} | {'yes' if good else 'NO'} |")

    # Round trip: aligner writes (resharded, and as bf16), transformers reads, outputs unchanged.
    src = os.path.join(FIX, "llama3")
    for dtype, shard in [("float32", "100KB"), ("bfloat16", "0")]:
        out = tempfile.mkdtemp()
        subprocess.run([os.path.join(BUILD, "aligner"), "convert", "--model", src, "--out", out + "/m", "--dtype",
                        dtype, "--shard-size", shard], check=True, capture_output=True)
        # Both loaded by transformers at the target dtype, so buffers such as the rotary table
        # stay float32 in both, as they would in a user's run.
        a = AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype)).eval()
        b = AutoModelForCausalLM.from_pretrained(out + "/m", dtype="auto").eval()
        x = torch.tensor([json.load(open(os.path.join(src, "reference.json")))["sequences"][-1]])
        with torch.no_grad():
            la = a(input_ids=x).logits.float()
            lb = b(input_ids=x).logits.float()
        diff = (la - lb).abs().max().item()
        good = b.dtype == getattr(torch, dtype) and diff == 0.0
        ok &= good
        print(f"round trip via aligner convert ({dtype}, shards {shard}): transformers loads it as {b.dtype}, "
              f"max logit diff {diff:.1e} {'ok' if good else 'FAIL'}")
    print("GPU CHECK", "PASSED" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
