"""Sharded data parallel on 2 GPUs: full SFT, bf16 compute with float32 master weights and AdamW
moments, against PyTorch FSDP2 (fully_shard per layer, MixedPrecisionPolicy bf16 parameters,
float32 reductions, torch AdamW) in the same run.
  default: a 1.1B Llama (TinyLlama shape), 8 x 2048 tokens per GPU per step, aligner's
           trainer.sharding none | optimizer | gradients | full;
  --8b:    a Llama-3-8B shape, 4 x 4096 tokens per GPU per step in two micro-batches, activation
           checkpointing in both (FSDP2 needs it to fit), trainer.sharding=full (the others do not
           fit); and aligner's run again without checkpointing, which its memory allows;
  --largest: a Llama-2-13B shape (13.0B parameters) with trainer.sharding=full and checkpointing,
           aligner alone: the largest common shape whose full fine-tuning fits 2 H200s.

  --ckpt:  the 1.1B model in two micro-batches with checkpointing, as the 8B; sharding none | full.

Run on the 2-GPU machine after scripts/build_cuda.sh:  python3 bench/sharded_bench.py [BUILD_DIR] [--8b | --ckpt]
Prints tokens/s per GPU, MFU (6 x parameters x tokens plus causal attention, against 989 TFLOP/s)
and peak memory per GPU, steps 3..8 timed (aligner: its metrics.jsonl; FSDP2: wall clock).
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tp_bench import run_until_logged  # noqa: E402
from tinyllama import CONFIG, LLAMA2_13B, LLAMA3_8B, add_tokenizer, make_8b, make_model, sft_data_file  # noqa: E402

LARGEST = "--largest" in sys.argv
BIG = "--8b" in sys.argv or LARGEST
# --ckpt: the 1.1B model run as the 8B one is (two micro-batches of 8192 tokens, activation
# checkpointing; 2048 is its context), to tell the cost of recomputation from that of size.
CKPT = BIG or "--ckpt" in sys.argv
CFG = LLAMA2_13B if LARGEST else LLAMA3_8B if BIG else CONFIG
B, T = (4, 4096) if BIG else (8, 2048)
# Micro-batch: at 8B, 4 x 4096 tokens' float32 logits (8 GB, and their gradient) do not fit beside
# FSDP2's shards, so both accumulate two micro-batches of 2 x 4096.
MB = B // 2 if CKPT else B
STEPS, WARMUP, PEAK = 8, 2, 989e12
# (sharding, activation checkpointing) of aligner's rows.
RUNS = ([("full", True)] if LARGEST else [("full", True), ("full", False)] if BIG else
        [("none", True), ("full", True)] if CKPT else [(s, False) for s in ("none", "optimizer", "gradients", "full")])


def fsdp_worker(rank, folder, port, result):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import LlamaForCausalLM
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=2)
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa",
                                             device_map={"": rank})
    if CKPT:
        model.gradient_checkpointing_enable()
    mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp_policy)
    fully_shard(model, mp_policy=mp_policy)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
    ids = torch.randint(0, CFG.vocab_size, (B, T), device="cuda", generator=torch.Generator("cuda").manual_seed(rank))
    times = []
    for step in range(STEPS):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(0, B, MB):
            loss = model(input_ids=ids[i:i + MB], labels=ids[i:i + MB]).loss * (MB / B)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if step == WARMUP - 1:
            torch.cuda.reset_peak_memory_stats()
    if rank == 0:
        result.put((sum(times[WARMUP:]) / (STEPS - WARMUP), torch.cuda.max_memory_allocated() / 1e9))
    dist.destroy_process_group()


def ours(build, folder, data, sharding, ckpt, port):
    out = tempfile.mkdtemp(prefix="shard_bench_")
    a = os.path.abspath(os.path.join(build, "aligner"))
    cmd = [a, "launch", "--nproc-per-node", "2", "--master-port", str(port), "--", a, "sft", f"model.path={folder}",
           "model.device=cuda", "model.dtype=bfloat16", f"data.train={data}", "data.packing=true",
           f"data.max_length={T}", f"trainer.micro_batch_size={MB}", f"trainer.global_batch_size={2 * B}",
           f"trainer.max_steps={STEPS}", "optim.lr=1e-5", "optim.scheduler=constant", f"trainer.sharding={sharding}",
           f"output_dir={out}", "trainer.val_interval=0", f"model.activation_checkpointing={str(ckpt).lower()}"]
    metrics = os.path.join(out, "metrics.jsonl")
    text, rows = run_until_logged(cmd, metrics, STEPS, timeout=600)
    rows = rows[WARMUP:STEPS]
    shutil.rmtree(out, ignore_errors=True)
    if len(rows) < STEPS - WARMUP:
        sys.exit(f"aligner sharding={sharding} failed:\n{text[-3000:]}")
    memory = next((l for l in text.splitlines() if "memory per rank" in l), "")
    step_s = sum(r["step_seconds"] for r in rows) / len(rows)
    tokens = sum(r["tokens_per_s"] * r["step_seconds"] for r in rows) / len(rows)  # per step, both GPUs
    return tokens / 2 / step_s, max(r["peak_memory_gb"] for r in rows), memory.split("] ")[-1]


def add_bpe_tokenizer(folder):
    """A tokenizer whose pieces the 8B shape's vocabulary covers."""
    tok = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "tokenizers",
                       "llama3-style-bpe6k")
    for f in os.listdir(tok):
        shutil.copy(os.path.join(tok, f), folder)


def main():
    build = next((a for a in sys.argv[1:] if not a.startswith("--")), "build-cuda")
    model, folder = make_8b(CFG) if BIG else make_model(torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters()) - CFG.vocab_size * CFG.hidden_size
    del model
    torch.cuda.empty_cache()
    add_bpe_tokenizer(folder) if BIG else add_tokenizer(folder)
    data = os.path.join(folder, "data.jsonl")
    sft_data_file(data)
    flops_per_token = 6 * n_params + 6 * CFG.num_hidden_layers * T * CFG.hidden_size
    shape = "Llama-2-13B shape" if LARGEST else "Llama-3-8B shape" if BIG else "1.1B Llama"
    print(f"\nSFT, {shape} ({n_params / 1e9:.1f}B parameters besides the "
          f"embeddings), 2 x {torch.cuda.get_device_name()}, {B} x {T} tokens per GPU per step, "
          f"torch {torch.__version__}")
    print("| impl | tokens/s per GPU | MFU | peak GB per GPU | vs FSDP2 |")
    print("|---|---|---|---|---|", flush=True)
    result = mp.get_context("spawn").SimpleQueue()
    try:
        if LARGEST:
            raise RuntimeError("not run at this size")
        mp.spawn(fsdp_worker, args=(folder, 29700, result), nprocs=2)
        fsdp_s, fsdp_peak = result.get()
        fsdp_tps = B * T / fsdp_s
    except Exception as e:  # noqa: BLE001 -- a baseline that does not fit is a result too
        print(f"| PyTorch FSDP2 | failed: {str(e).splitlines()[-1][:120]} | | | |", flush=True)
        fsdp_tps, fsdp_peak = float("nan"), float("nan")
    # Each row as soon as it is measured, so that a run cut short still says what it found.
    row = lambda name, tps, peak: print(f"| {name} | {tps:,.0f} | {tps * flops_per_token / PEAK:.1%} | {peak:.1f} | " +
                                        (f"{tps / fsdp_tps:.2f}x" if fsdp_tps == fsdp_tps else "-") + " |", flush=True)
    if fsdp_tps == fsdp_tps:
        row(f"PyTorch FSDP2 (fully_shard, bf16 mixed precision{', checkpointing' if CKPT else ''})", fsdp_tps, fsdp_peak)
    for i, (sharding, ckpt) in enumerate(RUNS):
        tps, peak, memory = ours(build, folder, data, sharding, ckpt, 29710 + i)
        row(f"aligner trainer.sharding={sharding}{', checkpointing' if ckpt else ''}", tps, peak)
        print(f"  ({memory})", flush=True)


if __name__ == "__main__":
    main()
