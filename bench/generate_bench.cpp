// Times generate() on a model folder: random prompts, sampled at temperature 1 without filters,
// EOS ignored so that every sequence runs to NEW tokens; end to end, and the decoding phase alone.
// bench/generate_bench.py runs it beside transformers' generate on the same GPU and prints the comparison.
// Tries BATCH slots first and halves them until the KV cache and activations fit.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <set>
#include <string>

#include <ATen/CPUGeneratorImpl.h>
#ifdef ALIGNER_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <cuda_profiler_api.h>
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
  // The decoding phase alone: from the end of the first step (all prompts prefilled when they fit
  // in one batch of slots) to the end; every step ends by reading its tokens back, so the device
  // is done when the callback runs.
  std::chrono::steady_clock::time_point start, first_step, end;
  int64_t steps = 0, first_tokens = 0;
  // ALIGNER_PROFILE_STEP=1: the second decoding step alone runs under the CUDA profiler, for
  // `ncu --profile-from-start off --graph-profiling node` (scripts/profile_decode.py).
  [[maybe_unused]] const bool profile = std::getenv("ALIGNER_PROFILE_STEP") != nullptr;
  opt.on_step = [&](int64_t, int64_t generated) {
    if (steps == 0) first_step = std::chrono::steady_clock::now(), first_tokens = generated;
#ifdef ALIGNER_WITH_CUDA
    if (profile && steps == 0) cudaProfilerStart();
    if (profile && steps == 1) cudaProfilerStop();
#endif
    ++steps;
  };
  while (true) {
    opt.batch_size = batch;
    steps = 0;
    try {
      start = std::chrono::steady_clock::now();
      r = aligner::generate(m, prompts, opt);
      end = std::chrono::steady_clock::now();
      s = std::chrono::duration<double>(end - start).count();
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
  const double all_steps = double((N + batch - 1) / batch) * double(NEW);
  const double kv_total = double(N) * double(NEW) * (double(P) + double(NEW) / 2) * kv_token;
  const double bandwidth = copy_bandwidth(device);
  // The same call with one new token: the prefill (and the decoder's setup) without decoding steps.
  opt.max_new_tokens = 1;
  opt.on_step = nullptr;
  const auto t1 = std::chrono::steady_clock::now();
  aligner::generate(m, prompts, opt);
  const double prefill_s = seconds_since(t1);
  const double bound_s = (all_steps * weight_bytes + kv_total) / bandwidth;
  const double generated = double(r.generated_tokens);
  const double bound_tps = generated / bound_s;
  // The decoding phase, when every sequence shares one batch: steps 2..NEW, the step that yields
  // token t reading P + t - 1 cached tokens per sequence.
  double decode_tps = 0, decode_bound_tps = 0;
  if (batch == N) {
    const double decode_s = std::chrono::duration<double>(end - first_step).count();
    const double tokens = generated - double(first_tokens);
    double bytes = 0;
    for (int64_t t = 2; t <= NEW; ++t) bytes += weight_bytes + double(N) * double(P + t - 1) * kv_token;
    decode_tps = tokens / decode_s;
    decode_bound_tps = tokens / (bytes / bandwidth);
  }
  std::printf(
      "{\"batch\": %lld, \"seconds\": %.3f, \"generated_tokens\": %.0f, \"tokens_per_s\": %.1f, "
      "\"weight_gb\": %.3f, \"kv_gb_per_step\": %.3f, \"copy_gb_per_s\": %.1f, \"bound_tokens_per_s\": %.1f, "
      "\"fraction_of_bound\": %.4f, \"decode_tokens_per_s\": %.1f, \"decode_bound_tokens_per_s\": %.1f, "
      "\"first_step_s\": %.3f, \"prefill_s\": %.3f}\n",
      (long long)batch, s, generated, generated / s, weight_bytes / 1e9, kv_total / all_steps / 1e9,
      bandwidth / 1e9, bound_tps, (generated / s) / bound_tps, decode_tps, decode_bound_tps,
      std::chrono::duration<double>(first_step - start).count(), prefill_s);
  return 0;
}
