// Times DPO steps of a model folder in bf16 with fp32 optimizer state: the reference's forward
// pass (or its cached log-probs), the policy's forward and backward over the chosen and rejected
// rows in one batch, the DPO loss, clipping and AdamW, through the code `aligner dpo` runs.
// bench/dpo_bench.py runs it beside transformers doing the same work on the same GPU.
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>

#include "algo/dpo.h"
#include "bench_util.h"
#include "io/hf_checkpoint.h"
#include "train/optimizer.h"

int main(int argc, char** argv) {
  if (argc < 8) {
    std::fprintf(stderr,
                 "usage: dpo_bench MODEL_DIR PAIRS SEQ PROMPT WARMUP ITERS REFERENCE(model|cached)\n");
    return 2;
  }
  const std::string dir = argv[1];
  const int64_t P = std::atoll(argv[2]), T = std::atoll(argv[3]), prompt = std::atoll(argv[4]);
  const int warmup = std::atoi(argv[5]), iters = std::atoi(argv[6]);
  const bool reference_model = std::string(argv[7]) == "model";
  const at::Device device = at::hasCUDA() ? at::Device(at::kCUDA) : at::Device(at::kCPU);
  auto policy = aligner::load_transformer(dir, device, at::kBFloat16);
  std::optional<aligner::Transformer> reference;
  if (reference_model) reference = aligner::load_transformer(dir, device, at::kBFloat16);

  // Chosen rows then rejected rows, each pair sharing its prompt; the loss reads the responses.
  auto gen = at::detail::createCPUGenerator(0);
  auto ids = at::randint(policy.cfg.vocab_size, {2 * P, T}, gen, at::TensorOptions().dtype(at::kLong));
  ids.narrow(0, P, P).narrow(1, 0, prompt).copy_(ids.narrow(0, 0, P).narrow(1, 0, prompt));
  auto labels = at::full({2 * P, T}, aligner::kIgnoreIndex, ids.options());
  labels.narrow(1, prompt - 1, T - prompt).copy_(ids.narrow(1, prompt, T - prompt));
  const auto positions = at::arange(T, ids.options()).unsqueeze(0).expand({2 * P, T}).contiguous();
  aligner::Batch batch{ids.to(device),
                       labels.to(device),
                       positions.to(device),
                       {},
                       at::ones({2 * P, T}, ids.options()).to(device)};
  at::Tensor cached;
  if (!reference_model) {
    at::NoGradGuard no_grad;
    cached = aligner::response_logprobs(policy, batch).sum;  // what the cache holds: computed once
  }

  auto params = aligner::named_parameters(policy);
  for (auto& [name, t] : params) t.requires_grad_(true);
  aligner::AdamW opt(params, {1e-6, 0.9, 0.95, 1e-8, 0.0});
  const aligner::PreferenceLossOptions loss_options;  // dpo, beta 0.1
  auto step = [&] {
    at::Tensor ref = cached;
    if (reference) {
      at::NoGradGuard no_grad;
      ref = aligner::response_logprobs(*reference, batch).sum;
    }
    const auto pi = aligner::response_logprobs(policy, batch).sum;
    auto loss = aligner::preference_loss(loss_options, pi.narrow(0, 0, P), pi.narrow(0, P, P),
                                         ref.narrow(0, 0, P), ref.narrow(0, P, P))
                    .mean();
    loss.backward();
    aligner::bench::clipped_step(opt, params, 1e-6, 1.0);
    opt.zero_grad();
    return loss.item<double>();  // waits for the GPU
  };
  const auto t = aligner::bench::time_steps(step, warmup, iters);
  std::printf("{\"ms_per_step\": %.3f, \"pairs_per_s\": %.3f, \"peak_gb\": %.3f, \"loss\": %.4f}\n",
              1e3 * t.seconds_per_step, P / t.seconds_per_step, aligner::bench::peak_gb(), t.mean_loss);
  return 0;
}
