"""LoRA checks on the GPU machine, after scripts/build_cuda.sh: aligner against PEFT on a small
random-weight Llama (Llama 2's tokenizer) with a random PEFT adapter (init_lora_weights=False, so B
is not zero), all seeds fixed.

  python3 scripts/gpu_lora_check.py [BUILD_DIR]

- `aligner perplexity --adapter` against PeftModel, per-sequence log-probs of 8 random sequences:
  float32 within 1e-3; bf16 held to gpu_check.py's rule against PEFT's own bf16 run (PEFT keeps
  the adapters in float32): |ours_bf16 - fp32| <= 2 * |peft_bf16 - fp32| + 0.05 per sequence.
- `aligner merge-lora`, loaded by transformers, against PeftModel: float32 within 1e-3.
- greedy `aligner generate --adapter` against `aligner generate` of the merged folder, 32 new
  tokens: float32 the same tokens and log-probs within 1e-4; bf16 reported only.
- `aligner sft` with lora.rank=8 (bf16): PeftModel.from_pretrained loads its final/ with the
  log-probs aligner gives it (float32, 1e-3); PEFT's adapter folder works as lora.from.
The table of checks comes last; the exit status is 1 when any check fails.
"""
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

BUILD = sys.argv[1] if len(sys.argv) > 1 else "build-cuda"
TOKENIZER = "tests/fixtures/tokenizers/llama2/tokenizer.model"
SFT_SOURCE = "examples/data/code-alpaca/code-alpaca-300.jsonl"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIG = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                     num_key_value_heads=4, vocab_size=32000, max_position_embeddings=512, rms_norm_eps=1e-5,
                     tie_word_embeddings=False)
W = tempfile.mkdtemp(prefix="lora_check_")
BASE, ADAPTER, MERGED = (os.path.join(W, n) for n in ("base", "adapter", "merged"))
SEQS, PROMPTS, SFT = (os.path.join(W, n) for n in ("seqs.jsonl", "prompts.jsonl", "sft.jsonl"))
rng = random.Random(0)
SEQ_IDS = [[rng.randrange(CONFIG.vocab_size) for _ in range(rng.randint(16, 96))] for _ in range(8)]
PROMPT_IDS = [[rng.randrange(3, CONFIG.vocab_size) for _ in range(rng.randint(8, 24))] for _ in range(4)]
rows = []  # (check, measured, tolerance, passed)


def write_jsonl(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def aligner(*args):
    p = subprocess.run([os.path.join(BUILD, "aligner"), *args], capture_output=True, text=True)
    if p.returncode != 0:
        print(" ".join(["aligner", *args]) + "\n" + "\n".join(p.stderr.strip().splitlines()[-15:]))
        raise RuntimeError(f"aligner {args[0]} exited with status {p.returncode}")
    return p.stdout


def ours(dtype, adapter=None, model=BASE):
    args = ["perplexity", "--model", model, "--data", SEQS, "--dtype", dtype, "--device", "cuda", "--batch-size", "8"]
    out = aligner(*args, *(["--adapter", adapter] if adapter else []))
    return [r["logprob"] for r in map(json.loads, out.splitlines()) if "index" in r]


def hf(dtype, adapter=None, folder=BASE):
    """Per-sequence log-probs of SEQ_IDS under transformers (with the PEFT adapter, if given)."""
    m = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").cuda()
    if adapter:
        m = PeftModel.from_pretrained(m, adapter)
    m.eval()
    res = []
    with torch.no_grad():
        for ids in SEQ_IDS:
            x = torch.tensor([ids], device="cuda")
            lp = torch.log_softmax(m(input_ids=x).logits[0].float(), -1)
            res.append(float(lp[:-1].gather(1, x[0, 1:, None]).sum()))
    return res


def generate(dtype, model, adapter=None):
    """(output_ids, logprobs) per prompt of greedy `aligner generate`, 32 new tokens each."""
    fd, out = tempfile.mkstemp(dir=W, suffix=".jsonl")
    os.close(fd)
    aligner("generate", "--model", model, "--data", PROMPTS, "--out", out, "--device", "cuda", "--dtype", dtype,
            "gen.max_new_tokens=32", "gen.temperature=0", "gen.ignore_eos=true",
            *(["--adapter", adapter] if adapter else []))
    res = sorted(map(json.loads, open(out)), key=lambda r: r["prompt_index"])
    return [r["output_ids"] for r in res], [r["logprobs"] for r in res]


def max_diff(a, b):
    return max(abs(x - y) for x, y in zip(a, b))


def setup():
    torch.manual_seed(0)
    LlamaForCausalLM(CONFIG).to(torch.float32).save_pretrained(BASE)
    shutil.copy(TOKENIZER, BASE)  # as bench/tinyllama.py add_tokenizer: generate and sft read it
    torch.manual_seed(1)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32),
                          LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0,
                                     init_lora_weights=False))
    peft.save_pretrained(ADAPTER, safe_serialization=True)
    write_jsonl(SEQS, [{"input_ids": ids} for ids in SEQ_IDS])
    write_jsonl(PROMPTS, [{"input_ids": ids} for ids in PROMPT_IDS])
    write_jsonl(SFT, [json.loads(line) for line in list(open(SFT_SOURCE))[:64]])  # {"input", "output"}


def check_perplexity():
    ref, base = hf(torch.float32, ADAPTER), ours("float32")
    d = max_diff(base, ref)
    rows.append(("the adapter changes the log-probs (base vs PeftModel)", f"{d:.2f}", "> 0.01", d > 0.01))
    e = max_diff(ours("float32", ADAPTER), ref)
    rows.append(("perplexity --adapter vs PeftModel, fp32", f"{e:.2e}", "1e-3", e <= 1e-3))
    eh = [abs(a - b) for a, b in zip(hf(torch.bfloat16, ADAPTER), ref)]
    eo = [abs(a - b) for a, b in zip(ours("bfloat16", ADAPTER), ref)]
    rows.append(("perplexity --adapter bf16, error vs PeftModel fp32", f"ours {max(eo):.3f}, peft bf16 {max(eh):.3f}",
                 "ours <= 2 x peft + 0.05 per seq", all(o <= 2 * h + 0.05 for o, h in zip(eo, eh))))
    aligner("merge-lora", "--base", BASE, "--adapter", ADAPTER, "--out", MERGED, "--dtype", "float32")
    e = max_diff(hf(torch.float32, folder=MERGED), ref)
    rows.append(("merge-lora loaded by transformers vs PeftModel, fp32", f"{e:.2e}", "1e-3", e <= 1e-3))


def check_generate():
    for dtype in ["float32", "bfloat16"]:
        ids_a, lp_a = generate(dtype, BASE, ADAPTER)
        ids_m, lp_m = generate(dtype, MERGED)
        same = sum(a == m for a, m in zip(ids_a, ids_m))
        e = max(max_diff(a, m) for a, m in zip(lp_a, lp_m))
        name = f"generate --adapter vs merged, greedy {dtype}"
        if dtype == "float32":
            rows.append((name, f"{same}/{len(ids_a)} identical, log-prob diff {e:.1e}", "all identical, 1e-4",
                         same == len(ids_a) and e <= 1e-4))
        else:
            rows.append((name, f"{same}/{len(ids_a)} identical", "reported only", True))


def check_sft():
    out = os.path.join(W, "sft")
    common = [f"model.path={BASE}", "model.device=cuda", "model.dtype=bfloat16", f"data.train={SFT}",
              "data.max_length=128", "trainer.micro_batch_size=4", "optim.scheduler=constant"]
    aligner("sft", *common, "trainer.max_steps=4", "trainer.global_batch_size=8", "optim.lr=1e-3", "lora.rank=8",
            "lora.alpha=16", "lora.target_modules=[all-linear]", f"output_dir={out}")
    final = os.path.join(out, "final")
    b = max(t.abs().max().item() for k, t in load_file(os.path.join(final, "adapter_model.safetensors")).items()
            if "lora_B" in k)
    e = max_diff(ours("float32", final), hf(torch.float32, final))
    rows.append(("sft final/: perplexity --adapter vs PeftModel.from_pretrained, fp32", f"{e:.2e} (max abs B {b:.1e})",
                 "1e-3, B trained", e <= 1e-3 and b > 0))


def check_lora_from():
    aligner("sft", f"model.path={BASE}", "model.device=cuda", "model.dtype=bfloat16", f"data.train={SFT}",
            "data.max_length=128", "trainer.micro_batch_size=4", "trainer.global_batch_size=4",
            "trainer.max_steps=1", f"lora.from={ADAPTER}", f"output_dir={os.path.join(W, 'sft-from')}")
    rows.append(("sft lora.from=<PEFT's adapter folder>, 1 step", "exit 0", "exit 0", True))


def main():
    setup()
    for name, check in [("perplexity / merge-lora", check_perplexity), ("generate", check_generate),
                        ("sft", check_sft), ("sft lora.from", check_lora_from)]:
        try:
            check()
        except Exception as e:  # a failed command fails its check; the others still run
            rows.append((name, f"error: {e}".replace("|", "/")[:160], "-", False))
    ok = all(r[3] for r in rows)
    print("\n| check | measured | tolerance | pass |\n|---|---|---|---|")
    for name, measured, tol, passed in rows:
        print(f"| {name} | {measured} | {tol} | {'yes' if passed else 'NO'} |")
    print("GPU LORA CHECK", "PASSED" if ok else f"FAILED (files kept in {W})")
    if ok:
        shutil.rmtree(W, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
