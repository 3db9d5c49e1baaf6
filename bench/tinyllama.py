"""The model every benchmark uses: a random-weight Llama of TinyLlama-1.1B's shape, made by
transformers on the GPU and saved where aligner can load the same weights."""
import copy
import json
import os
import shutil
import subprocess
import sys
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


# Llama 3 8B's shape (rope_theta left at its default: it does not change the work).
LLAMA3_8B = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
                        tie_word_embeddings=False)

LLAMA2_13B = LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                         num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                         tie_word_embeddings=False)


def make_8b(cfg=LLAMA3_8B):
    """(random-weight model of `cfg`'s shape (Llama 3 8B's), made in bf16 on the GPU, folder holding its weights)."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.bfloat16)
    folder = tempfile.mkdtemp(prefix="llama_big_")
    model.save_pretrained(folder)
    return model, folder


def hf_sft_step(model, opt, ids, autocast=True):
    """One SFT step as transformers' Trainer runs it with bf16=True: forward under bf16 autocast
    (without: a model already in bf16), backward, global-norm clipping at 1.0, the optimizer's step;
    returns the loss."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


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


# What every online-RL step reports in metrics.jsonl, averaged over the timed steps.
ONLINE_KEYS = ["step_seconds", "time_generation", "time_inference", "update_seconds", "gen_tokens_per_s",
               "peak_memory_gb"]


def run_online(cmd, out_dir, steps, extra_keys=()):
    """Runs an `aligner ppo|reinforce` command writing to out_dir and returns its ONLINE_KEYS as means
    over steps 2..steps (step 1 is the warm-up: CUDA graph capture, allocator growth), peak memory as
    their max, and extra_keys' means where every row has them (else None)."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(" ".join(cmd))
        print("\n".join((proc.stdout + proc.stderr).strip().splitlines()[-30:]))
        sys.exit(f"{cmd[1]} exited with status {proc.returncode}")
    metrics = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(metrics):
        sys.exit(f"aligner wrote no {metrics}; its output ends:\n{proc.stderr[-3000:]}")
    with open(metrics) as f:
        train = {r["step"]: r for r in map(json.loads, filter(str.strip, f)) if r.get("split") == "train"}
    shutil.rmtree(out_dir, ignore_errors=True)  # final/ holds the trained weights: gigabytes
    timed = [train.get(s) for s in range(2, steps + 1)]
    if None in timed:
        sys.exit(f"aligner's metrics.jsonl lacks training rows for steps 2..{steps}; it has steps {sorted(train)}")
    for row in timed:
        missing = [k for k in ONLINE_KEYS if k not in row]
        if missing:
            sys.exit(f"aligner's metrics row lacks {', '.join(missing)}: {json.dumps(row)}")
    ours = {k: sum(r[k] for r in timed) / len(timed) for k in ONLINE_KEYS}
    ours["peak_memory_gb"] = max(r["peak_memory_gb"] for r in timed)
    for k in extra_keys:  # for a look at whether both did the same thing; not timed
        ours[k] = sum(r[k] for r in timed) / len(timed) if all(k in r for r in timed) else None
    return ours


def sft_data_file(path, n=3000):
    """n SFT examples of random words (20 in the input, 500 in the output), the same for every bench."""
    import json
    import random
    rng = random.Random(0)
    words = [f"w{i}" for i in range(2000)] + ["the", "of", "and", "model", "token", "shard", "rank", "grad"]
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"input": " ".join(rng.choices(words, k=20)),
                                "output": " ".join(rng.choices(words, k=500))}) + "\n")


def hh_rlhf_file(path, sft):
    """examples/data/hh-rlhf's 600 pairs written to `path`: as SFT text lines of the chosen
    conversations (sft), else as they are (hh-rlhf {chosen, rejected} pairs)."""
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "data", "hh-rlhf",
                       "harmless-test-600.jsonl")
    with open(src) as f, open(path, "w") as out:
        for line in f:
            out.write(json.dumps({"text": json.loads(line)["chosen"].strip()}) + "\n" if sft else line)


def command_steps(build, command, args, steps, warmup, ranks=1):
    """Runs `aligner COMMAND ARGS... trainer.max_steps=steps` (on `ranks` GPUs under `aligner launch`)
    in a scratch output folder and reads its metrics.jsonl: (ms per step, tokens/s, peak GB) over
    steps warmup..steps, tokens being the non-pad tokens the steps processed (over all ranks)."""
    out = tempfile.mkdtemp(prefix=f"bench_{command}_")
    a = os.path.abspath(f"{build}/aligner")
    launch = [a, "launch", "--nproc-per-node", str(ranks), "--"] if ranks > 1 else []
    r = subprocess.run([*launch, a, command, *args, f"trainer.max_steps={steps}", "trainer.max_epochs=100",
                        "trainer.val_interval=0", "trainer.save_interval=0", f"output_dir={out}"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"aligner {command} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(l) for l in f if '"train"' in l]
    shutil.rmtree(out, ignore_errors=True)
    timed = rows[warmup:steps]
    step_s = sum(x["step_seconds"] for x in timed) / len(timed)
    tokens = sum(x["tokens_per_s"] * x["step_seconds"] for x in timed) / len(timed)
    return step_s * 1e3, tokens / step_s, max(x.get("peak_memory_gb", float("nan")) for x in timed)
