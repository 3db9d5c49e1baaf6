#include "gen/sampling.h"

#include <ATen/CPUGeneratorImpl.h>
#ifdef ALIGNER_WITH_CUDA
#include <ATen/cuda/CUDAGeneratorImpl.h>
#endif

#include <cfloat>
#include <cmath>

#include "core/error.h"

namespace aligner {

void check_sampling_params(const SamplingParams& p) {
  if (is_greedy(p)) return;
  if (!(p.temperature > 0) || !std::isfinite(p.temperature))
    fail("sampling: temperature must be positive (or 0: greedy), got {}", p.temperature);
  if (p.top_k < 0) fail("sampling: top_k must be 0 (off) or positive, got {}", p.top_k);
  if (!(p.top_p > 0 && p.top_p <= 1)) fail("sampling: top_p must be in (0, 1], got {}", p.top_p);
}

at::Tensor sampling_logprobs(const at::Tensor& logits, const SamplingParams& p) {
  auto s = logits.to(at::kFloat);
  if (p.temperature != 1.0) s = s / p.temperature;
  const int64_t vocab = s.size(-1);
  if (p.top_k > 0 && p.top_k < vocab) {
    auto kth = std::get<0>(s.topk(p.top_k, -1)).narrow(-1, p.top_k - 1, 1);
    s = s.masked_fill(s < kth, -INFINITY);
  }
  if (p.top_p < 1.0) {
    // As TopPLogitsWarper: ascending order, drop the tokens whose cumulative mass stays within
    // 1 - top_p, always keeping the most likely one.
    auto [sorted, order] = s.sort(-1, /*descending=*/false);
    auto drop = sorted.softmax(-1).cumsum(-1) <= (1.0 - p.top_p);
    drop.narrow(-1, vocab - 1, 1).fill_(false);
    s = s.masked_fill(drop.scatter(-1, order, drop), -INFINITY);
  }
  return at::log_softmax(s, -1);
}

at::Tensor sample_tokens(const at::Tensor& logits, const SamplingParams& p, at::Generator& gen) {
  if (is_greedy(p)) return logits.argmax(-1);
  // argmax of p_i / E_i with E_i ~ Exp(1) is token i with probability p_i (the exponential race):
  // one pass, no sort, and no host synchronisation, unlike a multinomial draw. The clamp keeps a
  // draw of exactly 0 from turning a filtered-out token's 0 / 0 into NaN.
  auto probs = sampling_logprobs(logits, p).exp_();
  auto race = at::empty_like(probs).exponential_(1.0, gen).clamp_min_(FLT_MIN);
  return probs.div_(race).argmax(-1);
}

at::Generator make_generator(at::Device device, uint64_t seed) {
#ifdef ALIGNER_WITH_CUDA
  if (device.is_cuda()) {
    auto gen = at::cuda::detail::createCUDAGenerator(device.has_index() ? device.index() : -1);
    gen.set_current_seed(seed);
    return gen;
  }
#endif
  if (!device.is_cpu()) fail("sampling: no random generator for device {}", device.str());
  return at::detail::createCPUGenerator(seed);
}

}  // namespace aligner
