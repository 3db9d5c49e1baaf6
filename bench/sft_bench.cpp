// Times full SFT steps (forward, loss, backward, clip, AdamW) of a model folder in bf16 with fp32
// optimizer state; bench/sft_bench.py runs it beside transformers + torch AdamW on the same GPU.
#include <cstdio>
#include <cstdlib>
#include <string>

#include "bench_util.h"
#include "core/torch_compat.h"
#include "io/hf_checkpoint.h"
#include "train/optimizer.h"
#include "train/step_profiler.h"

int main(int argc, char** argv) {
  if (argc < 7) {
    std::fprintf(stderr, "usage: sft_bench MODEL_DIR BATCH SEQ WARMUP ITERS CHECKPOINT(0|1)\n");
    return 2;
  }
  const std::string dir = argv[1];
  const int64_t B = std::atoll(argv[2]), T = std::atoll(argv[3]);
  const int warmup = std::atoi(argv[4]), iters = std::atoi(argv[5]);
  const bool checkpoint = std::atoi(argv[6]) != 0;
  const at::Device device = at::hasCUDA() ? at::Device(at::kCUDA) : at::Device(at::kCPU);
  auto m = aligner::load_transformer(dir, device, at::kBFloat16);
  auto params = aligner::named_parameters(m);
  for (auto& [name, t] : params) t.requires_grad_(true);
  aligner::AdamW opt(params, {1e-5, 0.9, 0.95, 1e-8, 0.0});
  auto gen = at::detail::createCPUGenerator(0);
  auto ids = at::randint(m.cfg.vocab_size, {B, T}, gen, at::TensorOptions().dtype(at::kLong)).to(device);
  auto targets = at::cat({ids.narrow(1, 1, T - 1), at::full({B, 1}, -100, ids.options())}, 1);
  const double n_targets = double(B * (T - 1));
  // ALIGNER_PROFILE_STEPS=A:B (steps counted from 1, warmup included) writes their trace to
  // ALIGNER_PROFILE_DIR (default /tmp) for scripts/profile_train.py.
  const char* profile_dir = std::getenv("ALIGNER_PROFILE_DIR");
  aligner::StepProfiler profiler(profile_dir ? profile_dir : "/tmp", 0);
  int64_t n = 0;
  auto step = [&] {
    profiler.before_step(++n);
    aligner::compat::choose_attention_kernels();  // as the trainer does before each step
    aligner::ForwardInput in{ids};
    in.checkpointed_layers = checkpoint ? aligner::kAllLayers : 0;
    auto loss = -aligner::token_logprobs(m, aligner::forward_hidden(m, in), targets).sum() / n_targets;
    loss.backward();
    aligner::bench::clipped_step(opt, params, 1e-5, 1.0);
    opt.zero_grad();
    const double value = loss.item<double>();  // waits for the GPU
    profiler.after_step(n);
    return value;
  };
  const auto t = aligner::bench::time_steps(step, warmup, iters);
  std::printf("{\"ms_per_step\": %.3f, \"tokens_per_s\": %.1f, \"peak_gb\": %.3f, \"loss\": %.4f}\n",
              1e3 * t.seconds_per_step, B * T / t.seconds_per_step, aligner::bench::peak_gb(), t.mean_loss);
  return 0;
}
