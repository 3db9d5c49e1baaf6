// What the training benchmarks share: timing a step function and the device's peak memory.
#pragma once
#include <chrono>
#include <vector>

#include "train/optimizer.h"

#ifdef ALIGNER_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

namespace aligner::bench {

// Peak bytes allocated by the caching allocator on GPU 0, in GB (0 without CUDA).
inline double peak_gb() {
#ifdef ALIGNER_WITH_CUDA
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(0);
  return stats.allocated_bytes[size_t(c10::CachingAllocator::StatType::AGGREGATE)].peak / 1e9;
#else
  return 0;
#endif
}

// The trainer's update: the gradients' global norm, then AdamW's step with clipping's coefficient
// applied inside it.
inline void clipped_step(AdamW& opt, const NamedParams& params, double lr, double max_norm) {
  std::vector<at::Tensor> grads;
  for (const auto& [name, p] : params)
    if (p.grad().defined()) grads.push_back(p.grad());
  opt.step(lr, clip_coefficient(grad_norm(grads, [](double x) { return x; }), max_norm));
}

struct Timing {
  double seconds_per_step = 0, mean_loss = 0;
};

// Runs `step` (which returns the loss, read back from the device so that the step has finished)
// `warmup` times untimed, then `iters` times timed.
template <typename Step>
Timing time_steps(Step&& step, int warmup, int iters) {
  for (int i = 0; i < warmup; ++i) step();
  double loss_sum = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < iters; ++i) loss_sum += step();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return {s / iters, loss_sum / iters};
}

}  // namespace aligner::bench
