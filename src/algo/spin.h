// Self-play fine-tuning (SPIN; Chen et al. 2024, "Self-Play Fine-Tuning Converts Weak Language
// Models to Strong Language Models"), as NeMo-Aligner runs it: SFT data, and the model learns to
// prefer each example's real response over the one that its previous self (the reference)
// generates for the same prompt. The loss is DPO's with the real response as chosen and the
// generated one as rejected. Training runs in iterations; each starts with the reference set to
// the weights the policy has then, generates with it step by step (lazily, so memory holds one
// step's responses), and ends with the policy taking its place. configs/spin.yaml is the schema.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "core/config.h"

namespace aligner {

// The whole `aligner spin` run described by `cfg`.
void run_spin(const Config& cfg);

// spin.beta for each of `iterations`: one value serves them all, else there must be one per
// iteration; errors name spin.beta.
std::vector<double> spin_betas(const std::vector<double>& given, int64_t iterations);

// Per example, [B] each, from the policy's and the reference's log-prob sums over the responses,
// [2B]: the B real responses, then the B generated ones (as collate_preferences lays out chosen and
// rejected). loss = -log sigmoid(beta x ((pi - ref)(real) - (pi - ref)(generated))); the rewards
// are the implicit ones, beta x (pi - ref), without gradient.
struct SpinTerms {
  at::Tensor loss, rewards_real, rewards_generated;
};
SpinTerms spin_terms(double beta, const at::Tensor& policy, const at::Tensor& reference);

}  // namespace aligner
