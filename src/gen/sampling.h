// Choosing the next token from logits, on the logits' device. The filters are those of
// transformers' sampling (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, applied in
// that order), so a setting means what it means there.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

namespace aligner {

struct SamplingParams {
  bool greedy = false;       // argmax; the other fields are then unused
  double temperature = 1.0;  // logits are divided by it; 0 is greedy, as in vLLM and transformers
  int64_t top_k = 0;         // keep the k most likely tokens (ties with the k-th kept); 0: all
  double top_p = 1.0;        // keep the most likely tokens whose mass reaches top_p; 1: all
};

// Argmax decoding: greedy, or temperature 0.
inline bool is_greedy(const SamplingParams& p) {
  return p.greedy || p.temperature == 0;
}

// Errors name the field and the value given.
void check_sampling_params(const SamplingParams& p);

// log-probabilities of the distribution sampled from: [rows, vocab] float32, -inf where filtered out.
at::Tensor sampling_logprobs(const at::Tensor& logits, const SamplingParams& p);
// One token per row of logits [rows, vocab]: [rows] int64. A draw uses `gen` only (no global
// random state), so a seeded generator reproduces the draws.
at::Tensor sample_tokens(const at::Tensor& logits, const SamplingParams& p, at::Generator& gen);
// A generator for `device` (CPU or CUDA) starting from `seed`.
at::Generator make_generator(at::Device device, uint64_t seed);

}  // namespace aligner
