"""The model every benchmark uses: a random-weight Llama of TinyLlama-1.1B's shape, made by
transformers on the GPU and saved where aligner can load the same weights."""
import copy
import os
import shutil
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

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


def make_reward_model(dtype):
    """(reward model on the GPU in `dtype`, folder holding its weights in bf16): a random-weight
    LlamaForSequenceClassification of CONFIG's shape with one output. pad_token_id 0: transformers
    reads each row's score at its last token that is not padding."""
    cfg = copy.deepcopy(CONFIG)  # CONFIG stays the causal LM's
    cfg.num_labels = 1
    cfg.pad_token_id = 0
    torch.manual_seed(1)
    with torch.device("cuda"):
        model = LlamaForSequenceClassification._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    folder = tempfile.mkdtemp(prefix="tinyllama_rm_")
    model.to(torch.bfloat16).save_pretrained(folder)
    return model.to(dtype), folder


# Llama 2's SentencePiece model from the test fixtures: 32000 pieces, CONFIG's vocabulary.
TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "tokenizers",
                         "llama2", "tokenizer.model")


def add_tokenizer(folder):
    """Puts a tokenizer in a model folder: aligner's commands that read a data set need one beside
    the weights (the C++ benches read the weights alone)."""
    shutil.copy(TOKENIZER, folder)


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
