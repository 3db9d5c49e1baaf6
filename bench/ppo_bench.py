"""One PPO iteration with a 1.1B actor, critic and reward model (TinyLlama shape), bf16: aligner vs
transformers doing it the way TRL's PPOTrainer does.

Run on the GPU machine after scripts/build_cuda.sh:  python3 bench/ppo_bench.py [BUILD_DIR]
The same work per iteration: 256 prompts of 128 random tokens, 256 new tokens sampled for each at
temperature 1 without top-k or top-p, EOS never ending a sequence; the actor's log-probs of the
responses, the reference's, the critic's values at every response token and the reward model's
score at the last token; per-token KL penalty 0.01 x (logp - logp_ref) with the score added at the
last token, GAE (gamma 1, lambda 0.95), whitened advantages; then one PPO epoch over the 256
sequences in minibatches of 64 (micro-batches of 16, gradients accumulated): clipped surrogate
(0.2) plus 0.1 x clipped value loss (0.2), clipping at 1.0 per model, one AdamW step per minibatch
for actor and critic. transformers runs as TRL with bf16=True: actor and critic float32 weights
under bf16 autocast, the reference a deep copy of the actor, the reward model in bf16, generation
and the rollout's forward passes in batches of 64 (TRL's default local_rollout_forward_batch_size),
the old log-probs from the logits that generate() returns (as TRL takes them), log-probs of the
labels from the full logits row by row (selective_log_softmax), one torch.optim.AdamW (foreach)
over both models' parameters, one backward through the summed policy and value loss. aligner runs
its real `aligner ppo` command on the same weights and prompts (the critic starts from the reward
model, as NeMo-Aligner's does) and reports its own timings in metrics.jsonl: once with its default,
the old log-probs recomputed by a training-forward pass, and once with the sampler's log-probs as
TRL does (rollout.sampler_logprobs=true). Times are per iteration, split into generation,
inference (the actor's old log-probs, reference, critic and reward passes, and the advantages) and
training.
"""
import copy
import gc
import json
import os
import sys
import tempfile
import time

import torch
from dpo_bench import label_logprobs
from tinyllama import run_online, CONFIG, add_tokenizer, make_model, make_reward_model

N, P, NEW = 256, 128, 256  # prompts, prompt tokens, new tokens each
MINI, MICRO, FORWARD = 64, 16, 64  # PPO minibatch, micro-batch, rollout forward batch (sequences)
KL_COEF, GAMMA, LAM, CLIP, VALUE_CLIP, VF_COEF, TEMPERATURE = 0.01, 1.0, 0.95, 0.2, 0.2, 0.1, 1.0
WARMUP, ITERS = 1, 2  # transformers: untimed and timed iterations
ALIGNER_STEPS = 4  # aligner's step 1 is its warm-up (CUDA graph capture, allocator growth): 2..4 timed


def response_logprobs(model, seqs):
    """log p(response token) at every response position of `seqs`, as TRL's forward + selective_log_softmax."""
    logits = model(input_ids=seqs, attention_mask=torch.ones_like(seqs), use_cache=False).logits
    logits = logits[:, P - 1:-1] / (TEMPERATURE + 1e-7)
    return label_logprobs(logits, seqs[:, P:])


def scores(model, seqs):
    """A sequence classifier's output at every position (TRL's get_reward: backbone, then the score head)."""
    hidden = model.model(input_ids=seqs, attention_mask=torch.ones_like(seqs), use_cache=False).last_hidden_state
    return model.score(hidden).squeeze(-1).float()


def hf_iteration(actor, reference, critic, reward, opt, prompts):
    """One TRL-style PPO iteration: (generation s, inference s, training s, mean reward, mean KL)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    # TRL's batch_generation: local_rollout_forward_batch_size prompts per generate() call, keeping
    # the logits, from which TRL takes the old log-probs instead of running the actor again.
    # min_new_tokens masks EOS, so that every sequence runs to NEW tokens as aligner's gen.ignore_eos does.
    seqs, gen_logits = [], []
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for s in range(0, N, FORWARD):
            out = actor.generate(input_ids=prompts[s:s + FORWARD], attention_mask=torch.ones_like(prompts[s:s + FORWARD]),
                                 do_sample=True, temperature=TEMPERATURE, top_k=0, top_p=1.0, max_new_tokens=NEW,
                                 min_new_tokens=NEW, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
            seqs.append(out.sequences)
            gen_logits.append(torch.stack(out.logits, 1))
    seqs = torch.cat(seqs)
    assert seqs.shape == (N, P + NEW), seqs.shape
    torch.cuda.synchronize()
    t1 = time.perf_counter()

    # Rollout: every sequence is NEW tokens long, so no response padding to mask.
    logprobs, ref_logprobs, values, rewards_at_end = [], [], [], []
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for k, s in enumerate(range(0, N, FORWARD)):
            x = seqs[s:s + FORWARD]
            logprobs.append(label_logprobs(gen_logits[k] / (TEMPERATURE + 1e-7), x[:, P:]))
            ref_logprobs.append(response_logprobs(reference, x))
            values.append(scores(critic, x)[:, P - 1:-1])  # the value of the state before each response token
            rewards_at_end.append(scores(reward, x)[:, -1])
        del gen_logits
        logprobs, ref_logprobs = torch.cat(logprobs), torch.cat(ref_logprobs)
        values, score = torch.cat(values), torch.cat(rewards_at_end)
        kl = logprobs - ref_logprobs
        rewards = -KL_COEF * kl
        rewards[:, -1] += score
        # GAE, backwards over the response as TRL writes it.
        last, reversed_advantages = 0.0, []
        for t in reversed(range(NEW)):
            next_values = values[:, t + 1] if t < NEW - 1 else 0.0
            delta = rewards[:, t] + GAMMA * next_values - values[:, t]
            last = delta + GAMMA * LAM * last
            reversed_advantages.append(last)
        advantages = torch.stack(reversed_advantages[::-1], dim=1)
        returns = advantages + values
        advantages = (advantages - advantages.mean()) * torch.rsqrt(advantages.var() + 1e-8)
    torch.cuda.synchronize()
    t2 = time.perf_counter()

    # One epoch over shuffled minibatches; a micro-batch's loss is divided by the number accumulated,
    # as accelerator.backward does under gradient accumulation.
    order = torch.randperm(N, device="cuda")
    for m in range(0, N, MINI):
        for u in range(m, m + MINI, MICRO):
            i = order[u:u + MICRO]
            x = seqs[i]
            with torch.autocast("cuda", dtype=torch.bfloat16):
                new_logprobs = response_logprobs(actor, x)
                v = scores(critic, x)[:, P - 1:-1]
            v_clipped = torch.clamp(v, values[i] - VALUE_CLIP, values[i] + VALUE_CLIP)
            vf_loss = 0.5 * torch.max((v - returns[i]) ** 2, (v_clipped - returns[i]) ** 2).mean()
            ratio = torch.exp(new_logprobs - logprobs[i])
            pg_loss = torch.max(-advantages[i] * ratio, -advantages[i] * torch.clamp(ratio, 1 - CLIP, 1 + CLIP)).mean()
            ((pg_loss + VF_COEF * vf_loss) / (MINI // MICRO)).backward()
        torch.nn.utils.clip_grad_norm_(actor.parameters(), 1.0)
        torch.nn.utils.clip_grad_norm_(critic.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2, score.mean().item(), kl.sum(-1).mean().item()


def run_aligner(build, actor_dir, rm_dir, prompts_path, extra=()):
    """aligner's metrics, mean over steps 2..ALIGNER_STEPS (peak memory: their max)."""
    out_dir = tempfile.mkdtemp(prefix="ppo_bench_")
    cmd = [os.path.join(build, "aligner"), "ppo", f"actor.path={actor_dir}", f"reward.model={rm_dir}",
           f"data.train={prompts_path}", f"output_dir={out_dir}", "overwrite=true", "resume=false",
           "model.dtype=bfloat16", "model.device=cuda", f"rollout.prompts_per_step={N}", "rollout.samples_per_prompt=1",
           f"rollout.max_new_tokens={NEW}", "gen.ignore_eos=true", f"gen.temperature={TEMPERATURE}", "ppo.epochs=1",
           f"ppo.minibatches={N // MINI}", f"trainer.micro_batch_size={MICRO}", f"trainer.max_steps={ALIGNER_STEPS}",
           "trainer.val_interval=0", "trainer.save_interval=0", "trainer.log_interval=1", f"data.max_length={P}",
           *extra]
    return run_online(cmd, out_dir, ALIGNER_STEPS, ["reward_mean", "kl"])


def main():
    build = next((a for a in sys.argv[1:] if not a.startswith("--")), "build-cuda")
    cfg = CONFIG
    actor, actor_dir = make_model(torch.float32)
    critic, rm_dir = make_reward_model(torch.float32)
    for d in (actor_dir, rm_dir):
        add_tokenizer(d)
    actor.train()
    critic.train()
    reference = copy.deepcopy(actor).eval().requires_grad_(False)
    reward = copy.deepcopy(critic).to(torch.bfloat16).eval().requires_grad_(False)
    # TRL has one optimizer over the policy-and-value wrapper; the groups only give each its own rate.
    opt = torch.optim.AdamW([{"params": list(actor.parameters()), "lr": 1e-6},
                             {"params": list(critic.parameters()), "lr": 1e-5}], weight_decay=0.0, foreach=True)

    torch.manual_seed(2)
    prompts = torch.randint(3, cfg.vocab_size, (N, P), device="cuda")  # no BOS/EOS/unk, no padding
    prompts_path = os.path.join(tempfile.mkdtemp(prefix="ppo_prompts_"), "prompts.jsonl")
    with open(prompts_path, "w") as f:
        for row in prompts.tolist():
            f.write(json.dumps({"input_ids": row}) + "\n")

    for _ in range(WARMUP):  # also allocates the optimizer's moments, so the peak below counts them
        hf_iteration(actor, reference, critic, reward, opt, prompts)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    runs = [hf_iteration(actor, reference, critic, reward, opt, prompts) for _ in range(ITERS)]
    hf_peak = torch.cuda.max_memory_allocated() / 1e9
    hf_gen, hf_inf, hf_train, hf_reward, hf_kl = (sum(r[k] for r in runs) / ITERS for k in range(5))
    del actor, reference, critic, reward, opt
    gc.collect()
    torch.cuda.empty_cache()  # the GPU's memory to aligner's process

    hf_iter = hf_gen + hf_inf + hf_train
    hf = {"iteration_s": hf_iter, "generation_s": hf_gen, "inference_s": hf_inf, "training_s": hf_train,
          "gen_tokens_per_s": N * NEW / hf_gen, "peak_gb": hf_peak, "reward_mean": hf_reward, "kl": hf_kl}

    def row(ours):
        return {"iteration_s": ours["step_seconds"], "generation_s": ours["time_generation"],
                "inference_s": ours["time_inference"], "training_s": ours["update_seconds"],
                "gen_tokens_per_s": ours["gen_tokens_per_s"], "peak_gb": ours["peak_memory_gb"],
                "reward_mean": ours["reward_mean"], "kl": ours["kl"]}

    al = row(run_aligner(build, actor_dir, rm_dir, prompts_path))
    al_sampler = row(run_aligner(build, actor_dir, rm_dir, prompts_path, ["rollout.sampler_logprobs=true"]))
    speedup = hf["iteration_s"] / al["iteration_s"]
    share = al["generation_s"] / al["iteration_s"]
    print(f"\nPPO iteration, 1.1B actor + critic + reward model bf16, {N} prompts x {P} tokens, {NEW} new tokens "
          f"each, 1 epoch in minibatches of {MINI} (micro-batches of {MICRO}), {torch.cuda.get_device_name()}")
    print("| impl | iteration s | generation s | inference s | training s | generated tokens/s | peak GB | "
          "vs transformers |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in [(f"transformers {__import__('transformers').__version__} (TRL-style PPO)", hf),
                    ("aligner (default: old log-probs recomputed)", al),
                    ("aligner, rollout.sampler_logprobs=true (as TRL)", al_sampler)]:
        print(f"| {name} | {r['iteration_s']:.1f} | {r['generation_s']:.1f} "
              f"({r['generation_s'] / r['iteration_s']:.0%}) | {r['inference_s']:.1f} | {r['training_s']:.1f} | "
              f"{r['gen_tokens_per_s']:,.0f} | {r['peak_gb']:.1f} | {hf['iteration_s'] / r['iteration_s']:.2f}x |")
    print(f"speedup: {speedup:.1f}x (target >= 5x); aligner generation share: {share:.0%} (target <= 40%)")
    print("RESULT " + json.dumps({"transformers": hf, "aligner": al, "aligner_sampler_logprobs": al_sampler,
                                  "speedup": speedup,
                                  "aligner_generation_share": share}))


if __name__ == "__main__":
    main()
