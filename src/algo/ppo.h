// PPO for RLHF, as NeMo-Aligner defines it: an actor (the policy) and a critic trained together on
// rollouts that the actor generates from its live weights, scored by a reward model (in this
// process or served over HTTP), with a per-token KL penalty toward the frozen reference.
//
// One trainer step is one rollout: rollout.prompts_per_step prompts (shared by the ranks) x
// rollout.samples_per_prompt responses, then ppo.epochs passes over it in ppo.minibatches optimizer
// updates each. Per response token t (its position predicts token t):
//   kl_t        = logp_old_t - logp_ref_t            (its absolute value with ppo.absolute_kl)
//   reward_t    = -kl_coef x kl_t, plus the reward model's score at the last response token
//   advantage   = GAE(gamma, lambda) of the rewards and the critic's values, whitened over the
//                 global batch (every rank's tokens)
//   actor loss  = max(-A x ratio, -A x clip(ratio, 1 - eps, 1 + eps)) - entropy_coef x entropy,
//                 a mean over the tokens of responses that ended (all, with mask_unfinished=false)
//   critic loss = 0.5 x max((V - R)^2, (V_clipped - R)^2), a mean over response tokens, with
//                 V_clipped = V_old + clip(V - V_old, -value_clip, value_clip) and R = A + V_old
//                 (before whitening)
// The losses are added; each module has its own optimizer and learning rate. configs/ppo.yaml
// lists every key.
#pragma once
#include <ATen/ATen.h>

#include "core/config.h"

namespace aligner {

// The whole `aligner ppo` run described by `cfg`.
void run_ppo(const Config& cfg);

// The math on [N, T] float tensors whose response tokens (mask 1) are contiguous in each row.

// -kl_coef x kl at every response token, plus scores[n] at row n's last response token.
at::Tensor token_rewards(const at::Tensor& scores, const at::Tensor& kl, const at::Tensor& mask,
                         double kl_coef);

struct Gae {
  at::Tensor advantages, returns;  // [N, T], 0 outside the mask; returns = advantages + values
};
// Generalised advantage estimation over each row's response tokens, the value after the last one 0.
Gae gae(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask, double gamma,
        double lambda);

// (x - mean) / sqrt(var + 1e-8) inside the mask, 0 outside, for a mean and (population) variance
// taken over every rank's masked entries.
at::Tensor whiten(const at::Tensor& x, const at::Tensor& mask, double mean, double var);

// Per-token clipped surrogate, 0 outside the mask.
at::Tensor ppo_actor_loss(const at::Tensor& logprobs, const at::Tensor& old_logprobs,
                          const at::Tensor& advantages, const at::Tensor& mask, double clip_eps);
// Per-token clipped value loss, 0 outside the mask.
at::Tensor ppo_critic_loss(const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns,
                           const at::Tensor& mask, double value_clip);

// The adaptive KL controller of Ziegler et al. (TRL's AdaptiveKLController): the coefficient after
// a rollout of `sequences` whose mean KL per sequence was `kl`.
double adapt_kl_coef(double coef, double kl, double target, double horizon, int64_t sequences);

}  // namespace aligner
