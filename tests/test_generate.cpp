// The generation engine: cached decoding against the full forward, greedy outputs against
// transformers (fixtures made by scripts/make_generation_fixtures.py), log-probs against a
// teacher-forced pass, seeds, sampling frequencies, continuous batching, and `aligner generate`.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <numeric>
#include <random>
#include <set>

#include "core/error.h"
#include "data/prompt_data.h"
#include "gen/cuda_decoder.h"
#include "gen/engine.h"
#include "gen/kv_cache.h"
#include "gen/sampling.h"
#include "gen/sequence_stream.h"
#include "io/hf_checkpoint.h"
#include "model/transformer.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace aligner;

namespace {

const std::string kRoot = ALIGNER_SOURCE_DIR;
const std::string kFixtures = kRoot + "/tests/fixtures/models/";

// ALIGNER_TEST_DEVICE=cuda runs the engine tests on the GPU, where generation takes the CUDA
// decoder (scripts/gpu_session.sh does); the CPU otherwise.
at::Device test_device() {
  const char* d = std::getenv("ALIGNER_TEST_DEVICE");
  return d && std::string(d) == "cuda" ? at::Device(at::kCUDA) : at::Device(at::kCPU);
}

const Transformer& fixture(const std::string& name) {
  static std::map<std::string, Transformer> models;
  auto it = models.find(name);
  if (it == models.end())
    it = models.emplace(name, load_transformer(kFixtures + name, test_device(), at::kFloat)).first;
  return it->second;
}

std::vector<std::vector<int32_t>> random_prompts(const std::vector<int64_t>& lengths, int64_t vocab,
                                                 uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> id(0, int32_t(vocab) - 1);
  std::vector<std::vector<int32_t>> out;
  for (int64_t n : lengths) {
    std::vector<int32_t> p(n);
    for (auto& t : p) t = id(rng);
    out.push_back(p);
  }
  return out;
}

// Logits of the last position of `ids` from the training forward on the whole sequence alone.
at::Tensor full_forward_last(const Transformer& m, const std::vector<int32_t>& ids) {
  at::NoGradGuard g;
  auto x =
      at::tensor(std::vector<int64_t>(ids.begin(), ids.end()), at::kLong).unsqueeze(0).to(m.embed.device());
  return lm_logits(m, forward_hidden(m, {x}))[0][-1];
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

GenerationOptions greedy_options(int64_t max_new_tokens) {
  GenerationOptions o;
  o.max_new_tokens = max_new_tokens;
  o.sampling.greedy = true;
  return o;
}

// ---------------------------------------------------------------- cached forward

class GenerateCache : public ::testing::TestWithParam<std::string> {};

// Slots at different positions in one batch, one slot left empty, one slot refilled with a new
// prompt mid-way: every step's logits equal the full forward's on the sequence so far. Mistral's
// window (8) is passed by the longer sequences; llama3, mistral and qwen2 use grouped-query heads.
TEST_P(GenerateCache, DecodeLogitsEqualTheFullForward) {
  const Transformer& m = fixture(GetParam());
  at::NoGradGuard g;
  KvCache cache = allocate_kv_cache(m.cfg, 4, 40, m.embed.options());
  auto prompts = random_prompts({3, 11, 6, 9}, m.cfg.vocab_size, 1);
  // Slot 1 stays empty; prompt 3 replaces slot 0's sequence after 5 steps.
  std::vector<std::vector<int32_t>> seqs(4);
  const std::vector<int64_t> live = {0, 2, 3};
  auto logits = prefill(m, cache, {prompts[0], prompts[1], prompts[2]}, {{0}, {2}, {3}});
  seqs[0] = prompts[0], seqs[2] = prompts[1], seqs[3] = prompts[2];
  std::mt19937 rng(2);
  double worst = 0;
  auto check = [&](const at::Tensor& row, int64_t slot) {
    worst = std::max(worst, (row - full_forward_last(m, seqs[slot])).abs().max().item<double>());
  };
  for (size_t i = 0; i < live.size(); ++i) check(logits[i], live[i]);
  for (int step = 0; step < 14; ++step) {
    if (step == 5) {
      seqs[0] = prompts[3];
      check(prefill(m, cache, {prompts[3]}, {{0}})[0], 0);
    }
    std::vector<int64_t> tokens(4);
    for (int64_t s : live) {
      tokens[s] = int64_t(rng() % m.cfg.vocab_size);
      seqs[s].push_back(int32_t(tokens[s]));
    }
    int64_t span = 0;
    for (int64_t s : live) span = std::max<int64_t>(span, seqs[s].size());
    logits = decode_step(m, cache, at::tensor(tokens, at::kLong).to(m.embed.device()), span);
    for (int64_t s : live) check(logits[s], s);
  }
  EXPECT_LT(worst, 1e-5);
  // The lengths followed the sequences (the empty slot's is whatever it is, within bounds).
  for (int64_t s : live) EXPECT_EQ(cache.lengths[s].item<int64_t>(), int64_t(seqs[s].size()));
}

INSTANTIATE_TEST_SUITE_P(Generate, GenerateCache,
                         ::testing::Values("llama2", "llama3", "mistral", "qwen2", "llama_bias",
                                           "llama_linear", "qwen3", "nemotron", "mixtral"));

// ---------------------------------------------------------------- greedy parity with transformers

class GenerateParity : public ::testing::TestWithParam<std::string> {};

TEST_P(GenerateParity, GreedyMatchesTransformers) {
  const std::string path = kFixtures + GetParam() + "/greedy.json";
  std::ifstream f(path);
  if (!f)
    FAIL() << "missing " << path
           << ": run `python3 scripts/make_generation_fixtures.py` from the repo root on a machine with "
              "transformers 5.x (the GPU machine)";
  const auto ref = nlohmann::json::parse(f);
  const Transformer& m = fixture(GetParam());
  std::vector<std::vector<int32_t>> prompts, expected;
  for (const auto& c : ref["cases"]) {
    prompts.push_back(c["prompt"].get<std::vector<int32_t>>());
    expected.push_back(c["output"].get<std::vector<int32_t>>());
  }
  // All prompts in one batch, then two slots for all of them (continuous batching).
  for (int64_t batch_size : {int64_t(0), int64_t(2)}) {
    auto opt = greedy_options(ref["max_new_tokens"].get<int64_t>());
    opt.batch_size = batch_size;
    const auto r = generate(m, prompts, opt);
    for (size_t i = 0; i < prompts.size(); ++i)
      EXPECT_EQ(r.sequences[i].tokens, expected[i]) << "prompt " << i << ", batch_size " << batch_size;
  }
}

INSTANTIATE_TEST_SUITE_P(Generate, GenerateParity,
                         ::testing::Values("llama2", "llama3", "mistral", "qwen2", "llama_bias",
                                           "llama_linear", "llama_dynamic", "qwen3", "nemotron", "mixtral"));

// ---------------------------------------------------------------- log-probs, seeds

GenerationOptions sampling_options(uint64_t seed) {
  GenerationOptions o;
  o.max_new_tokens = 12;
  o.sampling = {false, 0.7, 20, 0.9};
  o.num_samples = 2;
  o.batch_size = 3;
  o.seed = seed;
  return o;
}

// The returned log-probs are the model's own (temperature 1, unfiltered), which is what a policy
// gradient compares with the training forward; with temperature 0.7 and top-k/top-p the filtered
// distribution's log-probs would differ from these by far more than the tolerance.
TEST(Generate, LogprobsEqualTeacherForcedForward) {
  for (const std::string name : {"mistral", "llama3"}) {
    const Transformer& m = fixture(name);
    auto prompts = random_prompts({5, 12, 1, 9}, m.cfg.vocab_size, 3);
    const auto r = generate(m, prompts, sampling_options(11));
    ASSERT_EQ(r.sequences.size(), 8u);
    const auto b = collate_generations(prompts, r, 0, m.embed.device());
    at::NoGradGuard g;
    const auto hidden = forward_hidden(m, {b.input_ids, b.attention_mask, b.position_ids});
    const auto teacher = token_logprobs(m, hidden, b.labels);
    EXPECT_EQ(b.response_mask.sum().item<double>(), double(r.generated_tokens)) << name;
    EXPECT_LT(((teacher - b.logprobs) * b.response_mask).abs().max().item<double>(), 1e-4) << name;
    // The labels are the responses, placed after their prompts.
    const auto& s = r.sequences[5];
    const int64_t P = int64_t(prompts[s.prompt_index].size());
    for (int64_t j = 0; j < int64_t(s.tokens.size()); ++j)
      EXPECT_EQ(b.labels[5][P - 1 + j].item<int64_t>(), s.tokens[j]);
  }
}

TEST(Generate, SeedReproducesSamplesAndAnotherSeedDiffers) {
  const Transformer& m = fixture("llama3");
  auto prompts = random_prompts({4, 7, 2}, m.cfg.vocab_size, 4);
  auto tokens = [&](uint64_t seed) {
    std::vector<std::vector<int32_t>> out;
    for (const auto& s : generate(m, prompts, sampling_options(seed)).sequences) out.push_back(s.tokens);
    return out;
  };
  const auto a = tokens(5);
  EXPECT_EQ(a, tokens(5));
  EXPECT_NE(a, tokens(6));
  // The two samples of one prompt differ too: they draw separately.
  EXPECT_NE(a[0], a[1]);
}

// A session keeps the KV cache (and on CUDA the captured decoding graphs) from one call to the
// next; the draws are those of calls without one, also after the weights change in place as
// training changes them, and after a call of another shape.
TEST(Generate, ASessionKeptAcrossCallsGivesWhatFreshCallsGive) {
  const Transformer& original = fixture("llama3");
  Transformer m = allocate_transformer(original.cfg, original.embed.options());
  auto theirs = named_parameters(original), ours = named_parameters(m);
  for (size_t i = 0; i < ours.size(); ++i) ours[i].second.copy_(theirs[i].second);
  const auto prompts = random_prompts({4, 7, 2}, m.cfg.vocab_size, 4);
  auto tokens = [&](const std::vector<std::vector<int32_t>>& p, uint64_t seed,
                    std::shared_ptr<DecodeSession> s) {
    auto opt = sampling_options(seed);
    opt.session = std::move(s);
    std::vector<std::vector<int32_t>> out;
    for (const auto& seq : generate(m, p, opt).sequences) out.push_back(seq.tokens);
    return out;
  };
  const auto session = make_decode_session();
  EXPECT_EQ(tokens(prompts, 5, session), tokens(prompts, 5, nullptr));
  EXPECT_EQ(tokens(prompts, 6, session), tokens(prompts, 6, nullptr));
  {
    at::NoGradGuard no_grad;
    for (auto& [name, t] : ours) t.mul_(1.5);  // in place, as an optimizer step
  }
  EXPECT_EQ(tokens(prompts, 5, session), tokens(prompts, 5, nullptr));
  const auto shorter = random_prompts({3}, m.cfg.vocab_size, 9);
  EXPECT_EQ(tokens(shorter, 7, session), tokens(shorter, 7, nullptr));
  EXPECT_EQ(tokens(prompts, 8, session), tokens(prompts, 8, nullptr));
}

// ---------------------------------------------------------------- sampling distribution

// The filtered distribution computed directly, in double: temperature, then top-k (ties with the
// k-th kept), then top-p as transformers defines it (keep a token while the mass of the tokens
// more likely than it is below top_p).
std::vector<double> expected_distribution(const std::vector<double>& logits, const SamplingParams& p) {
  const size_t V = logits.size();
  std::vector<double> z(V);
  for (size_t i = 0; i < V; ++i) z[i] = logits[i] / p.temperature;
  std::vector<bool> keep(V, true);
  if (p.top_k > 0) {
    auto sorted = z;
    std::sort(sorted.rbegin(), sorted.rend());
    for (size_t i = 0; i < V; ++i) keep[i] = z[i] >= sorted[p.top_k - 1];
  }
  auto normalise = [&] {
    std::vector<double> q(V, 0.0);
    double sum = 0;
    for (size_t i = 0; i < V; ++i)
      if (keep[i]) sum += q[i] = std::exp(z[i]);
    for (auto& x : q) x /= sum;
    return q;
  };
  auto q = normalise();
  if (p.top_p < 1) {
    std::vector<size_t> order(V);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return q[a] > q[b]; });
    double above = 0;
    for (size_t i : order) {
      if (above >= p.top_p) keep[i] = false;
      above += q[i];
    }
    q = normalise();
  }
  return q;
}

// 20,000 draws per setting. A frequency's standard deviation is sqrt(p (1 - p) / n) <= 0.0036, so
// the bound 0.018 is five of them (a false alarm has probability below 1e-6 per token, and the
// seed is fixed anyway), while in each filtered setting leaving out the temperature, the top-k or
// the top-p filter, or keeping one token more or less, moves some probability by 0.05 or more.
// Filtered-out tokens must never be drawn.
TEST(GenerateSampling, FrequenciesMatchTheFilteredDistribution) {
  const std::vector<double> logits = {2.0, 1.6, 1.5, 1.1, 0.7, 0.2, -0.3, -1.0, 0.9, 1.3};
  const int64_t n = 20000, V = int64_t(logits.size());
  const std::vector<SamplingParams> settings = {{false, 1.0, 0, 1.0},
                                                {false, 0.6, 0, 1.0},
                                                {false, 1.0, 4, 1.0},
                                                {false, 1.5, 0, 0.6},
                                                {false, 0.7, 5, 0.8}};
  auto gen = make_generator(at::kCPU, 123);
  const auto row = at::tensor(logits, at::kDouble).to(at::kFloat);
  for (const auto& p : settings) {
    const auto expected = expected_distribution(logits, p);
    const auto direct = sampling_logprobs(row.unsqueeze(0), p).exp()[0];
    for (int64_t i = 0; i < V; ++i) EXPECT_NEAR(direct[i].item<double>(), expected[i], 1e-6);
    const auto draws = sample_tokens(row.unsqueeze(0).expand({n, V}), p, gen);
    const auto counts = at::bincount(draws, {}, V).to(at::kDouble) / double(n);
    for (int64_t i = 0; i < V; ++i) {
      const double f = counts[i].item<double>();
      if (expected[i] == 0)
        EXPECT_EQ(f, 0.0) << "token " << i << " is filtered out; T=" << p.temperature << " k=" << p.top_k
                          << " p=" << p.top_p;
      else
        EXPECT_LT(std::abs(f - expected[i]), 0.018)
            << "token " << i << ": frequency " << f << ", probability " << expected[i]
            << "; T=" << p.temperature << " k=" << p.top_k << " p=" << p.top_p;
    }
  }
  EXPECT_EQ(sample_tokens(row.unsqueeze(0), {true, 1, 0, 1}, gen).item<int64_t>(), 0);
}

// ---------------------------------------------------------------- CUDA decoder (needs a GPU)

// The CUDA sampling kernel draws from the same filtered distributions, in the small vocabulary
// above (a thread per token) and in a large one (runs of tokens per thread), with seeded streams.
TEST(CudaSampling, FrequenciesMatchTheFilteredDistribution) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  const int64_t n = 20000;
  auto check = [&](const std::vector<double>& logits, const SamplingParams& p) {
    const int64_t V = int64_t(logits.size());
    const auto expected = expected_distribution(logits, p);
    const auto row = at::tensor(logits, at::kDouble).to(at::kFloat).to(at::kCUDA);
    std::vector<int64_t> streams(n);
    for (int64_t i = 0; i < n; ++i) streams[i] = int64_t(sequence_stream(7, uint64_t(i)));
    const auto s = at::tensor(streams, at::kLong).to(at::kCUDA);
    const auto positions = at::full({n}, 3, s.options());
    const auto [tokens, logprobs] = cuda_sample(row.unsqueeze(0).expand({n, V}), p, s, positions);
    const auto counts = at::bincount(tokens.cpu(), {}, V).to(at::kDouble) / double(n);
    for (int64_t i = 0; i < V; ++i) {
      const double f = counts[i].item<double>();
      if (expected[i] == 0)
        ASSERT_EQ(f, 0.0) << "token " << i << " is filtered out; V=" << V << " T=" << p.temperature
                          << " k=" << p.top_k << " p=" << p.top_p;
      else
        EXPECT_LT(std::abs(f - expected[i]), 0.018)
            << "token " << i << ": frequency " << f << ", probability " << expected[i] << "; V=" << V
            << " T=" << p.temperature << " k=" << p.top_k << " p=" << p.top_p;
    }
    // The log-probs are the raw logits' at the drawn tokens; the same streams draw the same tokens.
    const auto raw = at::log_softmax(row, -1).index_select(0, tokens);
    EXPECT_LT((raw - logprobs).abs().max().item<double>(), 1e-5);
    EXPECT_TRUE(
        at::equal(std::get<0>(cuda_sample(row.unsqueeze(0).expand({n, V}), p, s, positions)), tokens));
    EXPECT_FALSE(
        at::equal(std::get<0>(cuda_sample(row.unsqueeze(0).expand({n, V}), p, s, positions + 1)), tokens));
  };
  const std::vector<double> small = {2.0, 1.6, 1.5, 1.1, 0.7, 0.2, -0.3, -1.0, 0.9, 1.3};
  for (const auto& p : std::vector<SamplingParams>{{false, 1.0, 0, 1.0},
                                                   {false, 0.6, 0, 1.0},
                                                   {false, 1.0, 4, 1.0},
                                                   {false, 1.5, 0, 0.6},
                                                   {false, 0.7, 5, 0.8}})
    check(small, p);
  // 40,000 tokens: the ten above, a tie with the k-th among them, and the rest far below.
  std::vector<double> large(40000, -30.0);
  for (size_t i = 0; i < small.size(); ++i) large[1000 + 3989 * i] = small[i];
  large[39999] = 1.5;
  for (const auto& p :
       std::vector<SamplingParams>{{false, 1.0, 3, 1.0}, {false, 0.8, 0, 0.7}, {false, 1.2, 6, 0.9}})
    check(large, p);
  // Greedy: the first of equal maxima.
  large[20000] = 2.0;
  const auto one = at::tensor(large, at::kDouble).to(at::kFloat).to(at::kCUDA).unsqueeze(0);
  const auto zero = at::zeros({1}, at::TensorOptions().dtype(at::kLong).device(at::kCUDA));
  EXPECT_EQ(std::get<0>(cuda_sample(one, {true, 1, 0, 1}, zero, zero)).item<int64_t>(), 1000);
}

// A random model on the GPU with the given attention shape, in `dtype`.
Transformer cuda_model(int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t window,
                       at::ScalarType dtype) {
  nlohmann::json j = {{"model_type", window > 0 ? "mistral" : "llama"},
                      {"vocab_size", 512},
                      {"hidden_size", heads * head_dim},
                      {"intermediate_size", 192},
                      {"num_hidden_layers", 2},
                      {"num_attention_heads", heads},
                      {"num_key_value_heads", kv_heads},
                      {"max_position_embeddings", 256},
                      {"torch_dtype", "float32"}};
  if (window > 0) j["sliding_window"] = window;
  const auto dir = aligner::test::temp_dir("cuda_model") / "m";
  save_transformer(init_transformer(parse_model_config(j, "cuda test model"), at::kCPU, 5), dir.string(),
                   std::nullopt, 0, "");
  return load_transformer(dir.string(), at::kCUDA, dtype);
}

// The largest gap between the log-probs that `gen_model` reports for what it samples (with or
// without the CUDA kernels) and the teacher-forced ones of the float32 model m.
double teacher_error(const Transformer& m, const Transformer& gen_model,
                     const std::vector<std::vector<int32_t>>& prompts, GenerationOptions opt, bool kernels) {
  opt.cuda_kernels = kernels;
  const auto r = generate(gen_model, prompts, opt);
  const auto b = collate_generations(prompts, r, 0, at::kCUDA);
  at::NoGradGuard g;
  const auto teacher =
      token_logprobs(m, forward_hidden(m, {b.input_ids, b.attention_mask, b.position_ids}), b.labels);
  return ((teacher - b.logprobs) * b.response_mask).abs().max().item<double>();
}

// Greedy generation with the captured, fused decoding step equals the ATen step's, slots refilled
// as sequences of different lengths end.
void expect_fused_step_equals_aten(const Transformer& m, const std::string& where, double tolerance = 1e-4) {
  ASSERT_TRUE(cuda_decoding_supported(m)) << where;
  const auto prompts = random_prompts({5, 17, 1, 30, 9, 2, 12}, m.cfg.vocab_size, 9);
  auto opt = greedy_options(20);
  opt.stop_at_eos = false;
  opt.batch_size = 3;
  opt.stop_ids = {7, 11, 13};  // ends some sequences early, so that slots are refilled
  const auto fused = generate(m, prompts, opt);
  opt.cuda_kernels = false;
  const auto aten = generate(m, prompts, opt);
  for (size_t i = 0; i < prompts.size(); ++i) {
    EXPECT_EQ(fused.sequences[i].tokens, aten.sequences[i].tokens) << where << ", prompt " << i;
    ASSERT_EQ(fused.sequences[i].logprobs.size(), aten.sequences[i].logprobs.size());
    for (size_t j = 0; j < fused.sequences[i].logprobs.size(); ++j)
      EXPECT_NEAR(fused.sequences[i].logprobs[j], aten.sequences[i].logprobs[j], tolerance) << where;
  }
}

// The fused step against the ATen step on attention shapes the fixtures do not have: 8 query heads
// per KV head, none shared, 12 (two passes of the kernel), 3, and a sliding window shorter than
// the sequences.
TEST(CudaDecoder, GreedyOutputsAndLogprobsEqualTheAtenStep) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  struct Shape {
    int64_t heads, kv_heads, head_dim, window;
  };
  for (const Shape& sh : {Shape{16, 2, 64, 0}, Shape{4, 4, 128, 0}, Shape{12, 1, 32, 0}, Shape{6, 2, 64, 0},
                          Shape{8, 2, 16, 6}})
    expect_fused_step_equals_aten(cuda_model(sh.heads, sh.kv_heads, sh.head_dim, sh.window, at::kFloat),
                                  std::to_string(sh.heads) + "/" + std::to_string(sh.kv_heads) +
                                      " heads of " + std::to_string(sh.head_dim) + ", window " +
                                      std::to_string(sh.window));
  // Weights that no longer lie back to back (replaced after loading) take one GEMM each.
  auto m = cuda_model(16, 2, 64, 0, at::kFloat);
  for (auto& b : m.layers) b.k.weight = b.k.weight.clone(), b.up.weight = b.up.weight.clone();
  ASSERT_FALSE(joined_linear({&m.layers[0].q, &m.layers[0].k, &m.layers[0].v}));
  ASSERT_FALSE(joined_linear({&m.layers[0].gate, &m.layers[0].up}));
  expect_fused_step_equals_aten(m, "separate projections");
}

// The newer families through the fused step: Qwen3's per-head norms, Nemotron's LayerNorm1P,
// squared ReLU and partial rotary embeddings (half of each head rotates), and in bfloat16 Mixtral's
// experts as grouped GEMMs inside the captured graph (its fixture routes unevenly; float32 experts
// have no fused grouped GEMM, so they decode with the ATen step).
TEST(CudaDecoder, NewFamiliesEqualTheAtenStep) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  for (const std::string name : {"qwen3", "nemotron", "mixtral"}) {
    const auto m = load_transformer(kFixtures + name, at::kCUDA, at::kFloat);
    if (name == "mixtral")
      EXPECT_FALSE(cuda_decoding_supported(m));
    else
      expect_fused_step_equals_aten(m, name);
    const auto low = load_transformer(kFixtures + name, at::kCUDA, at::kBFloat16);
    ASSERT_TRUE(cuda_decoding_supported(low)) << name;
    const auto prompts = random_prompts({5, 17, 1, 30, 40}, m.cfg.vocab_size, 10);
    auto opt = sampling_options(3);
    opt.max_new_tokens = 40;
    const double fused = teacher_error(m, low, prompts, opt, true),
                 aten = teacher_error(m, low, prompts, opt, false);
    EXPECT_LT(fused, 2 * aten + 0.02) << name << " bf16: fused " << fused << ", ATen " << aten;
  }
}

// Sampled with filters on the fused path, the log-probs are the teacher-forced ones (fp32); in
// bfloat16 and float16 (tensor-core attention) they stay as close to the float32 model's as the
// ATen step's own, for the shapes above.
TEST(CudaDecoder, SampledLogprobsEqualTeacherForcedAnd16BitStaysClose) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  struct Shape {
    int64_t heads, kv_heads, head_dim, window;
  };
  for (const Shape& sh :
       {Shape{16, 2, 64, 0}, Shape{4, 4, 128, 0}, Shape{12, 1, 32, 0}, Shape{8, 2, 16, 6}}) {
    const auto m = cuda_model(sh.heads, sh.kv_heads, sh.head_dim, sh.window, at::kFloat);
    const auto prompts = random_prompts({5, 17, 1, 30, 40}, m.cfg.vocab_size, 10);
    auto opt = sampling_options(3);
    opt.max_new_tokens = 40;
    const std::string where = std::to_string(sh.heads) + "/" + std::to_string(sh.kv_heads) + " heads of " +
                              std::to_string(sh.head_dim) + ", window " + std::to_string(sh.window);
    EXPECT_LT(teacher_error(m, m, prompts, opt, true), 1e-4) << where;
    for (const auto dtype : {at::kBFloat16, at::kHalf}) {
      const auto low = cuda_model(sh.heads, sh.kv_heads, sh.head_dim, sh.window, dtype);
      const double fused = teacher_error(m, low, prompts, opt, true),
                   aten = teacher_error(m, low, prompts, opt, false);
      EXPECT_LT(fused, 2 * aten + 0.02)
          << where << ", " << c10::toString(dtype) << ": fused " << fused << ", ATen " << aten;
    }
  }
}

// ---------------------------------------------------------------- continuous batching

// Stop ids make the sequences end at different steps, so slots free up and are refilled while
// others decode; a small prefill budget splits the refills into several prefill batches. Every
// sequence comes out as it does alone.
TEST(GenerateBatching, SlotsRefilledMidwayGiveTheSameOutputsAsAlone) {
  for (const std::string name : {"mistral", "llama3"}) {
    const Transformer& m = fixture(name);
    auto prompts = random_prompts({6, 1, 14, 3, 9, 20, 2}, m.cfg.vocab_size, 7);
    auto opt = greedy_options(16);
    opt.stop_at_eos = false;
    // Stop ids taken from the unstopped outputs at different steps.
    const auto unstopped = generate(m, prompts, opt);
    for (size_t i = 0; i < prompts.size(); ++i)
      opt.stop_ids.push_back(unstopped.sequences[i].tokens.at(1 + 2 * i));
    std::vector<GeneratedSequence> alone;
    for (const auto& p : prompts) alone.push_back(generate(m, {p}, opt).sequences[0]);
    std::set<size_t> lengths;
    for (const auto& s : alone) lengths.insert(s.tokens.size());
    ASSERT_GE(lengths.size(), 3u) << "the stop ids should end sequences at different steps";
    opt.batch_size = 3;
    opt.prefill_tokens = 12;
    opt.num_samples = 2;
    const auto r = generate(m, prompts, opt);
    for (size_t i = 0; i < r.sequences.size(); ++i) {
      const auto& s = r.sequences[i];
      const auto& a = alone[s.prompt_index];
      EXPECT_EQ(s.tokens, a.tokens) << name << " prompt " << s.prompt_index << " sample " << s.sample_index;
      EXPECT_EQ(s.finish, a.finish);
      ASSERT_EQ(s.logprobs.size(), a.logprobs.size());
      for (size_t j = 0; j < s.logprobs.size(); ++j) EXPECT_NEAR(s.logprobs[j], a.logprobs[j], 1e-5);
    }
  }
}

// The context caps a sequence: a prompt one token short of it gets exactly one token.
TEST(GenerateBatching, ContextEndsSequencesWithLength) {
  const Transformer& m = fixture("llama2");
  const int64_t ctx = m.cfg.max_position_embeddings;
  auto prompts = random_prompts({ctx - 1, ctx - 3, 4}, m.cfg.vocab_size, 8);
  auto opt = greedy_options(5);
  opt.stop_at_eos = false;
  const auto r = generate(m, prompts, opt);
  EXPECT_EQ(r.sequences[0].tokens.size(), 1u);
  EXPECT_EQ(r.sequences[1].tokens.size(), 3u);
  EXPECT_EQ(r.sequences[2].tokens.size(), 5u);
  for (const auto& s : r.sequences) EXPECT_EQ(s.finish, FinishReason::kLength);
}

// ---------------------------------------------------------------- bad input

TEST(GenerateErrors, BadPromptsAndOptionsNameTheCulprit) {
  const Transformer& m = fixture("llama2");
  auto opt = greedy_options(4);
  EXPECT_NE(error_of([&] { generate(m, {{1, 2}, {}}, opt); }).find("prompt 1 is empty"), std::string::npos);
  const std::vector<int32_t> longest(m.cfg.max_position_embeddings, 5);
  EXPECT_NE(
      error_of([&] {
        generate(m, {longest}, opt);
      }).find("prompt 0 has 128 tokens, which leaves no room to generate in the model's context of 128"),
      std::string::npos);
  EXPECT_NE(error_of([&] {
              generate(m, {{1, 300}}, opt);
            }).find("prompt 0: token id 300 is outside"),
            std::string::npos);
  EXPECT_NE(
      error_of([&] { generate(m, {{1}}, greedy_options(0)); }).find("max_new_tokens must be at least 1"),
      std::string::npos);
  auto bad = sampling_options(1);
  bad.sampling.temperature = -1;
  EXPECT_NE(error_of([&] { generate(m, {{1}}, bad); }).find("temperature must be positive (or 0: greedy)"),
            std::string::npos);
  bad = sampling_options(1);
  bad.sampling.top_p = 0;
  EXPECT_NE(error_of([&] { generate(m, {{1}}, bad); }).find("top_p must be in (0, 1]"), std::string::npos);
  bad = sampling_options(1);
  bad.stop_strings = {"x"};
  EXPECT_NE(error_of([&] { generate(m, {{1}}, bad); }).find("stop strings need a tokenizer"),
            std::string::npos);
}

// ---------------------------------------------------------------- with a tokenizer: stop strings, CLI

using aligner::test::Run;
using aligner::test::run_aligner;
using aligner::test::temp_dir;

const std::string& tiny_model() {
  return aligner::test::tiny_model(64);
}

TEST(GenerateStop, StopStringEndsTheResponseAtTheTokenThatCompletesIt) {
  const auto m = load_transformer(tiny_model(), at::kCPU);
  const auto tok = load_tokenizer(tiny_model());
  auto opt = greedy_options(24);
  opt.stop_at_eos = false;
  opt.tokenizer = tok.get();
  const std::vector<std::vector<int32_t>> prompts = {tok->encode("The quick brown fox")};
  const auto full = generate(m, prompts, opt).sequences[0].tokens;
  ASSERT_EQ(full.size(), 24u);
  // A stop string made of the end of token 6's text and the start of token 7's.
  const std::string a = tok->decode({full[6]}), b = tok->decode({full[7]});
  ASSERT_FALSE(a.empty() || b.empty());
  const std::string stop = a.substr(a.size() - 1) + b.substr(0, 1);
  size_t expected = 1;
  while (expected < full.size() &&
         tok->decode({full.begin(), full.begin() + expected}).find(stop) == std::string::npos)
    ++expected;
  ASSERT_LE(expected, 8u) << "'" << stop << "' is in the first 8 tokens' text";
  opt.stop_strings = {stop};
  const auto r = generate(m, prompts, opt).sequences[0];
  EXPECT_EQ(r.tokens, std::vector<int32_t>(full.begin(), full.begin() + expected)) << "stop '" << stop << "'";
  EXPECT_EQ(r.finish, FinishReason::kStop);
}

// The text ends before the stop string (after it with include_stop), and the tokens kept are the
// fewest whose text covers it.
TEST(GenerateStop, TextEndsBeforeTheStopStringUnlessIncluded) {
  const auto m = load_transformer(tiny_model(), at::kCPU);
  const auto tok = load_tokenizer(tiny_model());
  auto opt = greedy_options(24);
  opt.stop_at_eos = false;
  opt.tokenizer = tok.get();
  const std::vector<std::vector<int32_t>> prompts = {tok->encode("The quick brown fox")};
  const auto full = generate(m, prompts, opt).sequences[0].tokens;
  // Stop strings inside a token, across tokens, and at a token's start.
  const std::string text = tok->decode(full, true);
  const std::string a = tok->decode({full[6]}), b = tok->decode({full[7]});
  for (const std::string& stop : {a.substr(a.size() - 1) + b.substr(0, 1), b, b.substr(0, 1)}) {
    opt.stop_strings = {stop};
    const auto s = generate(m, prompts, opt).sequences[0];
    ASSERT_EQ(s.finish, FinishReason::kStop) << stop;
    const std::string made = tok->decode(s.tokens, true);
    const size_t at = made.find(stop);
    ASSERT_NE(at, std::string::npos);
    for (const bool include : {false, true}) {
      const size_t cut = include ? at + stop.size() : at;
      size_t covering = 0;
      while (tok->decode({s.tokens.begin(), s.tokens.begin() + int64_t(covering)}, true).size() < cut)
        ++covering;
      const auto r = response_text(s, *tok, opt.stop_strings, include);
      EXPECT_EQ(r.text, made.substr(0, cut)) << "stop '" << stop << "' include " << include;
      EXPECT_EQ(r.tokens, covering) << "stop '" << stop << "' include " << include;
    }
  }
  // Of several stop strings in the text, the one that completed first cuts it.
  const test::ByteTokenizer bytes({}, "", "");
  GeneratedSequence s;
  const std::string hello = "Hello###";
  s.tokens.assign(hello.begin(), hello.end());
  s.finish = FinishReason::kStop;
  auto r = response_text(s, bytes, {"###", "lo#"}, false);
  EXPECT_EQ(r.text, "Hel");
  EXPECT_EQ(r.tokens, 3u);
  r = response_text(s, bytes, {"###", "lo#"}, true);
  EXPECT_EQ(r.text, "Hello#");
  EXPECT_EQ(r.tokens, 6u);
  // A response that ran out of length is whole.
  s.finish = FinishReason::kLength;
  r = response_text(s, bytes, {"###"}, false);
  EXPECT_EQ(r.text, hello);
  EXPECT_EQ(r.tokens, hello.size());
}

// temperature 0 means greedy, as in vLLM and transformers, in the engine and on the command line.
TEST(GenerateSampling, TemperatureZeroIsGreedy) {
  const Transformer& m = fixture("llama3");
  const auto prompts = random_prompts({3, 7, 5}, m.cfg.vocab_size, 4);
  auto zero = sampling_options(12);
  zero.sampling.temperature = 0;
  auto greedy = zero;
  greedy.sampling = {true, 1.0, 0, 1.0};
  const auto got = generate(m, prompts, zero);
  const auto want = generate(m, prompts, greedy);
  ASSERT_EQ(got.sequences.size(), want.sequences.size());
  for (size_t i = 0; i < got.sequences.size(); ++i) {
    EXPECT_EQ(got.sequences[i].tokens, want.sequences[i].tokens) << i;
    EXPECT_EQ(got.sequences[i].logprobs, want.sequences[i].logprobs) << i;
  }
}

Run aligner(const std::string& args) {
  return run_aligner(args);
}

std::string write_file(const fs::path& path, const std::string& text) {
  std::ofstream(path) << text;
  return path.string();
}

std::vector<nlohmann::json> read_lines(const fs::path& path) {
  std::ifstream f(path);
  std::vector<nlohmann::json> out;
  for (std::string line; std::getline(f, line);) out.push_back(nlohmann::json::parse(line));
  return out;
}

// Text, chat and id prompts; a blank line does not count as a record. The completions are the
// library's for the prompts as the prompt reader tokenizes them.
TEST(GenerateCli, WritesOneLinePerCompletion) {
  const auto d = temp_dir("cli");
  const auto data = write_file(d / "prompts.jsonl",
                               "{\"prompt\": \"Hello there\"}\n\n"
                               "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}\n"
                               "{\"input_ids\": [5, 6, 7]}\n");
  auto r = aligner(
      "generate --model " + tiny_model() + " --data " + data + " --out " + (d / "out.jsonl").string() +
      " gen.greedy=true gen.num_samples=2 gen.max_new_tokens=6 model.device=cpu data.template=llama3");
  ASSERT_EQ(r.status, 0) << r.output;
  const auto lines = read_lines(d / "out.jsonl");
  ASSERT_EQ(lines.size(), 6u);

  const auto m = load_transformer(tiny_model(), at::kCPU);
  const auto tok = load_tokenizer(tiny_model());
  PromptDataset ds = open_prompt_dataset(data, *tok, resolve_chat_template("llama3", *tok), DataOptions{});
  std::vector<std::vector<int32_t>> prompts;
  for (int64_t i = 0; i < 3; ++i) prompts.push_back(prompt_example(ds, i)->input_ids);
  auto opt = greedy_options(6);
  opt.tokenizer = tok.get();
  const auto expected = generate(m, prompts, opt);
  for (size_t i = 0; i < lines.size(); ++i) {
    const auto& l = lines[i];
    const auto& e = expected.sequences[i / 2];
    EXPECT_EQ(l["prompt_index"], i / 2);
    EXPECT_EQ(l["sample_index"], i % 2);
    EXPECT_EQ(l["output_ids"].get<std::vector<int32_t>>(), e.tokens);
    EXPECT_EQ(l["text"], tok->decode(e.tokens, true));
    ASSERT_EQ(l["logprobs"].size(), e.tokens.size());
    EXPECT_NEAR(l["logprobs"][0].get<double>(), e.logprobs[0], 1e-6);
    EXPECT_EQ(l["finish_reason"], finish_reason_name(e.finish));
    EXPECT_EQ(l["prompt"], prompt_example(ds, int64_t(i / 2))->text);
  }
  EXPECT_EQ(lines[0]["prompt"], "Hello there");
  EXPECT_EQ(lines[4]["prompt"], tok->decode({5, 6, 7}));

  // The flags are the keys' other spellings; temperature 0 is greedy. Six slots decode all six
  // completions at once, as the default does, so the numbers are the same to the bit.
  r = aligner("generate --model " + tiny_model() + " --data " + data + " --out " +
              (d / "flags.jsonl").string() +
              " --device cpu --batch-size 6 gen.temperature=0 gen.num_samples=2 gen.max_new_tokens=6 "
              "data.template=llama3");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(read_lines(d / "flags.jsonl"), lines);

  // Stop strings reach the engine (with the tokenizer they need).
  r = aligner("generate --model " + tiny_model() + " --data " + data + " --out " +
              (d / "out.jsonl").string() +
              " gen.greedy=true gen.max_new_tokens=6 model.device=cpu data.template=llama3 'gen.stop=[e,a]'");
  ASSERT_EQ(r.status, 0) << r.output;
  opt.stop_strings = {"e", "a"};
  const auto stopped = generate(m, prompts, opt);
  for (const bool include : {false, true}) {
    if (include) {
      r = aligner(
          "generate --model " + tiny_model() + " --data " + data + " --out " + (d / "out.jsonl").string() +
          " gen.greedy=true gen.max_new_tokens=6 model.device=cpu data.template=llama3 'gen.stop=[e,a]' "
          "gen.include_stop_str=true");
      ASSERT_EQ(r.status, 0) << r.output;
    }
    const auto stopped_lines = read_lines(d / "out.jsonl");
    ASSERT_EQ(stopped_lines.size(), 3u);
    for (size_t i = 0; i < 3; ++i) {
      const auto& s = stopped.sequences[i];
      const auto want = response_text(s, *tok, opt.stop_strings, include);
      const auto& l = stopped_lines[i];
      EXPECT_EQ(l["text"], want.text);
      EXPECT_EQ(l["output_ids"].get<std::vector<int32_t>>(),
                std::vector<int32_t>(s.tokens.begin(), s.tokens.begin() + int64_t(want.tokens)));
      EXPECT_EQ(l["logprobs"].size(), want.tokens);
      // Ended by a stop string rather than EOS.
      if (tok->decode(s.tokens, true).find_first_of("ea") != std::string::npos) {
        const std::string& text = l["text"].get<std::string>();
        const bool ends_with_stop = !text.empty() && (text.back() == 'e' || text.back() == 'a');
        EXPECT_EQ(ends_with_stop, include) << l;
        if (!include) EXPECT_EQ(text.find_first_of("ea"), std::string::npos) << l;
      }
    }
  }
}

TEST(GenerateCli, ErrorsNameTheLineOrKey) {
  const auto d = temp_dir("cli_errors");
  const std::string base = "generate --model " + tiny_model() + " --out " + (d / "out.jsonl").string() +
                           " model.device=cpu gen.max_new_tokens=2 --data ";
  const auto ok = write_file(d / "ok.jsonl", "{\"input_ids\": [5, 6, 7]}\n");
  auto r = aligner(base + ok + " gen.temprature=0.5");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("gen.temprature"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("gen.temperature"), std::string::npos) << "no suggestion: " << r.output;

  r = aligner(base + ok + " 'gen.stop_ids=[1,x]'");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("config key 'gen.stop_ids' expects a list of ints, got 'x'"), std::string::npos)
      << r.output;

  for (const auto& [value, message] : std::vector<std::pair<std::string, std::string>>{
           {"gen.batch_size=0", "config key 'gen.batch_size' must be at least 1, got 0"},
           {"gen.num_samples=-2", "config key 'gen.num_samples' must be at least 1, got -2"},
           {"gen.temperature=-1", "config key 'gen.temperature' must not be negative"},
           {"gen.top_p=1.5", "config key 'gen.top_p' must be in (0, 1], got 1.5"}}) {
    r = aligner(base + ok + " " + value);
    EXPECT_EQ(r.status, 1) << value;
    EXPECT_NE(r.output.find(message), std::string::npos) << r.output;
  }

  const auto empty = write_file(d / "empty.jsonl", "{\"input_ids\": [5]}\n{\"input_ids\": []}\n");
  r = aligner(base + empty);
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("empty.jsonl:2: empty prompt"), std::string::npos) << r.output;

  const auto longer =
      write_file(d / "long.jsonl", "{\"input_ids\": [5]}\n{\"input_ids\": [5, 6, 7, 8, 9]}\n");
  r = aligner(base + longer + " data.max_length=4");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("long.jsonl:2: the prompt has 5 tokens, more than 4 (data.max_length=4)"),
            std::string::npos)
      << r.output;
  r = aligner(base + longer + " data.max_length=4 data.truncation=drop");
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(read_lines(d / "out.jsonl").size(), 1u);

  std::string ids = "5";
  for (int i = 0; i < 70; ++i) ids += ", 6";
  const auto context = write_file(d / "context.jsonl", "{\"input_ids\": [" + ids + "]}\n");
  r = aligner(base + context);
  EXPECT_NE(r.status, 0);
  EXPECT_NE(
      r.output.find("context.jsonl:1: the prompt has 71 tokens, more than 63 (the model's context of 64"),
      std::string::npos)
      << r.output;
}

}  // namespace
