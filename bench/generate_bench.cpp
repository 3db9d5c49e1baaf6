// Times generate() on a model folder: random prompts, sampled at temperature 1 without filters,
// EOS ignored so that every sequence runs to NEW tokens. bench/generate_bench.py runs it beside
// transformers' generate on the same GPU and prints the comparison. Tries BATCH slots first and
// halves them until the KV cache and activations fit.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <set>
#include <string>

#include <ATen/CPUGeneratorImpl.h>
#ifdef ALIGNER_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

#include "gen/engine.h"
#include "io/hf_checkpoint.h"

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Device memory bandwidth as a large copy achieves it (bytes read + written per second).
double copy_bandwidth(at::Device device) {
  const int64_t n = int64_t(1) << 28;  // 1 GiB of floats
  auto src = at::ones({n}, at::TensorOptions().dtype(at::kFloat).device(device)), dst = at::empty_like(src);
  dst.copy_(src);
  dst[0].item<float>();  // waits for the device
  const int iters = 10;
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < iters; ++i) dst.copy_(src);
  dst[0].item<float>();
  return 2.0 * 4.0 * double(n) * iters / seconds_since(t0);
}

bool is_out_of_memory(const c10::Error& e) {
  return std::string(e.what()).find("out of memory") != std::string::npos;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 6) {
    std::fprintf(stderr, "usage: generate_bench MODEL_DIR PROMPTS PROMPT_LEN NEW BATCH\n");
    return 2;
  }
  const std::string dir = argv[1];
  const int64_t N = std::atoll(argv[2]), P = std::atoll(argv[3]), NEW = std::atoll(argv[4]);
  int64_t batch = std::atoll(argv[5]);
  const at::Device device = at::hasCUDA() ? at::Device(at::kCUDA) : at::Device(at::kCPU);
  const auto m = aligner::load_transformer(dir, device, at::kBFloat16);
  auto gen = at::detail::createCPUGenerator(0);
  const auto ids = at::randint(m.cfg.vocab_size, {N, P}, gen, at::TensorOptions().dtype(at::kLong));
  const auto a = ids.accessor<int64_t, 2>();
  std::vector<std::vector<int32_t>> prompts(N);
  for (int64_t i = 0; i < N; ++i)
    for (int64_t t = 0; t < P; ++t) prompts[i].push_back(int32_t(a[i][t]));

  aligner::GenerationOptions opt;
  opt.max_new_tokens = NEW;
  opt.stop_at_eos = false;
  opt.seed = 1;
  // Warm-up: kernels, cuBLAS handles, the caching allocator.
  opt.batch_size = 8;
  opt.max_new_tokens = 8;
  aligner::generate(m, {prompts.begin(), prompts.begin() + std::min<int64_t>(N, 16)}, opt);
  opt.max_new_tokens = NEW;

  aligner::GenerationResult r;
  double s = 0;
  while (true) {
    opt.batch_size = batch;
    try {
      const auto t0 = std::chrono::steady_clock::now();
      r = aligner::generate(m, prompts, opt);  // ends by reading the last tokens: the device is done
      s = seconds_since(t0);
      break;
    } catch (const c10::Error& e) {
      if (!is_out_of_memory(e) || batch == 1) throw;
      batch /= 2;
#ifdef ALIGNER_WITH_CUDA
      c10::cuda::CUDACachingAllocator::emptyCache();
#endif
    }
  }

  // What one decoding step must read: every weight once (all but the embedding table, of which
  // it reads one row per sequence, unless it doubles as the LM head), and each live sequence's KV
  // cache. Over the run: ceil(N / batch) * NEW steps of weights, and per sequence and step
  // P + t cached tokens, which sums to N * NEW * (P + NEW / 2) tokens.
  std::set<const void*> seen;
  double weight_bytes = 0;
  for (const auto& [name, t] : aligner::named_parameters(m)) {
    if (!seen.insert(t.data_ptr()).second) continue;
    if (name == "model.embed_tokens.weight" && !m.cfg.tie_word_embeddings) continue;
    weight_bytes += double(t.numel()) * double(t.element_size());
  }
  const double kv_token = double(aligner::kv_bytes_per_token(m.cfg, at::kBFloat16));
  const double steps = double((N + batch - 1) / batch) * double(NEW);
  const double kv_total = double(N) * double(NEW) * (double(P) + double(NEW) / 2) * kv_token;
  const double bandwidth = copy_bandwidth(device);
  const double bound_s = (steps * weight_bytes + kv_total) / bandwidth;
  const double generated = double(r.generated_tokens);
  std::printf(
      "{\"batch\": %lld, \"seconds\": %.3f, \"generated_tokens\": %.0f, \"tokens_per_s\": %.1f, "
      "\"weight_gb\": %.3f, \"kv_gb_per_step\": %.3f, \"copy_gb_per_s\": %.1f, \"bound_tokens_per_s\": %.1f, "
      "\"fraction_of_bound\": %.4f}\n",
      (long long)batch, s, generated, generated / s, weight_bytes / 1e9, kv_total / steps / 1e9,
      bandwidth / 1e9, generated / bound_s, (generated / s) / (generated / bound_s));
  return 0;
}
