// The transformer against transformers' own numbers (fixtures made by
// scripts/make_model_fixtures.py), and its behaviour on padding, packing and bad input.
#include <gtest/gtest.h>

#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/autograd/autograd.h>

#include <filesystem>
#include <fstream>
#include <functional>

#include "core/error.h"
#include "io/hf_checkpoint.h"
#include "io/safetensors.h"
#include "model/transformer.h"

namespace fs = std::filesystem;
using namespace aligner;

namespace {

const std::string kFixtures = std::string(ALIGNER_SOURCE_DIR) + "/tests/fixtures/models/";

nlohmann::json read_json(const std::string& path) {
  std::ifstream f(path);
  if (!f) throw std::runtime_error("missing fixture " + path + " (run scripts/make_model_fixtures.py)");
  return nlohmann::json::parse(f);
}

at::Tensor ids_tensor(const std::vector<int64_t>& ids) {
  return at::tensor(ids, at::TensorOptions().dtype(at::kLong)).unsqueeze(0);
}

// Sum of log p(x_t | x_<t) for t >= 1, as `aligner perplexity` reports it.
double sequence_logprob(const Transformer& m, const std::vector<int64_t>& ids) {
  if (ids.size() < 2) return 0.0;
  at::NoGradGuard g;
  auto x = ids_tensor(ids);
  auto h = forward_hidden(m, {x});
  auto targets = at::cat({x.narrow(1, 1, x.size(1) - 1), at::full({1, 1}, -100, x.options())}, 1);
  return token_logprobs(m, h, targets).sum().item<double>();
}

class Parity : public ::testing::TestWithParam<std::string> {};

TEST_P(Parity, LogprobsAndLogitsMatchTransformers) {
  const std::string dir = kFixtures + GetParam();
  const auto ref = read_json(dir + "/reference.json");
  const auto model = load_transformer(dir, at::kCPU, at::kFloat);
  const auto seqs = ref["sequences"].get<std::vector<std::vector<int64_t>>>();
  const auto expected = ref["logprob"].get<std::vector<double>>();
  for (size_t i = 0; i < seqs.size(); ++i)
    EXPECT_NEAR(sequence_logprob(model, seqs[i]), expected[i], 1e-3) << "sequence " << i;

  auto logits = safetensors::File::open(dir + "/reference.safetensors");
  for (int64_t i : ref["logit_sequences"].get<std::vector<int64_t>>()) {
    at::NoGradGuard g;
    auto ours = lm_logits(model, forward_hidden(model, {ids_tensor(seqs[i])}))[0];
    auto theirs = logits.get(fmt::format("logits_{}", i));
    ASSERT_EQ(ours.sizes(), theirs.sizes());
    EXPECT_LT((ours - theirs).abs().max().item<double>(), 1e-4) << "logits of sequence " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(Families, Parity,
                         ::testing::Values("llama2", "llama3", "llama_linear", "llama_dynamic", "llama_bias",
                                           "mistral", "mixtral", "qwen2", "qwen3", "nemotron",
                                           "llama2_sharded", "llama3_bf16"));

ModelConfig tiny_config(const std::string& type = "llama") {
  nlohmann::json j = {{"model_type", type},       {"vocab_size", 64},
                      {"hidden_size", 32},        {"intermediate_size", 48},
                      {"num_hidden_layers", 2},   {"num_attention_heads", 4},
                      {"num_key_value_heads", 2}, {"max_position_embeddings", 64}};
  return parse_model_config(j, "tiny");
}

// Left padding, right padding and no padding must give the same log-probs for the real tokens.
TEST(Model, PaddingDoesNotChangeResults) {
  for (const std::string type : {"llama", "mistral"}) {
    auto cfg = tiny_config(type);
    if (type == "mistral") cfg.window.assign(cfg.num_layers, 4);
    auto m = init_transformer(cfg, at::kCPU, 7);
    at::NoGradGuard g;
    std::vector<int64_t> a = {5, 9, 3, 7, 1, 12, 40, 2, 33, 8}, b = {4, 6, 11};
    auto unpadded = [&](const std::vector<int64_t>& s) { return forward_hidden(m, {ids_tensor(s)})[0]; };
    const int64_t T = a.size(), n = b.size();
    auto pad = at::zeros({1, T - n}, at::kLong);
    for (bool left : {true, false}) {
      auto row_b = left ? at::cat({pad, ids_tensor(b)}, 1) : at::cat({ids_tensor(b), pad}, 1);
      auto mask_b = left ? at::cat({at::zeros({1, T - n}, at::kLong), at::ones({1, n}, at::kLong)}, 1)
                         : at::cat({at::ones({1, n}, at::kLong), at::zeros({1, T - n}, at::kLong)}, 1);
      ForwardInput in{at::cat({ids_tensor(a), row_b}), at::cat({at::ones({1, T}, at::kLong), mask_b})};
      auto h = forward_hidden(m, in);
      EXPECT_TRUE(at::allclose(h[0], unpadded(a), 1e-5, 1e-5)) << type;
      auto real_b = left ? h[1].narrow(0, T - n, n) : h[1].narrow(0, 0, n);
      EXPECT_TRUE(at::allclose(real_b, unpadded(b), 1e-5, 1e-5)) << type << (left ? " left" : " right");
    }
  }
}

// Two sequences packed in one row with restarting positions equal the two run separately.
TEST(Model, PackedSegmentsAreIndependent) {
  auto m = init_transformer(tiny_config(), at::kCPU, 3);
  at::NoGradGuard g;
  std::vector<int64_t> a = {5, 9, 3, 7}, b = {4, 6, 11, 2, 19};
  ForwardInput in;
  in.input_ids = at::cat({ids_tensor(a), ids_tensor(b)}, 1);
  in.position_ids = at::cat({at::arange(4).unsqueeze(0), at::arange(5).unsqueeze(0)}, 1);
  in.segment_ids = at::cat({at::ones({1, 4}, at::kLong), 2 * at::ones({1, 5}, at::kLong)}, 1);
  auto h = forward_hidden(m, in)[0];
  EXPECT_TRUE(at::allclose(h.narrow(0, 0, 4), forward_hidden(m, {ids_tensor(a)})[0], 1e-5, 1e-5));
  EXPECT_TRUE(at::allclose(h.narrow(0, 4, 5), forward_hidden(m, {ids_tensor(b)})[0], 1e-5, 1e-5));
}

// A sliding window must actually limit what a token sees: changing a token outside every later
// token's window leaves those tokens unchanged (one layer, so receptive fields don't compound).
TEST(Model, SlidingWindowLimitsAttention) {
  auto cfg = tiny_config("mistral");
  cfg.num_layers = 1;
  cfg.window = {3};
  auto m = init_transformer(cfg, at::kCPU, 5);
  at::NoGradGuard g;
  std::vector<int64_t> a = {5, 9, 3, 7, 1, 12, 40}, b = a;
  b[0] = 60;
  auto ha = forward_hidden(m, {ids_tensor(a)})[0], hb = forward_hidden(m, {ids_tensor(b)})[0];
  EXPECT_FALSE(at::allclose(ha.narrow(0, 1, 2), hb.narrow(0, 1, 2)));  // tokens 1, 2 see token 0
  EXPECT_TRUE(at::allclose(ha.narrow(0, 3, 4), hb.narrow(0, 3, 4)));   // tokens 3.. do not
}

// transformers 4.x (rope_theta + rope_scaling, torch_dtype) and 5.x (rope_parameters, dtype)
// spellings of one config read the same.
TEST(ModelConfig, ReadsBothTransformersFormats) {
  nlohmann::json v4 = {{"model_type", "llama"},
                       {"vocab_size", 128},
                       {"hidden_size", 64},
                       {"intermediate_size", 96},
                       {"num_hidden_layers", 2},
                       {"num_attention_heads", 8},
                       {"num_key_value_heads", 2},
                       {"head_dim", 16},
                       {"rope_theta", 500000.0},
                       {"rope_scaling",
                        {{"rope_type", "llama3"},
                         {"factor", 8.0},
                         {"low_freq_factor", 1.0},
                         {"high_freq_factor", 4.0},
                         {"original_max_position_embeddings", 8192}}},
                       {"torch_dtype", "bfloat16"},
                       {"eos_token_id", {128001, 128009}}};
  nlohmann::json v5 = v4;
  v5.erase("rope_theta");
  v5.erase("rope_scaling");
  v5.erase("torch_dtype");
  v5["dtype"] = "bfloat16";
  v5["rope_parameters"] = v4["rope_scaling"];
  v5["rope_parameters"]["rope_theta"] = 500000.0;
  for (const auto& j : {v4, v5}) {
    auto c = parse_model_config(j, "config.json");
    EXPECT_EQ(c.rope.type, "llama3");
    EXPECT_DOUBLE_EQ(c.rope.theta, 500000.0);
    EXPECT_DOUBLE_EQ(c.rope.factor, 8.0);
    EXPECT_EQ(c.rope.original_max_position_embeddings, 8192);
    EXPECT_EQ(c.dtype, at::kBFloat16);
    EXPECT_EQ(c.head_dim, 16);
    EXPECT_EQ(c.eos_token_ids, (std::vector<int64_t>{128001, 128009}));
  }
  auto old = v4;
  old["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};  // the oldest spelling
  EXPECT_EQ(parse_model_config(old, "c").rope.type, "linear");
}

TEST(ModelConfig, UnsupportedOptionsAreClearErrors) {
  auto j = tiny_config().raw;
  auto expect_error = [](const nlohmann::json& bad, const std::string& needle) {
    try {
      parse_model_config(bad, "some/config.json");
      FAIL() << "no error for " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("some/config.json"), std::string::npos) << e.what();
    }
  };
  auto bad = j;
  bad["model_type"] = "gpt_neox";
  expect_error(bad, "supported: llama, mistral, mixtral, qwen2, qwen3, nemotron");
  bad = j;
  bad["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}};
  expect_error(bad, "unsupported rope type 'yarn'");
  bad = j;
  bad["hidden_act"] = "gelu";
  expect_error(bad, "hidden_act");
  bad = j;
  bad.erase("hidden_size");
  expect_error(bad, "hidden_size");
  bad = j;
  bad["num_key_value_heads"] = 3;
  expect_error(bad, "num_key_value_heads");
}

// Reproduced with fuzz/model_config.cpp: each of these crashed (division by zero, a vector of -1 layers, an
// out-of-bounds write, an exception other than aligner::Error) or converted 1e300 to an int64.
TEST(ModelConfig, HostileValuesAreClearErrors) {
  const auto j = tiny_config().raw;
  const std::vector<std::pair<nlohmann::json, std::string>> cases = {
      {{{"num_attention_heads", 0}}, "num_attention_heads (0) must be in [1, "},
      {{{"num_hidden_layers", -1}}, "num_hidden_layers (-1) must be in [1, "},
      {{{"vocab_size", 1e300}}, "key 'vocab_size' has the wrong type"},
      {{{"vocab_size", 64.5}}, "key 'vocab_size' has the wrong type"},
      {{{"hidden_size", 18446744073709551615u}}, "key 'hidden_size' has the wrong type"},
      {{{"layer_types", {"full_attention", 1}}}, "layer_types[1] is not a string"},
      {{{"eos_token_id", "</s>"}}, "eos_token_id must be an id or a list of ids"},
      {{{"eos_token_id", {1, nullptr}}}, "eos_token_id must be an id or a list of ids"},
      {{{"sliding_window", -4}}, "sliding_window (-4) is negative"},
      {{{"architectures", {"LlamaForSequenceClassification"}}, {"num_labels", 100000000000}},
       "num_labels (100000000000) must be in [1, "},
  };
  for (const auto& [patch, needle] : cases) {
    auto bad = j;
    bad.update(patch);
    std::string msg = "no aligner::Error";
    try {
      parse_model_config(bad, "some/config.json");
    } catch (const Error& e) {
      msg = e.what();
    }
    EXPECT_NE(msg.find("some/config.json: " + needle), std::string::npos) << patch.dump() << ": " << msg;
  }
  // As transformers reads it, a negative max_window_layers makes every layer slide.
  auto qwen = tiny_config("qwen2").raw;
  qwen.update({{"use_sliding_window", true}, {"sliding_window", 8}, {"max_window_layers", -5}});
  EXPECT_EQ(parse_model_config(qwen, "q").window, (std::vector<int64_t>{8, 8}));
  // A float with an integral value is an int, as Python's json writes 4096.0.
  auto floats = j;
  floats["max_position_embeddings"] = 4096.0;
  EXPECT_EQ(parse_model_config(floats, "f").max_position_embeddings, 4096);
}

fs::path temp_dir(const std::string& name) {
  auto d = fs::temp_directory_path() / ("aligner_test_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

void save_config(const ModelConfig& c, const fs::path& dir) {
  std::ofstream(dir / "config.json") << c.raw.dump();
}

TEST(HfCheckpoint, RoundTripIsExactAndShards) {
  auto cfg = tiny_config("qwen2");
  auto m = init_transformer(cfg, at::kCPU, 11);
  const auto dir = temp_dir("roundtrip");
  save_transformer(m, (dir / "a").string(), std::nullopt, /*max_shard_bytes=*/20000);
  EXPECT_TRUE(fs::exists(dir / "a" / "model.safetensors.index.json"));
  EXPECT_FALSE(fs::exists(dir / "a.tmp"));
  auto back = load_transformer((dir / "a").string(), at::kCPU);
  auto p1 = named_parameters(m), p2 = named_parameters(back);
  ASSERT_EQ(p1.size(), p2.size());
  for (size_t i = 0; i < p1.size(); ++i) {
    EXPECT_EQ(p1[i].first, p2[i].first);
    EXPECT_TRUE(at::equal(p1[i].second, p2[i].second)) << p1[i].first;
  }
  // Saved again over itself as bf16: one file, config says bfloat16, values rounded once.
  save_transformer(back, (dir / "a").string(), at::kBFloat16);
  EXPECT_TRUE(fs::exists(dir / "a" / "model.safetensors"));
  EXPECT_FALSE(fs::exists(dir / "a" / "model.safetensors.index.json"));
  auto bf = load_transformer((dir / "a").string(), at::kCPU);
  EXPECT_EQ(bf.cfg.dtype, at::kBFloat16);
  EXPECT_TRUE(at::equal(bf.embed, m.embed.to(at::kBFloat16)));
  fs::remove_all(dir);
}

TEST(HfCheckpoint, BadFoldersNameTheTensor) {
  auto cfg = tiny_config();
  auto m = init_transformer(cfg, at::kCPU, 1);
  const auto dir = temp_dir("bad");
  auto params = named_parameters(m);
  auto expect_error = [&](const safetensors::NamedTensors& tensors, const std::string& needle) {
    fs::remove_all(dir / "m");
    fs::create_directories(dir / "m");
    save_config(cfg, dir / "m");
    safetensors::save((dir / "m" / "model.safetensors").string(), tensors);
    try {
      load_transformer((dir / "m").string(), at::kCPU);
      FAIL() << "no error for " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  safetensors::NamedTensors missing(params.begin() + 1, params.end());
  expect_error(missing, "missing tensor 'model.embed_tokens.weight'");
  auto wrong = params;
  wrong[1].second = at::zeros({7});
  expect_error(wrong, "tensor 'model.layers.0.input_layernorm.weight' has shape 7");
  auto extra = params;
  extra.emplace_back("model.layers.0.self_attn.q_norm.weight", at::zeros({8}));
  expect_error(extra, "unexpected tensor 'model.layers.0.self_attn.q_norm.weight'");
  EXPECT_THROW(load_transformer((dir / "nope").string(), at::kCPU), Error);
  fs::remove_all(dir);
}

}  // namespace

namespace {

// Recomputing layers (all of them, or only the first) in the backward pass must give exactly the
// gradients of the plain pass.
TEST(Model, ActivationCheckpointingGivesTheSameGradients) {
  auto m = init_transformer(tiny_config(), at::kCPU, 9);
  auto params = named_parameters(m);
  for (auto& [name, t] : params) t.requires_grad_(true);
  auto ids = ids_tensor({5, 9, 3, 7, 1, 12, 40, 2});
  ASSERT_GE(m.cfg.num_layers, 2);
  auto grads = [&](int64_t checkpointed) {
    for (auto& [name, t] : params) t.mutable_grad() = at::Tensor();
    ForwardInput in{ids};
    in.checkpointed_layers = checkpointed;
    auto h = forward_hidden(m, in);
    auto targets = at::cat({ids.narrow(1, 1, 7), at::full({1, 1}, -100, ids.options())}, 1);
    (-token_logprobs(m, h, targets).sum()).backward();
    std::vector<at::Tensor> out;
    for (auto& [name, t] : params) out.push_back(t.grad().clone());
    return out;
  };
  auto plain = grads(0), recomputed = grads(kAllLayers), first = grads(1);
  for (size_t i = 0; i < plain.size(); ++i) {
    ASSERT_TRUE(plain[i].defined()) << params[i].first;
    EXPECT_GT(plain[i].abs().max().item<double>(), 0) << params[i].first;
    EXPECT_TRUE(at::allclose(plain[i], recomputed[i], 1e-6, 1e-7)) << params[i].first;
    EXPECT_TRUE(at::allclose(plain[i], first[i], 1e-6, 1e-7)) << params[i].first;
  }
}

}  // namespace

// q|k|v and gate|up are views of one buffer each: generation joins them into one projection that
// computes exactly what the parts compute, training still gets a gradient per part, and a part
// replaced after loading makes the join refuse.
TEST(Model, ProjectionsOfOneInputJoinForGenerationAndTrainSeparately) {
  nlohmann::json j = {{"model_type", "qwen2"},    {"vocab_size", 64},
                      {"hidden_size", 32},        {"intermediate_size", 48},
                      {"num_hidden_layers", 1},   {"num_attention_heads", 4},
                      {"num_key_value_heads", 2}, {"max_position_embeddings", 32},
                      {"torch_dtype", "float32"}};
  auto m = init_transformer(parse_model_config(j, "joined"), at::kCPU, 3);
  Block& b = m.layers[0];
  b.k.bias.normal_();
  const auto x = at::randn({5, 32});
  const auto qkv = joined_linear({&b.q, &b.k, &b.v});
  ASSERT_TRUE(qkv.has_value());
  EXPECT_TRUE(at::equal(apply(*qkv, x), at::cat({apply(b.q, x), apply(b.k, x), apply(b.v, x)}, -1)));
  const auto gate_up = joined_linear({&b.gate, &b.up});
  ASSERT_TRUE(gate_up.has_value());
  EXPECT_TRUE(at::equal(apply(*gate_up, x), at::cat({apply(b.gate, x), apply(b.up, x)}, -1)));

  b.q.weight.requires_grad_(true);
  b.k.weight.requires_grad_(true);
  (apply(b.q, x).sum() + 2 * apply(b.k, x).sum()).backward();
  EXPECT_TRUE(at::allclose(b.q.weight.grad(), x.sum(0).expand_as(b.q.weight)));
  EXPECT_TRUE(at::allclose(b.k.weight.grad(), 2 * x.sum(0).expand_as(b.k.weight)));

  b.v.weight = b.v.weight.detach().clone();
  EXPECT_FALSE(joined_linear({&b.q, &b.k, &b.v}).has_value());
}

namespace {

// A loss through the LM head computed in chunks with its own backward (`chunked(chunk)`) against
// `want`, autograd's through the full softmax: values and gradients of the rows and the weight (in
// float64) for chunk boundaries anywhere, and the weight's gradient arriving once, as data-parallel
// hooks need it.
void expect_chunked_head_matches(const std::function<at::Tensor(int64_t)>& chunked, const at::Tensor& want,
                                 const at::Tensor& rows, const at::Tensor& weight,
                                 const at::Tensor& upstream) {
  const auto want_grads = torch::autograd::grad({want}, {rows, weight}, {upstream}, /*retain_graph=*/true);
  for (int64_t chunk : {int64_t(1), int64_t(4), rows.size(0), int64_t(64)}) {
    int calls = 0;
    const auto key = weight.register_hook([&](const at::Tensor&) { ++calls; });
    const auto got = chunked(chunk);
    EXPECT_TRUE(at::allclose(got, want, 1e-12, 1e-12)) << chunk;
    rows.mutable_grad() = at::Tensor();
    weight.mutable_grad() = at::Tensor();
    got.backward(upstream);
    EXPECT_TRUE(at::allclose(rows.grad(), want_grads[0], 1e-10, 1e-12)) << chunk;
    EXPECT_TRUE(at::allclose(weight.grad(), want_grads[1], 1e-10, 1e-12)) << chunk;
    EXPECT_EQ(calls, 1) << chunk;
    weight.remove_hook(key);
  }
}

}  // namespace

// The LM head's log-probs, rows without a target contributing nothing.
TEST(Model, ChunkedHeadLogprobsMatchAutogradThroughTheFullSoftmax) {
  auto gen = at::detail::createCPUGenerator(9);
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  const auto rows = at::randn({11, 6}, gen, opts).requires_grad_(true);
  const auto weight = (at::randn({13, 6}, gen, opts) * 0.7).requires_grad_(true);
  const auto targets = at::tensor({3, 0, 12, -100, 7, 7, 1, -100, 5, 12, 2}, at::kLong);
  const auto upstream = at::randn({11}, gen, opts);

  const auto logp = at::log_softmax(at::mm(rows, weight.t()), 1);
  const auto valid = (targets >= 0).to(at::kDouble);
  const auto want = logp.gather(1, targets.clamp_min(0).unsqueeze(1)).squeeze(1) * valid;
  expect_chunked_head_matches([&](int64_t chunk) { return head_logprobs(rows, weight, targets, chunk); },
                              want, rows, weight, upstream);
  // A frozen weight gets no gradient; the rows still do.
  const auto want_rows = torch::autograd::grad({want}, {rows}, {upstream});
  const auto frozen = weight.detach();
  const auto g = torch::autograd::grad({head_logprobs(rows, frozen, targets, 4)}, {rows}, {upstream});
  EXPECT_TRUE(at::allclose(g[0], want_rows[0], 1e-12, 1e-12));
  EXPECT_THROW(head_logprobs(rows, weight, targets.narrow(0, 0, 5), 4), Error);
}

// The distillation loss from a teacher's top-k, per row (the formula topk_kd_loss_sum_from_topk sums).
TEST(Model, ChunkedHeadTopkKdMatchesAutogradThroughTheFullSoftmax) {
  auto gen = at::detail::createCPUGenerator(10);
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  const auto rows = at::randn({9, 6}, gen, opts).requires_grad_(true);
  const auto weight = (at::randn({13, 6}, gen, opts) * 0.7).requires_grad_(true);
  // Not a structured binding: clang 14 (the sanitizer build) refuses lambdas that capture one.
  const auto top = at::randn({9, 13}, gen, opts).topk(4, -1);
  const auto &values = std::get<0>(top), &ids = std::get<1>(top);
  const auto upstream = at::randn({9}, gen, opts);
  const double T = 1.7;

  const auto log_pt = at::log_softmax(values / T, 1);
  const auto log_ps = at::log_softmax(at::mm(rows, weight.t()) / T, 1).gather(1, ids);
  const auto want = (log_pt.exp() * (log_pt - log_ps)).sum(1) * (T * T);
  expect_chunked_head_matches(
      [&](int64_t chunk) { return head_topk_kd(rows, weight, values, ids, T, chunk); }, want, rows, weight,
      upstream);
  EXPECT_THROW(head_topk_kd(rows, weight, values.narrow(0, 0, 5), ids.narrow(0, 0, 5), T, 4), Error);
  EXPECT_THROW(head_topk_kd(rows, weight, values, ids, 0.0, 4), Error);
}

// A teacher's top-k read a chunk of rows at a time is the top-k of its whole logits; a k past the
// vocabulary gives all of it, and no rows give none.
TEST(Model, TopkLogitsByChunksAreTheWholeLogitsTopk) {
  const auto m = init_transformer(tiny_config(), at::kCPU, 4);
  auto gen = at::detail::createCPUGenerator(11);
  const auto rows = at::randn({7, m.cfg.hidden_size}, gen);
  const auto [want_values, want_ids] = lm_logits(m, rows).to(at::kFloat).topk(5, -1);
  for (int64_t chunk : {1, 3, 7, 100}) {
    const auto [values, ids] = lm_topk(m, rows, 5, chunk);
    // A product of fewer rows may round differently (the BLAS blocks them otherwise).
    EXPECT_TRUE(at::allclose(values, want_values, 1e-5, 1e-6)) << chunk;
    EXPECT_TRUE(at::equal(ids, want_ids)) << chunk;
  }
  EXPECT_EQ(lm_topk(m, rows, m.cfg.vocab_size + 9, 3).first.size(1), m.cfg.vocab_size);
  EXPECT_EQ(lm_topk(m, rows.narrow(0, 0, 0), 5, 3).second.sizes(), at::IntArrayRef({0, 5}));
  EXPECT_THROW(lm_topk(m, rows, 5, 0), Error);
}
