"""Tensor parallelism on 2 GPUs (issue 16), a Llama-3-8B shape with random bf16 weights.

  --gen: 256 prompts x 128 random tokens, 256 new tokens each, sampled at temperature 1 without
         top-k or top-p (--greedy: argmax), EOS ignored so that every sequence runs its full length:
         transformers `generate` on 1 GPU (the baseline), `aligner generate` on 1 GPU, and
         `aligner generate --tensor-parallel 2` under `aligner launch` on 2. Each runs twice, to
         --new and to --short new tokens: the difference is --new minus --short decoding steps
         alone (no load, prefill, CUDA-graph capture or warm-up), whence the time per decoding
         step and the fraction of the memory-bandwidth bound. aligner's times are its own
         generate() times, read from the last "generated N/N completions, T tokens, R tok/s" line
         it logs (T / R: from the end of loading to the last token); model loading is left out.
         Bound: a decoding step reads every weight but the embedding table once (15.0 GB) and each
         sequence's KV cache (128 KiB a token), over 4.8 TB/s per H200 (HBM3e, the data sheet's;
         --bandwidth) times the GPUs the model is split over (TP=2 reads half of each on each GPU).
  --sft: SFT steps of 4 x 4096 packed tokens per rank (micro-batches of 2 x 4096) as
         bench/sharded_bench.py --8b runs them, trainer.tensor_parallel=2 against
         trainer.sharding=full on the same 2 GPUs, steps 3..7 timed from metrics.jsonl. With TP both
         ranks train on the same batch, so at equal micro-batches a step holds half the global
         tokens of a data-parallel one: global and per-GPU tokens/s are both shown, and MFU per GPU
         (6 x parameters besides the embedding x tokens plus causal attention, against 989 TFLOP/s
         of dense bf16; recomputation not counted). sharding=full runs with activation
         checkpointing (it needs it at 8B, sharded_bench); TP=2 with it (the like-for-like row)
         and without: a rank holds 4.0B parameters, 64 GB before activations (bf16 weights and
         gradients, float32 master weights and AdamW moments: 16 bytes a parameter), and about
         30 GB of activations for 2 x 4096 tokens without checkpointing, which fits in 141 GB.
         A run is stopped once its last step is logged (its final export of 16 GB is not timed).

Neither flag: both. The model is written once to --model-dir (/tmp/tp_bench_llama3_8b, seed 0,
16 GB) and reused. Every phase is on its own: a failure prints its output's end and the rest goes
on. About 7 minutes with the model written, 8 without.

Run on the 2-GPU machine after scripts/build_cuda.sh:  python3 bench/tp_bench.py [BUILD_DIR] [--gen] [--sft]
"""
import argparse
import gc
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tinyllama import LLAMA3_8B as CFG, sft_data_file  # noqa: E402

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PEAK = 989e12
KV_TOKEN = 2 * CFG.num_hidden_layers * CFG.num_key_value_heads * (CFG.hidden_size // CFG.num_attention_heads) * 2
T0 = time.time()
PORT = [29750]


def log(msg):
    print(f"[{time.time() - T0:5.0f} s] {msg}", flush=True)


def tail(text, lines=25):
    return "\n".join("    " + l for l in text.strip().splitlines()[-lines:])


def parameter_counts():
    """(all parameters, all but the embedding table) of CFG, untied."""
    h, i, v, L = CFG.hidden_size, CFG.intermediate_size, CFG.vocab_size, CFG.num_hidden_layers
    kv = CFG.num_key_value_heads * (h // CFG.num_attention_heads)
    layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    total = L * layer + h + 2 * v * h
    return total, total - v * h


def ensure_model(folder):
    """The random-weight 8B-shape folder, written once (seed 0) with a tokenizer whose ids it covers."""
    if os.path.exists(os.path.join(folder, ".complete")):
        log(f"model: reusing {folder}")
        return folder
    from transformers import LlamaForCausalLM
    shutil.rmtree(folder, ignore_errors=True)
    log(f"model: writing a random Llama-3-8B shape to {folder}")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(CFG, attn_implementation="sdpa", dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    tok = os.path.join(REPO, "tests", "fixtures", "tokenizers", "llama3-style-bpe6k")
    for f in os.listdir(tok):
        shutil.copy(os.path.join(tok, f), folder)
    open(os.path.join(folder, ".complete"), "w").close()
    log("model: written")
    return folder


def launched(a, args, ranks):
    if ranks == 1:
        return [a, *args]
    PORT[0] += 1
    return [a, "launch", "--nproc-per-node", str(ranks), "--master-port", str(PORT[0]), "--", a, *args]


# ---------------------------------------------------------------------------------------------------
# Generation


def decode_bound_s(args, batch, first, last, gpus):
    """Seconds the decoding steps that yield tokens first..last of `batch` sequences need at the
    memory-bandwidth bound: each reads the weights and P + t - 1 cached tokens per sequence."""
    weights = parameter_counts()[1] * 2
    steps = range(first, last + 1)
    read = sum(weights + batch * (args.prompt_len + t - 1) * KV_TOKEN for t in steps)
    return read / (args.bandwidth * gpus)


def hf_generate(args, folder, ids):
    """{new: seconds} of transformers generate on GPU 0 for --new and --short tokens, and the batch."""
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="sdpa",
                                             device_map={"": 0})
    model.eval()
    model.generation_config.eos_token_id = None  # every sequence to its full length, as aligner's
    ids = ids.cuda()
    sampling = {"do_sample": False} if args.greedy else {"do_sample": True, "temperature": 1.0, "top_k": 0,
                                                          "top_p": 1.0}

    def run(batch, new):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        tokens = 0
        for s in range(0, args.prompts, batch):
            x = ids[s:s + batch]
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new,
                                 pad_token_id=0, **sampling)
            tokens += out.shape[0] * (out.shape[1] - x.shape[1])
        torch.cuda.synchronize()
        assert tokens == args.prompts * new, (tokens, args.prompts * new)
        return time.perf_counter() - t0

    times, batch = {}, args.prompts
    try:
        with torch.no_grad():
            run(min(8, batch), 8)  # warm-up: kernels, cuBLAS handles, the allocator
            while True:
                try:
                    for new in (args.short, args.new):
                        times[new] = run(batch, new)
                    break
                except torch.OutOfMemoryError:
                    if batch == 1:
                        raise
                    batch //= 2
                    torch.cuda.empty_cache()
    finally:  # GPU 0 free for aligner's runs, whatever happened
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return times, batch


GENERATED = re.compile(r"generated (\d+)/(\d+) completions, ([\d,]+) tokens, ([\d,]+) tok/s")


def ours_generate(args, a, folder, prompts, tp, new):
    """Seconds of aligner's generate() for `new` tokens on `tp` GPUs (None on failure)."""
    out = os.path.join(tempfile.gettempdir(), f"tp_bench_gen_tp{tp}_{new}.jsonl")
    cmd = launched(a, ["generate", "--model", folder, "--data", prompts, "--out", out, "model.device=cuda",
                       "model.dtype=bfloat16", f"gen.max_new_tokens={new}", "gen.ignore_eos=true",
                       f"gen.greedy={str(args.greedy).lower()}", f"gen.batch_size={args.prompts}",
                       f"gen.prefill_tokens={args.prompts * args.prompt_len}", "gen.seed=1",
                       "--tensor-parallel", str(tp)], tp)
    t0 = time.perf_counter()
    p = subprocess.run(["timeout", "-s", "KILL", str(args.gen_timeout), *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    text = p.stdout + p.stderr
    lines = GENERATED.findall(text)
    if os.path.exists(out):
        os.remove(out)
    if p.returncode != 0 or not lines:
        log(f"aligner generate TP={tp}, {new} new tokens: exit {p.returncode}; its output ends:\n{tail(text)}")
        return None
    done, total, tokens, rate = lines[-1]
    tokens, rate = int(tokens.replace(",", "")), int(rate.replace(",", ""))
    if int(done) != int(total) or tokens != args.prompts * new:
        log(f"aligner generate TP={tp}: {tokens} tokens generated, expected {args.prompts * new}")
        return None
    seconds = tokens / rate
    log(f"aligner generate TP={tp}, {new} new tokens: generate() {seconds:.2f} s, process {wall:.1f} s")
    return seconds


def gen_phase(args, a, folder, results):
    ids = torch.randint(0, 6000, (args.prompts, args.prompt_len), generator=torch.Generator().manual_seed(0))
    prompts = os.path.join(folder, f"prompts_{args.prompts}x{args.prompt_len}.jsonl")
    with open(prompts, "w") as f:
        for row in ids.tolist():
            f.write(json.dumps({"input_ids": row}) + "\n")
    gen_tokens = args.prompts * args.new

    def record(name, gpus, batch, times):
        t_new, t_short = times[args.new], times[args.short]
        runs = -(-args.prompts // batch)  # batches one after another
        step_s = (t_new - t_short) / ((args.new - args.short) * runs)
        bound = decode_bound_s(args, batch, args.short + 1, args.new, gpus) / (args.new - args.short)
        r = dict(name=name, gpus=gpus, batch=batch, seconds=t_new, tps=gen_tokens / t_new, step_ms=step_s * 1e3,
                 decode_tps=batch / step_s, fraction=bound / step_s)
        results.append(r)
        log(f"{name}: {r['tps']:,.0f} tokens/s end to end ({t_new:.2f} s), {r['step_ms']:.2f} ms per decoding "
            f"step at batch {batch} ({r['decode_tps']:,.0f} tokens/s), {r['fraction']:.1%} of the {gpus}-GPU "
            f"bandwidth bound")

    try:
        log("transformers generate, 1 GPU")
        times, batch = hf_generate(args, folder, ids)
        record(f"transformers {__import__('transformers').__version__} generate (sdpa), 1 GPU", 1, batch, times)
    except Exception:  # noqa: BLE001 -- the baseline failing leaves aligner's rows
        log(f"transformers generate failed:\n{tail(traceback.format_exc())}")
    for tp in (1, 2):
        times = {args.short: ours_generate(args, a, folder, prompts, tp, args.short)}
        if times[args.short] is not None:  # a run that fails (or hangs) once is not tried again
            times[args.new] = ours_generate(args, a, folder, prompts, tp, args.new)
        if None not in times.values() and len(times) == 2:
            record("aligner generate, 1 GPU" if tp == 1 else "aligner generate --tensor-parallel 2, 2 GPUs",
                   tp, args.prompts, times)


def gen_table(args, results):
    if not results:
        return
    base = next((r for r in results if r["name"].startswith("transformers")), None)
    weights = parameter_counts()[1] * 2 / 1e9
    kv = args.prompts * (args.prompt_len + (args.short + args.new - 1) / 2) * KV_TOKEN / 1e9
    print(f"\ngeneration, Llama-3-8B shape bf16, {args.prompts} prompts x {args.prompt_len} tokens, {args.new} new "
          f"tokens each, {'greedy' if args.greedy else 'sampled at temperature 1'}, EOS ignored, "
          f"{torch.cuda.get_device_name()}")
    print(f"decoding steps {args.short + 1}..{args.new} ({args.new} minus {args.short} new tokens): each reads "
          f"{weights:.2f} GB of weights + {kv:.2f} GB of KV cache (mean), bound at {args.bandwidth / 1e12:.1f} TB/s "
          f"per GPU x GPUs")
    print("| impl | GPUs | batch | generate s | tokens/s | ms per decoding step | decoding tokens/s | "
          "fraction of bandwidth bound | vs transformers |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        vs = f"{r['tps'] / base['tps']:.2f}x" if base else "-"
        print(f"| {r['name']} | {r['gpus']} | {r['batch']} | {r['seconds']:.2f} | {r['tps']:,.0f} | "
              f"{r['step_ms']:.2f} | {r['decode_tps']:,.0f} | {r['fraction']:.1%} | {vs} |")
    one = next((r for r in results if r["name"] == "aligner generate, 1 GPU"), None)
    two = next((r for r in results if "tensor-parallel" in r["name"]), None)
    if one and two:
        print(f"TP=2 over 1 GPU: {two['tps'] / one['tps']:.2f}x end to end, "
              f"{one['step_ms'] / two['step_ms']:.2f}x per decoding step")
    print("(generate s: aligner's generate() from its log, transformers' calls; loading not included)")


# ---------------------------------------------------------------------------------------------------
# SFT

B, T, MB = 4, 4096, 2  # per rank per step: 4 x 4096 tokens in micro-batches of 2 x 4096


def train_rows(metrics):
    """The training rows of a metrics.jsonl being written (a line not finished yet is left out)."""
    rows = []
    with open(metrics) as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if r.get("split") == "train":
                rows.append(r)
    return rows


def run_until_logged(cmd, metrics, steps, timeout, env=None):
    """Runs `cmd` until `metrics` holds `steps` training rows (then kills it: a run's final export,
    16 GB at 8B, is not what is measured), it exits, or `timeout` s pass; (its output, the rows)."""
    fd, log_path = tempfile.mkstemp(suffix=".log")
    os.close(fd)
    t0 = time.perf_counter()
    rows = []
    with open(log_path, "w") as lf:
        p = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        while p.poll() is None and time.perf_counter() - t0 < timeout:
            time.sleep(2)
            if os.path.exists(metrics):
                rows = train_rows(metrics)
                if len(rows) >= steps:
                    break
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    with open(log_path) as f:
        text = f.read()
    os.remove(log_path)
    if os.path.exists(metrics):
        rows = train_rows(metrics)
    return text, rows


def ours_sft(args, a, folder, data, name, extra):
    """Runs one 2-GPU SFT until its last step is logged; (global tokens/s, peak GB, memory line)."""
    out = tempfile.mkdtemp(prefix="tp_bench_sft_")
    metrics = os.path.join(out, "metrics.jsonl")
    cmd = launched(a, ["sft", f"model.path={folder}", "model.device=cuda", "model.dtype=bfloat16",
                       f"data.train={data}", "data.packing=true", f"data.max_length={T}",
                       f"trainer.micro_batch_size={MB}", f"trainer.max_steps={args.steps}", "optim.lr=1e-5",
                       "optim.scheduler=constant", f"output_dir={out}", "trainer.val_interval=0", *extra], 2)
    t0 = time.perf_counter()
    text, rows = run_until_logged(cmd, metrics, args.steps, args.sft_timeout)
    shutil.rmtree(out, ignore_errors=True)
    if len(rows) < args.steps:
        log(f"{name}: {len(rows)} of {args.steps} steps logged in {time.perf_counter() - t0:.0f} s; its output "
            f"ends:\n{tail(text)}")
        return None
    timed = rows[args.warmup:args.steps]
    step_s = sum(r["step_seconds"] for r in timed) / len(timed)
    tokens = sum(r["tokens_per_s"] * r["step_seconds"] for r in timed) / len(timed)  # one model replica's step
    peak = max(r.get("peak_memory_gb", float("nan")) for r in timed)
    memory = next((l.split("] ")[-1] for l in text.splitlines() if "memory per rank" in l), "")
    log(f"{name}: {tokens / step_s:,.0f} tokens/s global, {step_s:.2f} s per step, peak {peak:.1f} GB "
        f"({time.perf_counter() - t0:.0f} s)")
    return tokens / step_s, peak, memory


def sft_phase(args, a, folder, results):
    data = os.path.join(folder, "sft_data.jsonl")
    if not os.path.exists(data):
        sft_data_file(data)
    runs = {
        "full": ("aligner trainer.sharding=full, checkpointing", 2,
                 ["trainer.sharding=full", f"trainer.global_batch_size={2 * B}",
                  "model.activation_checkpointing=true"]),
        "tp": ("aligner trainer.tensor_parallel=2, checkpointing", 1,
               ["trainer.tensor_parallel=2", f"trainer.global_batch_size={B}", "model.activation_checkpointing=true"]),
        "tp-nockpt": ("aligner trainer.tensor_parallel=2, no checkpointing", 1,
                      ["trainer.tensor_parallel=2", f"trainer.global_batch_size={B}",
                       "model.activation_checkpointing=false"]),
    }
    for key in args.sft_runs.split(","):
        if key not in runs:
            log(f"--sft-runs: unknown run '{key}' (full, tp, tp-nockpt)")
            continue
        name, replicas, extra = runs[key]
        try:
            r = ours_sft(args, a, folder, data, name, extra)
        except Exception:  # noqa: BLE001
            log(f"{name} failed:\n{tail(traceback.format_exc())}")
            r = None
        if r:
            results.append(dict(name=name, replicas=replicas, tps=r[0], peak=r[1], memory=r[2]))


def sft_table(results):
    if not results:
        return
    n_params = parameter_counts()[1]
    flops_per_token = 6 * n_params + 6 * CFG.num_hidden_layers * T * CFG.hidden_size
    base = next((r for r in results if "sharding=full" in r["name"]), None)
    print(f"\nSFT, Llama-3-8B shape ({n_params / 1e9:.1f}B parameters besides the embeddings), bf16 with float32 "
          f"master weights, 2 x {torch.cuda.get_device_name()}, {B} x {T} packed tokens per rank per step in "
          f"micro-batches of {MB}, torch {torch.__version__}")
    print("| impl | data-parallel replicas | global tokens/s | tokens/s per GPU | MFU | peak GB per GPU | vs full |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        per_gpu = r["tps"] / 2
        vs = f"{r['tps'] / base['tps']:.2f}x" if base else "-"
        print(f"| {r['name']} | {r['replicas']} | {r['tps']:,.0f} | {per_gpu:,.0f} | "
              f"{per_gpu * flops_per_token / PEAK:.1%} | {r['peak']:.1f} | {vs} |")
    for r in results:
        print(f"  {r['name']}: {r['memory']}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("build", nargs="?", default="build-cuda")
    ap.add_argument("--gen", action="store_true", help="the generation phase (neither flag: both)")
    ap.add_argument("--sft", action="store_true", help="the SFT phase")
    ap.add_argument("--model-dir", default="/tmp/tp_bench_llama3_8b")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--short", type=int, default=32, help="new tokens of the run subtracted (prefill, setup)")
    ap.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    ap.add_argument("--bandwidth", type=float, default=4.8e12, help="bytes/s per GPU (H200 HBM3e: 4.8e12)")
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2, help="SFT steps not timed")
    ap.add_argument("--sft-runs", default="full,tp,tp-nockpt")
    ap.add_argument("--gen-timeout", type=int, default=150, help="seconds one aligner generate may take")
    ap.add_argument("--sft-timeout", type=float, default=180, help="seconds one SFT run may take")
    args = ap.parse_args()
    if not args.gen and not args.sft:
        args.gen = args.sft = True
    if not 0 < args.short < args.new or args.warmup >= args.steps:
        sys.exit("need 0 < --short < --new and --warmup < --steps")
    a = os.path.abspath(os.path.join(args.build, "aligner"))
    if not os.path.exists(a):
        sys.exit(f"no {a}: run scripts/build_cuda.sh first")
    folder = ensure_model(args.model_dir)
    gen, sft = [], []
    for wanted, phase, out in ((args.gen, gen_phase, gen), (args.sft, sft_phase, sft)):
        if not wanted:
            continue
        try:
            phase(args, a, folder, out)
        except Exception:  # noqa: BLE001 -- one phase failing leaves the other's results
            log(f"{phase.__name__} failed:\n{tail(traceback.format_exc())}")
    gen_table(args, gen)
    sft_table(sft)
    log("done")


if __name__ == "__main__":
    main()
