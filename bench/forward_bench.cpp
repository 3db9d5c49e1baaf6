// Times the forward pass (input ids -> logits) of a model folder; bench/forward_bench.py runs it
// beside transformers on the same GPU and prints the comparison.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "io/hf_checkpoint.h"

int main(int argc, char** argv) {
  if (argc < 6) {
    std::fprintf(stderr, "usage: forward_bench MODEL_DIR BATCH SEQ WARMUP ITERS\n");
    return 2;
  }
  const std::string dir = argv[1];
  const int64_t B = std::atoll(argv[2]), T = std::atoll(argv[3]);
  const int warmup = std::atoi(argv[4]), iters = std::atoi(argv[5]);
  const at::Device device = at::hasCUDA() ? at::Device(at::kCUDA) : at::Device(at::kCPU);
  auto m = aligner::load_transformer(dir, device, at::kBFloat16);
  at::NoGradGuard no_grad;
  auto gen = at::detail::createCPUGenerator(0);
  auto ids = at::randint(m.cfg.vocab_size, {B, T}, gen, at::TensorOptions().dtype(at::kLong)).to(device);
  double checksum = 0;
  auto step = [&] {
    auto logits = aligner::lm_logits(m, aligner::forward_hidden(m, {ids}));
    return logits[0][0][0].item<double>();  // reading one value waits for the GPU
  };
  for (int i = 0; i < warmup; ++i) checksum += step();
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < iters; ++i) checksum += step();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("{\"ms_per_forward\": %.3f, \"tokens_per_s\": %.1f, \"checksum\": %g}\n", 1e3 * s / iters,
              B * T * iters / s, checksum);
  return 0;
}
