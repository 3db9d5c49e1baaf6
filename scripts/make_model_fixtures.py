"""Makes the small random-weight reference models that the CPU tests compare against.

Run on a machine with transformers (the GPU machine), from the repo root:
    python3 scripts/make_model_fixtures.py [NAME ...]   # no names: all of them
Writes tests/fixtures/models/<name>/ with a Hugging Face model folder (config.json + safetensors)
and reference.json / reference.safetensors: token ids, per-sequence log-probs and per-token
logits computed by transformers in float32 on the CPU.
"""
import json
import os
import shutil
import sys

import torch
import transformers
from safetensors.torch import save_file
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, MixtralConfig,
                          MixtralForCausalLM, NemotronConfig, NemotronForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM)

OUT = "tests/fixtures/models"
VOCAB = 256
LENGTHS = [1, 5, 17, 32, 48]  # ascending: transformers' dynamic rope keeps state across calls
LOGIT_SEQS = [2, 4]  # which sequences get full per-token logits stored


def make_config(cls, rope=None, theta=10000.0, **kw):
    """Builds a config in whatever form this transformers version understands."""
    params = {"rope_type": "default", "rope_theta": theta}
    params.update(rope or {})
    try:
        cfg = cls(rope_parameters=params, **kw)
        ok = isinstance(getattr(cfg, "rope_parameters", None), dict) and \
            cfg.rope_parameters.get("rope_type") == params["rope_type"]
    except Exception:
        ok = False
    if not ok:
        scaling = dict(rope) if rope else None
        cfg = cls(rope_theta=theta, rope_scaling=scaling, **kw)
    return cfg


def base(**kw):
    d = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=1,
             eos_token_id=2, tie_word_embeddings=False)
    d.update(kw)
    return d


MODELS = {
    "llama2": (LlamaForCausalLM, make_config(LlamaConfig, **base())),
    "llama3": (LlamaForCausalLM, make_config(
        LlamaConfig, theta=500000.0,
        rope={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 16},
        **base(num_attention_heads=8, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
               eos_token_id=[2, 3]))),
    "llama_linear": (LlamaForCausalLM, make_config(
        LlamaConfig, rope={"rope_type": "linear", "factor": 2.0}, **base(num_key_value_heads=2))),
    "llama_dynamic": (LlamaForCausalLM, make_config(
        LlamaConfig, rope={"rope_type": "dynamic", "factor": 2.0}, **base(max_position_embeddings=24))),
    "llama_bias": (LlamaForCausalLM, make_config(
        LlamaConfig, **base(attention_bias=True, mlp_bias=True, num_key_value_heads=1))),
    "mistral": (MistralForCausalLM, make_config(
        MistralConfig, theta=1000000.0, **base(num_key_value_heads=2, head_dim=32, sliding_window=8))),
    "qwen2": (Qwen2ForCausalLM, make_config(
        Qwen2Config, theta=1000000.0, **base(num_key_value_heads=2, tie_word_embeddings=True))),
    # Added later: new entries go last, so that the models above keep their seeds.
    "qwen3": (Qwen3ForCausalLM, make_config(
        Qwen3Config, theta=1000000.0, **base(num_key_value_heads=2, head_dim=32, tie_word_embeddings=True))),
    "nemotron": (NemotronForCausalLM, make_config(
        NemotronConfig, **{k: v for k, v in base(num_key_value_heads=2, partial_rotary_factor=0.5,
                                                  norm_eps=1e-5).items() if k != "rms_norm_eps"})),
    # Four experts, two per token: the short sequences leave some experts without tokens.
    "mixtral": (MixtralForCausalLM, make_config(
        MixtralConfig, theta=1000000.0, **base(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                               sliding_window=None))),
}
# Variants of the same weights in other on-disk layouts.
SHARDED = {"llama2_sharded": "llama2"}
BF16 = {"llama3_bf16": "llama3"}


def randomize(model, seed):
    """Every weight random (biases and norms too), so that no term can hide behind a zero or one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def reference(model, seqs):
    logprobs, logits_out = [], {}
    with torch.no_grad():
        for i, ids in enumerate(seqs):
            x = torch.tensor([ids])
            logits = model(input_ids=x).logits[0].float()
            lp = torch.log_softmax(logits, -1)
            s = float(lp[:-1].gather(1, x[0, 1:, None]).sum()) if len(ids) > 1 else 0.0
            logprobs.append(s)
            if i in LOGIT_SEQS:
                logits_out[f"logits_{i}"] = logits.contiguous()
    return logprobs, logits_out


def write(name, model, seqs, dtype=torch.float32, **save_kw):
    d = os.path.join(OUT, name)
    shutil.rmtree(d, ignore_errors=True)
    model = model.to(dtype)
    model.save_pretrained(d, **save_kw)
    # The reference is computed from the weights as saved (bf16 ones upcast), in float32.
    ref_model = type(model).from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    logprobs, logits = reference(ref_model, seqs)
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump({"transformers": transformers.__version__, "torch": torch.__version__,
                   "sequences": seqs, "logprob": logprobs, "logit_sequences": LOGIT_SEQS}, f)
    save_file(logits, os.path.join(d, "reference.safetensors"))
    with open(os.path.join(d, "data.jsonl"), "w") as f:
        for ids in seqs:
            f.write(json.dumps({"input_ids": ids}) + "\n")
    files = sorted(os.listdir(d))
    size = sum(os.path.getsize(os.path.join(d, f)) for f in files)
    print(f"{name:16s} {size / 1e3:8.1f} kB  logprob[-1]={logprobs[-1]:.6f}  files={files}")


def main():
    os.makedirs(OUT, exist_ok=True)
    g = torch.Generator().manual_seed(1234)
    seqs = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]
    only = set(sys.argv[1:])
    built = {}
    for i, (name, (cls, cfg)) in enumerate(MODELS.items()):
        torch.manual_seed(i)
        model = cls(cfg).eval()
        randomize(model, seed=100 + i)
        built[name] = model
        if not only or name in only:
            write(name, model, seqs)
    for name, src in SHARDED.items():
        if not only or name in only:
            write(name, built[src], seqs, max_shard_size="100KB")
    for name, src in BF16.items():
        if not only or name in only:
            write(name, built[src], seqs, dtype=torch.bfloat16)
    print("transformers", transformers.__version__, "torch", torch.__version__)


if __name__ == "__main__":
    main()
