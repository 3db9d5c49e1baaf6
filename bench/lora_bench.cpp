// Times LoRA training steps of a model folder in bf16: the base frozen, rank-RANK adapters (alpha
// 2 x RANK, float32) on all seven projections of every layer, AdamW on the adapters alone. MODE sft
// (the default) is sft_bench's step; dpo-model and dpo-cached are dpo_bench's, BATCH pairs sharing
// PROMPT-token prompts, the reference the base with the adapters off as `aligner dpo` runs it with
// LoRA: every step (dpo.cache_reference=false) or its log-probs computed once (true).
// bench/lora_bench.py runs it beside transformers + PEFT on the same GPU.
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <optional>
#include <string>

#include "algo/dpo.h"
#include "bench_util.h"
#include "io/hf_checkpoint.h"
#include "model/lora.h"
#include "train/optimizer.h"

int main(int argc, char** argv) {
  const std::string mode = argc > 8 ? argv[8] : "sft";
  if (argc < 8 || (mode != "sft" && argc < 10) ||
      (mode != "sft" && mode != "dpo-model" && mode != "dpo-cached")) {
    std::fprintf(
        stderr,
        "usage: lora_bench MODEL_DIR BATCH SEQ WARMUP ITERS CHECKPOINT(0|1) RANK [sft | dpo-model PROMPT | "
        "dpo-cached PROMPT]\n");
    return 2;
  }
  const std::string dir = argv[1];
  const int64_t B = std::atoll(argv[2]), T = std::atoll(argv[3]), rank = std::atoll(argv[7]);
  const int warmup = std::atoi(argv[4]), iters = std::atoi(argv[5]);
  const bool checkpoint = std::atoi(argv[6]) != 0;
  const at::Device device = at::hasCUDA() ? at::Device(at::kCUDA) : at::Device(at::kCPU);
  auto m = aligner::load_transformer(dir, device, at::kBFloat16);
  for (auto& [name, t] : aligner::named_parameters(m)) t.requires_grad_(false);
  aligner::LoraConfig lora;
  lora.rank = rank;
  lora.alpha = 2.0 * double(rank);
  lora.targets = aligner::kLoraTargets;
  aligner::add_adapters(m, lora, 0);
  auto params = aligner::adapter_parameters(m);
  for (auto& [name, t] : params) t.requires_grad_(true);
  aligner::AdamW opt(params, {1e-4, 0.9, 0.95, 1e-8, 0.0});
  auto gen = at::detail::createCPUGenerator(0);
  const auto long_options = at::TensorOptions().dtype(at::kLong);

  std::function<at::Tensor()> loss;
  std::optional<aligner::Transformer> reference;
  aligner::Batch batch;
  at::Tensor cached;
  if (mode == "sft") {
    auto ids = at::randint(m.cfg.vocab_size, {B, T}, gen, long_options).to(device);
    auto targets = at::cat({ids.narrow(1, 1, T - 1), at::full({B, 1}, -100, ids.options())}, 1);
    const double n_targets = double(B * (T - 1));
    loss = [&m, ids, targets, n_targets, checkpoint] {
      aligner::ForwardInput in{ids};
      in.checkpointed_layers = checkpoint ? aligner::kAllLayers : 0;
      return -aligner::token_logprobs(m, aligner::forward_hidden(m, in), targets).sum() / n_targets;
    };
  } else {
    // Chosen rows then rejected rows, each pair sharing its prompt; the loss reads the responses.
    const int64_t prompt = std::atoll(argv[9]);
    auto ids = at::randint(m.cfg.vocab_size, {2 * B, T}, gen, long_options);
    ids.narrow(0, B, B).narrow(1, 0, prompt).copy_(ids.narrow(0, 0, B).narrow(1, 0, prompt));
    auto labels = at::full({2 * B, T}, aligner::kIgnoreIndex, ids.options());
    labels.narrow(1, prompt - 1, T - prompt).copy_(ids.narrow(1, prompt, T - prompt));
    const auto positions = at::arange(T, ids.options()).unsqueeze(0).expand({2 * B, T}).contiguous();
    batch = {ids.to(device),
             labels.to(device),
             positions.to(device),
             {},
             at::ones({2 * B, T}, ids.options()).to(device)};
    if (mode == "dpo-model") {
      reference = aligner::without_adapters(m);  // shares the base's tensors: no second model
    } else {
      at::NoGradGuard no_grad;
      cached = aligner::response_logprobs(aligner::without_adapters(m), batch).sum;  // computed once
    }
    loss = [&, checkpoint] {
      at::Tensor ref = cached;
      if (reference) {
        at::NoGradGuard no_grad;
        ref = aligner::response_logprobs(*reference, batch).sum;
      }
      const auto pi = aligner::response_logprobs(m, batch, checkpoint).sum;
      return aligner::preference_loss({}, pi.narrow(0, 0, B), pi.narrow(0, B, B), ref.narrow(0, 0, B),
                                      ref.narrow(0, B, B))
          .mean();  // dpo, beta 0.1
    };
  }
  auto step = [&] {
    auto l = loss();
    l.backward();
    aligner::bench::clipped_step(opt, params, 1e-4, 1.0);
    opt.zero_grad();
    return l.item<double>();  // waits for the GPU
  };
  const auto t = aligner::bench::time_steps(step, warmup, iters);
  if (mode == "sft")
    std::printf("{\"ms_per_step\": %.3f, \"tokens_per_s\": %.1f, \"peak_gb\": %.3f, \"loss\": %.4f}\n",
                1e3 * t.seconds_per_step, B * T / t.seconds_per_step, aligner::bench::peak_gb(), t.mean_loss);
  else
    std::printf("{\"ms_per_step\": %.3f, \"pairs_per_s\": %.3f, \"peak_gb\": %.3f, \"loss\": %.4f}\n",
                1e3 * t.seconds_per_step, B / t.seconds_per_step, aligner::bench::peak_gb(), t.mean_loss);
  return 0;
}
