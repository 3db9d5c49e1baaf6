// SteerLM 2.0 (Wang et al., HelpSteer2, 2024; NeMo-Aligner's GPTSteerLMModel): the SteerLM model
// Q_theta(y|a,x) learns the distribution P(y|a,x) ∝ P(a|x,y) P(y|x) that an attribute model and an
// unconditional model define, from n responses to each prompt x and attribute string a sampled from
// the SteerLM model it started as, Q'(y|a,x). Per prompt, with the responses' three log-probs from
// the data:
//   w' = softmax_i(log P(a|x,y_i) + log P(y_i|x) - log Q'(y_i|a,x))   importance weights towards P(y|a,x)
//   b' = softmax_i(log Q_theta(y_i|a,x) - log Q'(y_i|a,x))            the same towards Q_theta: a baseline
//   loss = sum_i (w'_i - b'_i) NLL_theta(y_i) / (the mean of the responses' lengths in tokens)
// averaged over the prompts of the global batch; b' is held constant. Its gradient is the
// estimate -sum_i (w'_i - b'_i) grad log Q_theta(y_i|a,x) of grad KL(P(y|a,x) || Q_theta(y|a,x)):
// responses with w' > b' become likelier. Metric kl: KL(w' || b') per prompt, with NeMo's 1e-8.
//
// `aligner steerlm2 prepare` makes the data: it samples the responses from the SteerLM model and
// computes their log-probs, so that each iteration (prepare with the model, train, prepare with the
// trained model, ...) runs from the command line. configs/steerlm2.yaml and
// configs/steerlm2-prepare.yaml are the schemas.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "core/config.h"

namespace aligner {

// The whole `aligner steerlm2` run described by `cfg`.
void run_steerlm2(const Config& cfg);
// The whole `aligner steerlm2 prepare` run described by `cfg`.
void run_steerlm2_prepare(const Config& cfg);

struct Steerlm2Loss {
  at::Tensor loss;  // scalar, with the graph of logq_theta
  at::Tensor kl;    // KL(w' || b'), scalar
  at::Tensor w, b;  // w' and b', [n]
};

// One prompt's responses: log Q_theta(y_i|a,x) summed over each response's tokens [n] (with its
// graph), log_w [n] (log P(a|x,y) + log P(y|x) - log Q'(y|a,x)), log Q'(y|a,x) [n] and the
// responses' lengths in loss tokens [n].
Steerlm2Loss steerlm2_loss(const at::Tensor& logq_theta, const at::Tensor& log_w,
                           const at::Tensor& logq_prime, const at::Tensor& lengths);

// log P(a|x,y) for a label with `values` where `present` (integers 0..scale) and the attribute
// model's predictions for the response: each attribute's value independent, distributed over
// 0..scale as a Gaussian of width `sigma` around the prediction, normalised over those values:
//   log P(a_k = v) = -(v - r_k)^2 / (2 sigma^2) - log sum_{u=0..scale} exp(-(u - r_k)^2 / (2 sigma^2))
double attribute_log_prob(const std::vector<float>& predicted, const std::vector<float>& values,
                          const std::vector<uint8_t>& present, double sigma, int64_t scale);

}  // namespace aligner
