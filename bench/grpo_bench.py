"""One GRPO iteration of a 1.1B policy (TinyLlama shape), bf16, with a rule reward: aligner vs
transformers doing it the way TRL's GRPOTrainer does.

Run on the GPU machine after scripts/build_cuda.sh:  python3 bench/grpo_bench.py [BUILD_DIR] [--gen-batch=N]
The same work per iteration: 64 prompts of 128 random tokens, 8 responses to each (512 in all) of
256 new tokens sampled at temperature 1 without top-k or top-p, EOS never ending a sequence; each
response decoded and scored by a rule against its prompt line's answer: 1 when the last lowercase
ASCII letter of the text is "e", else 0 (aligner's reward.rule=regex, reward.pattern=([a-z]): the
last match's group 1, trimmed, is the answer). On the text of uniformly random ids that pays about
13%, so most groups of 8 have rewards to tell apart; the last digit against "7" (([0-9])) pays about
1.5%, and nearly every group would be all zeros. Then GRPO advantages, (reward - group mean) /
(group std + 1e-4); the reference's log-probs; one update over all 512 responses in micro-batches of
16 (gradients accumulated): per token the clipped surrogate max(-A ratio, -A clip(ratio, 0.8, 1.2))
plus 0.04 x the k3 estimate of KL to the reference, averaged over each response and then over the
responses, clipping at 1.0, one AdamW step (lr 1e-6). transformers runs as TRL's GRPOTrainer with
bf16=True, num_iterations=1 and loss_type "grpo" (the sequence mean, aligner's
reinforce.loss_aggregation=auto for grpo): float32 weights under bf16 autocast, the reference a deep
copy of the policy, each prompt repeated 8 times and the 512 sequences sampled by generate() in one
call (TRL's default generation batch is one optimizer step's sequences; --gen-batch=64 makes 8 calls
of 64, as a smaller generation batch would), the reference's forward passes in batches of 16
(per_device_train_batch_size), log-probs of the labels from the logits of the response positions
only (logits_to_keep), row by row (selective_log_softmax), the old log-probs the current ones
detached (TRL computes none with num_iterations=1), the responses decoded by the folder's tokenizer
(batch_decode, skip_special_tokens; where transformers cannot load it, the sentencepiece package,
else the tokenizer.model read by this script: the output names which) and scored by the same rule in
Python, one torch.optim.AdamW (foreach) step. Not as TRL's defaults: no gradient checkpointing
(GRPOConfig turns it on; aligner runs without), no entropy for logging. aligner runs its real
`aligner reinforce` command (reinforce.advantage=grpo) on the same weights and prompts and reports
its own timings in metrics.jsonl; its reference lives in host memory between its passes
(reference.offload=auto), so its peak leaves out the reference's weights that transformers' counts.
Times are per iteration, split into generation, inference (decoding and the reward, the advantages
and the reference's log-probs) and training.
"""
import copy
import gc
import json
import os
import random
import re
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tokenizer comes from the model folder, never a hub

import torch
from dpo_bench import label_logprobs
from tinyllama import run_online, CONFIG, add_tokenizer, make_model

N, G, P, NEW = 64, 8, 128, 256  # prompts, samples per prompt, prompt tokens, new tokens each
B = N * G  # responses per iteration
MICRO = 16  # micro-batch and reference forward batch (sequences); one optimizer step over all B
BETA, CLIP, TEMPERATURE, LR = 0.04, 0.2, 1.0, 1e-6
PATTERN, ANSWER = "([a-z])", "e"  # the rule: the last match's group 1, trimmed, equals the answer
WARMUP, ITERS = 1, 2  # transformers: untimed and timed iterations
ALIGNER_STEPS = 4  # aligner's step 1 is its warm-up (CUDA graph capture, allocator growth): 2..4 timed


def rule_reward(text):
    """aligner's reward.rule=regex: 1 when PATTERN's last match in `text` (its group 1) is ANSWER, both trimmed."""
    matches = re.findall(PATTERN, text)
    return 1.0 if matches and matches[-1].strip() == ANSWER.strip() else 0.0


def _varint(buf, i):
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _protobuf_fields(buf):
    """(field number, value) of each field of a serialized protobuf message: ints for varints, else bytes."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"protobuf wire type {wire}")
        yield number, value


class PieceDecoder:
    """SentencePiece's decoding, from the pieces of a tokenizer.model read here (ModelProto field 1; in
    each piece, field 1 the text and 3 the type): control pieces give nothing, <unk> " \u2047 ", byte
    pieces <0xXX> their byte, U+2581 a space; the leading space of the first piece (the dummy prefix)
    goes, and bytes that are not UTF-8 become U+FFFD."""

    NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6

    def __init__(self, path):
        with open(path, "rb") as f:
            buf = f.read()
        self.pieces, self.is_byte = [], []
        for number, value in _protobuf_fields(buf):
            if number != 1:
                continue
            fields = dict(_protobuf_fields(value))
            piece, kind = fields[1].decode("utf-8"), fields.get(3, self.NORMAL)
            if kind == self.BYTE:
                self.pieces.append(bytes([int(piece[3:5], 16)]))
            elif kind == self.CONTROL:
                self.pieces.append(b"")
            elif kind == self.UNKNOWN:
                self.pieces.append(" \u2047 ".encode())
            else:
                self.pieces.append(piece.replace("\u2581", " ").encode())
            self.is_byte.append(kind == self.BYTE)
        if not self.pieces:
            raise ValueError(f"{path}: no pieces")

    def decode(self, ids):
        parts = [self.pieces[i] for i in ids if 0 <= i < len(self.pieces)]
        first = next((i for i in ids if 0 <= i < len(self.pieces) and self.pieces[i]), None)
        if first is not None and not self.is_byte[first] and self.pieces[first].startswith(b" "):
            k = next(k for k, p in enumerate(parts) if p)
            parts[k] = parts[k][1:]
        return b"".join(parts).decode("utf-8", errors="replace")


def pick_decoder(folder):
    """(its name, decode(lists of ids) -> texts): the folder's tokenizer through transformers, as TRL's
    processing_class; else the sentencepiece package on its tokenizer.model; else that file read here."""
    model_file = os.path.join(folder, "tokenizer.model")
    failed = []
    try:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        probe = tok.batch_decode([[450, 4996, 17354]], skip_special_tokens=True)
        if not (isinstance(probe, list) and isinstance(probe[0], str)):
            raise ValueError(f"batch_decode gave {probe!r}")
        return (f"transformers {type(tok).__name__}.batch_decode",
                lambda ids: tok.batch_decode(ids, skip_special_tokens=True), failed)
    except Exception as e:  # noqa: BLE001 - any failure to load or decode means the next way
        failed.append(f"transformers: {type(e).__name__}: {' '.join(str(e).split())[:200]}")
    try:
        import sentencepiece
        sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        return "sentencepiece.decode", lambda ids: [sp.decode(row) for row in ids], failed
    except Exception as e:  # noqa: BLE001
        failed.append(f"sentencepiece: {type(e).__name__}: {' '.join(str(e).split())[:200]}")
    pieces = PieceDecoder(model_file)
    return "tokenizer.model read by this script", lambda ids: [pieces.decode(row) for row in ids], failed


def response_logprobs(model, seqs):
    """log p(response token) at every response position of `seqs`, as TRL's _get_per_token_logps:
    the logits of the last NEW + 1 positions only, divided by the temperature, selective_log_softmax."""
    logits = model(input_ids=seqs, attention_mask=torch.ones_like(seqs), use_cache=False,
                   logits_to_keep=NEW + 1).logits
    logits = logits[:, :-1] / TEMPERATURE
    return label_logprobs(logits, seqs[:, P:])


def hf_iteration(policy, reference, opt, prompts, decode, gen_batch):
    """One TRL-style GRPO iteration: (generation s, inference s, training s, reward s (decoding, the rule
    and the advantages, within inference), mean reward, mean KL)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    # TRL's RepeatSampler: each prompt G times in a row, so that a group is G consecutive rows.
    # min_new_tokens masks EOS, so that every sequence runs to NEW tokens as aligner's gen.ignore_eos does.
    repeated = prompts.repeat_interleave(G, dim=0)
    seqs = []
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for s in range(0, B, gen_batch):
            x = repeated[s:s + gen_batch]
            seqs.append(policy.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=True,
                                        temperature=TEMPERATURE, top_k=0, top_p=1.0, max_new_tokens=NEW,
                                        min_new_tokens=NEW, pad_token_id=0))
    seqs = torch.cat(seqs)
    assert seqs.shape == (B, P + NEW), seqs.shape
    torch.cuda.synchronize()
    t1 = time.perf_counter()

    # Every response is NEW tokens long (no EOS), so the completion mask is all ones and left out.
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        ref_logprobs = torch.cat([response_logprobs(reference, seqs[s:s + MICRO]) for s in range(0, B, MICRO)])
    torch.cuda.synchronize()
    t_reward = time.perf_counter()
    texts = decode(seqs[:, P:].tolist())
    rewards = torch.tensor([rule_reward(t) for t in texts], dtype=torch.float32, device="cuda")
    grouped = rewards.view(-1, G)
    mean = grouped.mean(dim=1).repeat_interleave(G)
    std = grouped.std(dim=1).repeat_interleave(G)  # unbiased, as TRL's and aligner's
    advantages = (rewards - mean) / (std + 1e-4)
    torch.cuda.synchronize()
    t2 = time.perf_counter()

    # One optimizer step over all B responses; a micro-batch's loss is divided by the number
    # accumulated, as the Trainer does under gradient accumulation.
    order = torch.randperm(B, device="cuda")
    kl_sum = torch.zeros((), device="cuda")
    for u in range(0, B, MICRO):
        i = order[u:u + MICRO]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logprobs = response_logprobs(policy, seqs[i])
        old = logprobs.detach()  # num_iterations=1: TRL's old_per_token_logps is None
        ratio = torch.exp(logprobs - old)
        a = advantages[i].unsqueeze(1)
        pg = torch.max(-a * ratio, -a * torch.clamp(ratio, 1 - CLIP, 1 + CLIP))
        delta = ref_logprobs[i] - logprobs
        k3 = torch.exp(delta) - delta - 1
        loss = (pg + BETA * k3).mean(dim=1).mean()  # loss_type "grpo": each response's mean, then theirs
        (loss / (B // MICRO)).backward()
        kl_sum += (old - ref_logprobs[i]).sum()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2, t2 - t_reward, rewards.mean().item(), kl_sum.item() / B


def run_aligner(build, model_dir, prompts_path, extra=()):
    """aligner's metrics, mean over steps 2..ALIGNER_STEPS (peak memory: their max)."""
    out_dir = tempfile.mkdtemp(prefix="grpo_bench_")
    cmd = [os.path.join(build, "aligner"), "reinforce", f"model.path={model_dir}", f"data.train={prompts_path}",
           "reward.rule=regex", f"reward.pattern={PATTERN}", "reward.answer_field=answer", f"output_dir={out_dir}",
           "overwrite=true", "resume=false", "model.dtype=bfloat16", "model.device=cuda",
           f"rollout.prompts_per_step={N}", f"rollout.samples_per_prompt={G}", f"rollout.max_new_tokens={NEW}",
           "gen.ignore_eos=true", f"gen.temperature={TEMPERATURE}", f"gen.batch_size={B}", "reinforce.advantage=grpo",
           f"reinforce.kl_coef={BETA}", f"reinforce.clip_eps={CLIP}", "reinforce.epochs=1", "reinforce.minibatches=1",
           "reinforce.mask_unfinished=false", f"optim.lr={LR}", f"trainer.micro_batch_size={MICRO}",
           f"trainer.max_steps={ALIGNER_STEPS}", "trainer.val_interval=0", "trainer.save_interval=0",
           "trainer.log_interval=1", f"data.max_length={P}", *extra]
    return run_online(cmd, out_dir, ALIGNER_STEPS, ["reward_mean", "kl", "time_reward"])


def main():
    build = next((a for a in sys.argv[1:] if not a.startswith("--")), "build-cuda")
    gen_batch = B
    for a in sys.argv[1:]:
        if a.startswith("--gen-batch="):
            gen_batch = int(a.split("=", 1)[1])
    if gen_batch < 1 or B % gen_batch:
        sys.exit(f"--gen-batch must divide {B}, got {gen_batch}")
    cfg = CONFIG
    policy, model_dir = make_model(torch.float32)
    add_tokenizer(model_dir)
    policy.train()
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=LR, weight_decay=0.0, foreach=True)
    decoder_name, decode, decoder_failures = pick_decoder(model_dir)
    # The rule through the chosen decoder against the rule through the model file read here, on random ids.
    check, rng = PieceDecoder(os.path.join(model_dir, "tokenizer.model")), random.Random(0)
    sample = [[rng.randrange(cfg.vocab_size) for _ in range(NEW)] for _ in range(256)]
    agree = sum(rule_reward(text) == rule_reward(check.decode(ids)) for text, ids in zip(decode(sample), sample))

    torch.manual_seed(2)
    prompts = torch.randint(3, cfg.vocab_size, (N, P), device="cuda")  # no BOS/EOS/unk, no padding
    prompts_path = os.path.join(tempfile.mkdtemp(prefix="grpo_prompts_"), "prompts.jsonl")
    with open(prompts_path, "w") as f:
        for row in prompts.tolist():
            f.write(json.dumps({"input_ids": row, "answer": ANSWER}) + "\n")

    for _ in range(WARMUP):  # also allocates the optimizer's moments, so the peak below counts them
        hf_iteration(policy, reference, opt, prompts, decode, gen_batch)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    runs = [hf_iteration(policy, reference, opt, prompts, decode, gen_batch) for _ in range(ITERS)]
    hf_peak = torch.cuda.max_memory_allocated() / 1e9
    hf_gen, hf_inf, hf_train, hf_reward_s, hf_reward, hf_kl = (sum(r[k] for r in runs) / ITERS for k in range(6))
    del policy, reference, opt
    gc.collect()
    torch.cuda.empty_cache()  # the GPU's memory to aligner's process

    hf_iter = hf_gen + hf_inf + hf_train
    hf = {"iteration_s": hf_iter, "generation_s": hf_gen, "inference_s": hf_inf, "training_s": hf_train,
          "gen_tokens_per_s": B * NEW / hf_gen, "peak_gb": hf_peak, "reward_mean": hf_reward, "kl": hf_kl,
          "reward_s": hf_reward_s}

    ours = run_aligner(build, model_dir, prompts_path)
    al = {"iteration_s": ours["step_seconds"], "generation_s": ours["time_generation"],
          "inference_s": ours["time_inference"], "training_s": ours["update_seconds"],
          "gen_tokens_per_s": ours["gen_tokens_per_s"], "peak_gb": ours["peak_memory_gb"],
          "reward_mean": ours["reward_mean"], "kl": ours["kl"], "reward_s": ours["time_reward"]}
    speedup = hf["iteration_s"] / al["iteration_s"]
    share = al["generation_s"] / al["iteration_s"]
    print(f"\nGRPO iteration, 1.1B policy bf16, {N} prompts x {P} tokens, {G} samples each of {NEW} new tokens, "
          f"rule reward, 1 update over {B} in micro-batches of {MICRO}, {torch.cuda.get_device_name()}")
    print(f"reward: last {PATTERN} == {ANSWER!r} (aligner reward.rule=regex); transformers decodes with "
          f"{decoder_name}" + (f" ({'; '.join(decoder_failures)})" if decoder_failures else "")
          + f", whose rewards agree with the tokenizer.model read here on {agree}/{len(sample)} random responses"
          + f"; mean reward transformers {hf['reward_mean']:.3f}, aligner "
          + (f"{al['reward_mean']:.3f}" if al["reward_mean"] is not None else "n/a"))
    print("| impl | iteration s | generation s | inference s | training s | generated tokens/s | peak GB | "
          "vs transformers |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in [(f"transformers {__import__('transformers').__version__} (TRL-style GRPO, generate() "
                     f"batch {gen_batch})", hf),
                    ("aligner reinforce (grpo)", al)]:
        print(f"| {name} | {r['iteration_s']:.1f} | {r['generation_s']:.1f} "
              f"({r['generation_s'] / r['iteration_s']:.0%}) | {r['inference_s']:.1f} | {r['training_s']:.1f} | "
              f"{r['gen_tokens_per_s']:,.0f} | {r['peak_gb']:.1f} | {hf['iteration_s'] / r['iteration_s']:.2f}x |")
    print(f"speedup: {speedup:.1f}x (target >= 5x); aligner generation share: {share:.0%}")
    print("RESULT " + json.dumps({"transformers": hf, "aligner": al, "speedup": speedup,
                                  "aligner_generation_share": share,
                                  "reward": {"rule": "regex", "pattern": PATTERN, "answer": ANSWER,
                                             "transformers_decoder": decoder_name,
                                             "decoder_agreement": agree / len(sample)},
                                  "transformers_generation_batch": gen_batch}))


if __name__ == "__main__":
    main()
