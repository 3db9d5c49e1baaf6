// The critic-free online algorithms (aligner reinforce): each step samples
// rollout.samples_per_prompt responses to each of rollout.prompts_per_step prompts from the live
// policy, scores them, and learns from each response's advantage over the other responses to its
// own prompt (its group, all on one rank, so the baselines are exact). reinforce.advantage:
//   rloo     NeMo-Aligner's REINFORCE: the reward less kl_coef x the response's summed KL to the
//            reference, minus the mean of the other responses of its group that ended (a group
//            with fewer than two ended responses teaches nothing); loss -logp x advantage
//   grpo     (reward - group mean) / (group std + 1e-4); clipped ratio (clip_eps, and DAPO's
//            clip_eps_high); kl_coef x the k3 estimate of KL to the reference as a loss term
//   dr_grpo  as grpo without the division by the std, token sums divided by a constant
// DAPO's options: asymmetric clipping, dynamic sampling (groups whose rewards are all equal are
// dropped and more prompts sampled until the step is full), and a soft overlong penalty.
// configs/reinforce.yaml lists every key.
#pragma once
#include <ATen/ATen.h>

#include "core/config.h"

namespace aligner {

// The whole `aligner reinforce` run described by `cfg`.
void run_reinforce(const Config& cfg);

// On [N] float64 rewards of N / group consecutive groups (a prompt's samples):

// RLOO: each reward less the mean of the other ended responses of its group; 0 when fewer than
// two of the group ended (NeMo-Aligner's calculate_rloo_baseline).
at::Tensor rloo_advantages(const at::Tensor& rewards, const at::Tensor& ended, int64_t group);
// GRPO: reward less its group's mean, divided by the group's (unbiased) std + 1e-4 when
// scale_by_std (Dr. GRPO does not divide).
at::Tensor group_advantages(const at::Tensor& rewards, int64_t group, bool scale_by_std);

// DAPO's soft overlong punishment: 0 up to max_new_tokens - buffer tokens, then falling linearly
// to -factor at max_new_tokens.
double overlong_penalty(int64_t length, int64_t max_new_tokens, int64_t buffer, double factor);

// The k3 estimator of KL(policy || reference) per token (Schulman): exp(ref - logp) - (ref - logp) - 1.
at::Tensor k3_kl(const at::Tensor& logprobs, const at::Tensor& ref_logprobs);

// Per-token policy-gradient terms, 0 outside the mask: -logp x A (rloo), or the clipped surrogate
// max(-A x ratio, -A x clip(ratio, 1 - eps_low, 1 + eps_high)).
at::Tensor reinforce_token_loss(const at::Tensor& logprobs, const at::Tensor& old_logprobs,
                                const at::Tensor& advantages, const at::Tensor& mask, bool clipped,
                                double eps_low, double eps_high);

}  // namespace aligner
