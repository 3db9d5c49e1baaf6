"""Where one SFT step's GPU time goes, by kernel family, from the torch profiler (Kineto) in aligner.

Run on the GPU machine after scripts/build_cuda.sh:  python3 scripts/profile_train.py [BUILD_DIR] [WHICH...]
  bench    bench/sft_bench's own step (1.1B TinyLlama shape, 8 x 2048 random tokens, rows of one length,
           so that cuDNN's attention takes them from the 9th step): steps 12..14 profiled, then 6 steps
           timed without the profiler, against which the kernels are set
  1b       the 1.1B TinyLlama shape on one GPU, 8 x 2048 packed tokens a step (`aligner sft`)
  1b-dp2   the same on each of 2 GPUs, data parallel (16 x 2048 a step)
  8b-tp2   the Llama-3-8B shape split over 2 GPUs (trainer.tensor_parallel=2), 4 x 4096 tokens a step in
           micro-batches of 2 (bench/tp_bench's step)
  8b-full  the Llama-3-8B shape with trainer.sharding=full on 2 GPUs, 4 x 4096 tokens per GPU a step in
           micro-batches of 2, activation checkpointing (bench/sharded_bench --8b's step); 8b-full-K: only
           the first K layers checkpointed (8b-full-0: none)
Rank 0 is profiled.
Each runs `aligner sft` for --steps steps with ALIGNER_PROFILE_STEPS=3:N (src/train/step_profiler.h),
which writes rank 0's kernels of steps 3..N as a Chrome trace; their times are summed per family
(GEMMs, attention, norms, loss, optimizer, NCCL, elementwise, copies) per step and set against the
mean step time of the same steps from metrics.jsonl: what the kernels do not cover is time the GPU
waits on the host (NCCL kernels overlapping compute on another stream are counted in full).
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
import tp_bench  # noqa: E402

# First match wins: names as cuBLAS(Lt), cuDNN, flash attention, ATen and NCCL give their kernels.
FAMILIES = [
    ("NCCL", r"nccl"),
    ("attention", r"flash|fmha|attention|attn|sdpa"),
    ("GEMM", r"gemm|cutlass|nvjet|xmma|sm90_|sm80_|cublas|splitK"),
    ("optimizer", r"multi_tensor|foreach|adam"),
    ("norm", r"rms|norm"),
    ("loss / softmax", r"softmax|logsumexp|nll|cross_entropy|log_softmax"),
    ("copy / cat / index", r"copy|cat|index|gather|scatter|embedding|fill"),
    ("elementwise / reduce", r"elementwise|vectorized|unrolled|reduce|silu|mul|add|rotary"),
]


def family(name):
    for fam, pattern in FAMILIES:
        if re.search(pattern, name, re.I):
            return fam
    return "other"


def kernel_sums(trace):
    """{family: total µs}, {kernel name: total µs} and {host event: (total µs, calls)} from a Chrome trace."""
    with open(trace) as f:
        events = json.load(f)["traceEvents"]
    by_family, by_name, host = {}, {}, {}
    for e in events:
        cat = e.get("cat", "")
        if cat in ("cpu_op", "cuda_runtime", "cuda_driver") and "dur" in e:
            key = f"{cat}: {e.get('name', '?')}"
            total, count = host.get(key, (0.0, 0))
            host[key] = (total + e["dur"], count + 1)
        if cat not in ("kernel", "gpu_memcpy", "gpu_memset") or "dur" not in e:
            continue
        name = e.get("name", "?")
        fam = family(name) if cat == "kernel" else "memcpy / memset"
        by_family[fam] = by_family.get(fam, 0.0) + e["dur"]
        by_name[name] = by_name.get(name, 0.0) + e["dur"]
    return by_family, by_name, host


def idle_gaps(trace, top=10, least_us=200):
    """The longest stretches in which no kernel, copy or fill runs, each with what the host was doing
    when it launched the work that ended it (the operators around that launch, outermost first)."""
    with open(trace) as f:
        events = json.load(f)["traceEvents"]
    gpu = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e),
                 key=lambda e: e["ts"])
    launches = {e["args"]["correlation"]: e["ts"] for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    ops = [e for e in events if e.get("cat") == "cpu_op" and "dur" in e]
    gaps, end = [], None
    for e in gpu:
        if end is not None and e["ts"] - end >= least_us:
            gaps.append((e["ts"] - end, e))
        end = max(end or 0, e["ts"] + e["dur"])
    total = sum(g for g, _ in gaps)
    print(f"idle stretches of {least_us} µs or more: {len(gaps)}, {total / 1e3:.1f} ms in all; the longest:")
    for g, e in sorted(gaps, key=lambda x: -x[0])[:top]:
        at = launches.get(e.get("args", {}).get("correlation"))
        around = sorted((o for o in ops if at is not None and o["ts"] <= at <= o["ts"] + o["dur"]),
                        key=lambda o: -o["dur"])
        calls = sorted((c for c in events if c.get("cat") in ("cuda_runtime", "cuda_driver") and "dur" in c
                        and c["ts"] < e["ts"] and c["ts"] + c["dur"] > e["ts"] - g), key=lambda c: -c["dur"])
        print(f"  {g / 1e3:6.2f} ms before {e.get('name', '?')[:50]}; host in: "
              + " > ".join(o["name"] for o in around[:6]) + "; CUDA calls meanwhile: "
              + ", ".join(f"{c['name']} {c['dur'] / 1e3:.2f} ms" for c in calls[:3]))


def report(name, trace, n, step_ms, what):
    """Prints the kernels of `n` profiled steps by family against a step of `step_ms`."""
    by_family, by_name, host = kernel_sums(trace)
    per_step = {k: v / 1e3 / n for k, v in by_family.items()}
    busy = sum(per_step.values())
    print(f"\n{name}: {step_ms:.0f} ms per step, {what}, GPU kernels {busy:.0f} ms a step")
    print("| kernels | ms per step | share of the step |")
    print("|---|---|---|")
    for fam, ms in sorted(per_step.items(), key=lambda kv: -kv[1]):
        print(f"| {fam} | {ms:.1f} | {100 * ms / step_ms:.1f}% |")
    print(f"| GPU idle (step minus kernels) | {max(0.0, step_ms - busy):.1f} | "
          f"{100 * max(0.0, step_ms - busy) / step_ms:.1f}% |")
    print("top kernels:")
    for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])[:40]:
        print(f"  {v / 1e3 / n:7.2f} ms  {k[:110]}")
    print("host: operators and CUDA calls by total time (nested ones counted in their callers too):")
    for k, (v, c) in sorted(host.items(), key=lambda kv: -kv[1][0])[:25]:
        print(f"  {v / 1e3 / n:8.2f} ms  {c / n:7.0f} calls  {k[:100]}")
    idle_gaps(trace)
    sys.stdout.flush()
    return per_step


def profile_bench(build, folder):
    """bench/sft_bench's step: steps 12..14 profiled (cuDNN's attention chosen by then), then 6 timed."""
    out = tempfile.mkdtemp(prefix="profile_bench_")
    env = {**os.environ, "ALIGNER_PROFILE_STEPS": "12:14", "ALIGNER_PROFILE_DIR": out}
    text = subprocess.run([os.path.join(build, "sft_bench"), folder, "8", "2048", "14", "6", "0"], env=env,
                          capture_output=True, text=True, timeout=600).stdout
    timed = json.loads(text.strip().splitlines()[-1])
    per_step = report("bench/sft_bench step, 1 GPU, 8 x 2048", os.path.join(out, "profile.rank-0.json"), 3,
                      timed["ms_per_step"], "timed without the profiler")
    shutil.rmtree(out, ignore_errors=True)
    return per_step


def profile(build, name, folder, data, ranks, extra, steps, micro, length):
    a = os.path.abspath(os.path.join(build, "aligner"))
    out = tempfile.mkdtemp(prefix="profile_train_")
    sft = ["sft", f"model.path={folder}", "model.device=cuda", "model.dtype=bfloat16", f"data.train={data}",
           "data.packing=true", f"data.max_length={length}", f"trainer.micro_batch_size={micro}",
           f"trainer.max_steps={steps + 1}", "optim.lr=1e-5", "optim.scheduler=constant", f"output_dir={out}/run",
           "trainer.val_interval=0", *extra]
    cmd = tp_bench.launched(a, sft, ranks)
    tp_bench.log(f"{name}: profiling steps 3..{steps}")
    metrics = os.path.join(out, "run", "metrics.jsonl")
    # Until a step after the profiled ones is logged: the trace is written by then.
    text, rows = tp_bench.run_until_logged(cmd, metrics, steps + 1, timeout=420,
                                           env={**os.environ, "ALIGNER_PROFILE_STEPS": f"3:{steps}"})
    if len(rows) <= steps:
        tp_bench.log(f"{name}: {len(rows)} steps logged\n{tp_bench.tail(text)}")
        return None
    memory = next((l.split("] ")[-1] for l in text.splitlines() if "memory per rank" in l), "")
    if memory:
        print(f"{name}: {memory}")
    timed = rows[2:steps]
    step_ms = 1e3 * sum(r["step_seconds"] for r in timed) / len(timed)
    tokens = sum(r["tokens_per_s"] * r["step_seconds"] for r in timed) / len(timed)
    per_step = report(name, os.path.join(out, "run", "profile.rank-0.json"), steps - 2, step_ms,
                      f"{tokens:,.0f} tokens a step")
    shutil.rmtree(out, ignore_errors=True)
    return per_step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("build", nargs="?", default="build-cuda")
    ap.add_argument("which", nargs="*", default=["1b", "8b-tp2"])
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    if {"bench", "1b", "1b-dp2"} & set(args.which):
        import torch
        from tinyllama import make_model
        model, folder = make_model(torch.bfloat16)
        del model
        torch.cuda.empty_cache()
        if "bench" in args.which:
            profile_bench(args.build, folder)
        tok = os.path.join(tp_bench.REPO, "tests", "fixtures", "tokenizers", "llama3-style-bpe6k")
        for f in os.listdir(tok):
            shutil.copy(os.path.join(tok, f), folder)
        data = os.path.join(folder, "sft_data.jsonl")
        tp_bench.sft_data_file(data)
        for ranks in (1, 2):
            if ("1b" if ranks == 1 else "1b-dp2") in args.which:
                profile(args.build, f"1.1B, {ranks} GPU, 8 x 2048 each", folder, data, ranks,
                        [f"trainer.global_batch_size={8 * ranks}"], args.steps, 8, 2048)
    eight = [w for w in args.which if w.startswith("8b")]
    if eight:
        folder = tp_bench.ensure_model("/tmp/tp_bench_llama3_8b")
        data = os.path.join(folder, "sft_data.jsonl")
        if not os.path.exists(data):
            tp_bench.sft_data_file(data)
    for w in eight:
        if w == "8b-tp2":
            profile(args.build, "8B, trainer.tensor_parallel=2, 4 x 4096", folder, data, 2,
                    ["trainer.tensor_parallel=2", "trainer.global_batch_size=4"], args.steps, 2, 4096)
        elif w.startswith("8b-full"):
            layers = w[len("8b-full-"):] or "null"
            profile(args.build, f"8B, trainer.sharding=full, 4 x 4096 per GPU, checkpointed layers: {layers}", folder,
                    data, 2, ["trainer.sharding=full", "trainer.global_batch_size=8",
                              f"model.activation_checkpointing={str(layers != '0').lower()}",
                              f"model.activation_checkpointing_layers={layers}"], args.steps, 2, 4096)

if __name__ == "__main__":
    main()
