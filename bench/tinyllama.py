"""The model every benchmark uses: a random-weight Llama of TinyLlama-1.1B's shape, made by
transformers on the GPU and saved where aligner can load the same weights."""
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

CONFIG = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5,
                     tie_word_embeddings=False)


def make_model(dtype):
    """(model on the GPU in `dtype`, folder holding its weights in bf16)."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(CONFIG, attn_implementation="sdpa", dtype=dtype)
    folder = tempfile.mkdtemp(prefix="tinyllama_")
    model.to(torch.bfloat16).save_pretrained(folder)
    return model.to(dtype), folder


def time_steps(step, warmup, iters):
    """(seconds per step, peak GB allocated) of `step` run `iters` times after `warmup` untimed runs."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters, torch.cuda.max_memory_allocated() / 1e9
