"""Greedy generations by transformers on the fixture models, which tests/test_generate.cpp compares
aligner's generation engine against.

Run on a machine with transformers 5.x (the GPU machine), from the repo root, after
scripts/make_model_fixtures.py has made the model folders:
    python3 scripts/make_generation_fixtures.py [NAME ...]   # no names: all of them
Writes tests/fixtures/models/<name>/greedy.json: seeded random prompts and the ids that
model.generate(do_sample=False) appends to each, one prompt at a time, in float32 on the CPU, stopping
at the model's EOS ids as generate does by default.
"""
import json
import os
import sys

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

OUT = "tests/fixtures/models"
MODELS = ["llama2", "llama3", "mistral", "qwen2", "llama_bias", "llama_linear", "llama_dynamic", "qwen3", "nemotron",
          "mixtral"]
LENGTHS = [1, 3, 8, 13, 21]  # mistral's window is 8: the longer ones decode past it
MAX_NEW = 12


def rope_type(cfg):
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    return rope.get("rope_type", rope.get("type", "default")), rope


def context(cfg):
    """aligner's context_length: max_position_embeddings, or for dynamic rope its original context,
    past which transformers rescales every position as the sequence grows. Generation stops there."""
    ctx = cfg.max_position_embeddings
    kind, rope = rope_type(cfg)
    if kind == "dynamic":
        ctx = min(ctx, rope.get("original_max_position_embeddings") or ctx)
    return ctx


def main():
    torch.set_grad_enabled(False)
    only = set(sys.argv[1:])
    g = torch.Generator().manual_seed(4321)
    for name in MODELS:
        d = os.path.join(OUT, name)
        cfg = AutoConfig.from_pretrained(d)
        cases = []
        for n in LENGTHS:
            prompt = torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist()
            if only and name not in only:
                continue  # the prompts are still drawn, so that the other models' stay as they were
            # A fresh model per prompt: dynamic rope keeps state from one call to the next.
            model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
            new = min(MAX_NEW, context(cfg) - n)
            ids = torch.tensor([prompt])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=new, pad_token_id=0)
            cases.append({"prompt": prompt, "output": out[0, n:].tolist()})
        if only and name not in only:
            continue
        with open(os.path.join(d, "greedy.json"), "w") as f:
            json.dump({"transformers": transformers.__version__, "torch": torch.__version__,
                       "max_new_tokens": MAX_NEW, "eos_token_id": model.generation_config.eos_token_id,
                       "cases": cases}, f)
        print(f"{name:14s} outputs of lengths {[len(c['output']) for c in cases]}")
    print("transformers", transformers.__version__, "torch", torch.__version__)


if __name__ == "__main__":
    main()
