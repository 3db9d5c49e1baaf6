"""DPO steps of a 1.1B Llama (TinyLlama shape), bf16, 8 pairs of 1024 tokens per step: aligner vs
transformers doing it the way TRL's DPOTrainer does.

Run on the GPU machine after scripts/build_cuda.sh:  python3 bench/dpo_bench.py [BUILD_DIR]
The same work per step: 8 chosen and 8 rejected rows of 1024 tokens (a 256-token prompt shared by
each pair, the loss on the 768 response tokens), the frozen reference's forward pass, the policy's
forward and backward over all 16 rows in one concatenated batch, the sigmoid DPO loss (beta 0.1),
global-norm clipping at 1.0 and AdamW. transformers runs as TRL with bf16=True: float32 weights
under bf16 autocast, the reference a deep copy of the policy, log-probs of the labels from the full
logits row by row (TRL's selective_log_softmax), torch.optim.AdamW (foreach). aligner keeps bf16
weights with float32 master weights and moments, and projects only the response positions onto the
vocabulary. A third row is aligner's default, dpo.cache_reference=true: the reference's log-probs
computed once before training, so a step is the policy's work alone. MFU counts the model FLOPs of
the work done (policy: 6 x parameters x tokens plus causal attention, 6 x layers x seq x hidden per
token; reference forward: a third of that) against 989 TFLOP/s.
"""
import copy
import json
import os
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F
from tinyllama import CONFIG, add_tokenizer, command_steps, hh_rlhf_file, make_model, time_steps

PAIRS, T, PROMPT, BETA, WARMUP, ITERS = 8, 1024, 256, 0.1, 2, 6
PEAK = 989e12


def label_logprobs(logits, labels):
    """log p(label) per position, one row at a time for bf16 logits (as TRL's selective_log_softmax)."""
    rows = []
    for row_logits, row_labels in zip(logits, labels):
        logp = F.log_softmax(row_logits, dim=-1)  # float32 under autocast
        rows.append(logp.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1))
    return torch.stack(rows)


def sequence_logprobs(model, ids, labels, mask):
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    return (label_logprobs(logits, labels.clamp_min(0)) * mask).sum(-1)


def main():
    build = next((a for a in sys.argv[1:] if not a.startswith("--")), "build-cuda")
    cfg = CONFIG
    policy, d = make_model(torch.float32)
    policy.train()
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in policy.parameters()) - cfg.vocab_size * cfg.hidden_size  # no embedding lookup
    tokens = 2 * PAIRS * T
    policy_flops = tokens * (6 * n_params + 6 * cfg.num_hidden_layers * T * cfg.hidden_size)
    step_flops = {"model": policy_flops * 4 / 3, "cached": policy_flops}

    ids = torch.randint(0, cfg.vocab_size, (2 * PAIRS, T), device="cuda")
    ids[PAIRS:, :PROMPT] = ids[:PAIRS, :PROMPT]
    labels = torch.full_like(ids, -100)
    labels[:, PROMPT - 1:T - 1] = ids[:, PROMPT:]
    mask = (labels != -100).float()
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6, betas=(0.9, 0.95), weight_decay=0.0)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            with torch.no_grad():
                ref = sequence_logprobs(reference, ids, labels, mask)
            pi = sequence_logprobs(policy, ids, labels, mask)
            logits = (pi[:PAIRS] - ref[:PAIRS]) - (pi[PAIRS:] - ref[PAIRS:])
            loss = -F.logsigmoid(BETA * logits).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    hf_s, hf_peak = time_steps(step, WARMUP, ITERS)
    del policy, reference, opt
    torch.cuda.empty_cache()

    hf_pps = PAIRS / hf_s
    rows = [(f"transformers {__import__('transformers').__version__} (TRL-style) + torch AdamW", hf_s * 1e3, hf_pps,
             step_flops["model"] * hf_pps / PAIRS, hf_peak)]
    for reference_mode, name in [("model", "aligner, reference model"), ("cached", "aligner, cached reference")]:
        out = subprocess.run([f"{build}/dpo_bench", d, str(PAIRS), str(T), str(PROMPT), str(WARMUP), str(ITERS),
                              reference_mode], check=True, capture_output=True, text=True).stdout
        ours = json.loads(out.strip().splitlines()[-1])
        pps = ours["pairs_per_s"]
        rows.append((name, ours["ms_per_step"], pps, step_flops[reference_mode] * pps / PAIRS, ours["peak_gb"]))
    print(f"\nDPO step, 1.1B Llama bf16, {PAIRS} pairs x {T} tokens ({PROMPT}-token prompts), "
          f"{torch.cuda.get_device_name()}")
    print("| impl | ms/step | pairs/s | MFU | peak GB | vs transformers |")
    print("|---|---|---|---|---|---|")
    for name, ms, pps, flops_per_s, peak in rows:
        print(f"| {name} | {ms:.0f} | {pps:.2f} | {flops_per_s / PEAK:.1%} | {peak:.1f} | {pps / hf_pps:.2f}x |")

    # The command itself on real pairs of mixed lengths (hh-rlhf, Llama 2's tokenizer), 8 pairs a step
    # with the cached reference: one row per pair, padded to the longest, against the responses
    # packed into rows of 1024 tokens (data.packing).
    add_tokenizer(d)
    data = os.path.join(tempfile.mkdtemp(prefix="dpo_bench_data_"), "hh.jsonl")
    hh_rlhf_file(data, sft=False)
    print(f"\n`aligner dpo` on hh-rlhf pairs, 1.1B bf16, {PAIRS} pairs a step, cached reference")
    print("| batches | ms/step | pairs/s | useful tokens/s | peak GB |")
    print("|---|---|---|---|---|")
    for packing in ("false", "true"):
        ms, tps, peak = command_steps(build, "dpo", [
            f"model.path={d}", "model.device=cuda", "model.dtype=bfloat16", f"data.train={data}",
            f"data.packing={packing}", f"data.max_length={T}", "data.skip_bad_lines=true",
            f"trainer.micro_batch_size={PAIRS}",
            f"trainer.global_batch_size={PAIRS}", "optim.lr=1e-6", "optim.scheduler=constant",
            "optim.warmup_steps=0"], steps=14, warmup=4)
        print(f"| {'packed' if packing == 'true' else 'padded'} | {ms:.0f} | {PAIRS / ms * 1e3:.2f} | {tps:,.0f} | "
              f"{peak:.1f} |", flush=True)


if __name__ == "__main__":
    main()
