// Direct preference optimisation and its relatives: the policy learns from chosen/rejected pairs
// against a frozen reference model, with no reward model and no sampling. Each pair's chosen and
// rejected sequences go through the policy in one concatenated forward pass; the reference's
// log-probs are computed once per pair before training (dpo.cache_reference) or next to the
// policy's at every step. The loss is averaged over the pairs of the global batch.
// configs/dpo.yaml is the schema.
#pragma once
#include <string>

#include "core/config.h"
#include "data/packing.h"
#include "model/transformer.h"

namespace aligner {

// The whole `aligner dpo` run described by `cfg`.
void run_dpo(const Config& cfg);

enum class PreferenceLoss { kDpo, kIpo, kRpoSq, kRpoFwdKl, kRpoBwdKl };
// "dpo" | "ipo" | "rpo_sq" | "rpo_fwd_kl" | "rpo_bwd_kl"; anything else is an error listing them.
PreferenceLoss parse_preference_loss(const std::string& name);

struct PreferenceLossOptions {
  PreferenceLoss loss = PreferenceLoss::kDpo;
  double beta = 0.1;             // the KL penalty towards the reference
  double label_smoothing = 0.0;  // dpo: the assumed rate of flipped labels (conservative DPO)
  double gt_reward_scale = 1.0;  // rpo_*: multiplies the data's reward difference
};

// The loss of each pair, [B], from the policy's and the reference's log-probs of the chosen and
// rejected responses (each summed over the response's tokens, or their per-token mean) and, for
// the rpo losses, the rewards the data gives the two responses. With
// logits = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected):
//   dpo         -(1 - ls) log sigmoid(beta logits) - ls log sigmoid(-beta logits)
//   ipo         (logits - 1 / (2 beta))^2
//   rpo_sq      (beta logits - scale (reward_chosen - reward_rejected))^2
//   rpo_fwd_kl  KL(Bernoulli(sigmoid(beta logits)) || Bernoulli(sigmoid(scale (reward_c - reward_r))))
//   rpo_bwd_kl  KL(Bernoulli(sigmoid(scale (reward_c - reward_r))) || Bernoulli(sigmoid(beta logits)))
at::Tensor preference_loss(const PreferenceLossOptions& o, const at::Tensor& policy_chosen,
                           const at::Tensor& policy_rejected, const at::Tensor& reference_chosen,
                           const at::Tensor& reference_rejected, const at::Tensor& reward_chosen = {},
                           const at::Tensor& reward_rejected = {});

// Per row of a batch (labels set where the response is): the sum of the model's log-probs of the
// labelled tokens, and how many there are. [rows] each, on the model's device.
struct ResponseLogprobs {
  at::Tensor sum;    // float32 (float64 for a float64 model)
  at::Tensor count;  // int64
};
ResponseLogprobs response_logprobs(const Transformer& m, const Batch& b, int64_t checkpointed_layers = 0);

}  // namespace aligner
