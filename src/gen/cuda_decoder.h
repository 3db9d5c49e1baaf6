// The decoding step on CUDA: the step of engine.h's decode_step with attention (plus the new
// token's rotary embedding and cache store) and sampling as single kernels (kernels/), captured
// as a CUDA graph once per batch width and replayed every step, so that a step costs one launch
// from the host instead of hundreds. The graph reads the weights in place (no copy), so it is
// made per generate() call: a training step between calls may move nothing, but a new call may
// bring a new model.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <memory>
#include <utility>

#include "gen/kv_cache.h"
#include "gen/sampling.h"
#include "model/transformer.h"

namespace aligner {

// Whether the model can decode this way: a CUDA build, the model on a CUDA device, float32/
// bfloat16/float16 weights, a head size of 16, 32, 64 or 128, a hidden size divisible by 8, an
// LM head; a mixture of experts also needs torch 2.8's grouped GEMM and an expert size divisible
// by 8.
bool cuda_decoding_supported(const Transformer& m);

// The decoder's sampling kernel on its own, for rows of logits [rows, vocab]: row i draws with
// the uniform of stream streams[i] at position positions[i] (both int64 [rows] on the device).
// Returns the tokens [rows] int64 and their log-probs under the raw logits [rows] float32.
std::pair<at::Tensor, at::Tensor> cuda_sample(const at::Tensor& logits, const SamplingParams& p,
                                              const at::Tensor& streams, const at::Tensor& positions);

class CudaDecoder {
 public:
  // Uses (and keeps references to) the model's weights and the cache; both must outlive it.
  CudaDecoder(const Transformer& m, KvCache& cache, const SamplingParams& sampling);
  ~CudaDecoder();
  CudaDecoder(const CudaDecoder&) = delete;
  CudaDecoder& operator=(const CudaDecoder&) = delete;

  // The random stream of each slot in `slots` (int64 on the device) from now on.
  void set_streams(const at::Tensor& slots, const at::Tensor& streams);
  // Chooses a token from each row of logits [rows, vocab] for slot slots[row], at the position
  // where the slot's cache ends (the first token after a prefill): into tokens[slot], logprobs[row].
  void sample(const at::Tensor& logits, const at::Tensor& slots);
  // Enqueues one decoding step of slots [0, n) and returns at once: the tokens in `tokens` go in,
  // the chosen next tokens replace them and their log-probs go to logprobs[0, n); the slots'
  // lengths advance. Both are copied to the host, where host_tokens/host_logprobs(ticket) hold
  // them once wait(ticket) returns; two steps can be in flight (the host reads one while the
  // device runs the next).
  int64_t step(int64_t n);
  void wait(int64_t ticket);
  const int64_t* host_tokens(int64_t ticket) const;
  const float* host_logprobs(int64_t ticket) const;

  at::Tensor tokens;    // [slots] int64: each slot's last token
  at::Tensor logprobs;  // [slots] float32

 private:
  struct Graphs;
  std::unique_ptr<Graphs> graphs_;
};

}  // namespace aligner
