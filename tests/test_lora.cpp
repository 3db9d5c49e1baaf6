// LoRA: the adapted forward against the merged weights, gradients that reach the adapters only
// (also through activation checkpointing with dropout), PEFT folders written and read back,
// generation with adapters against the merged model, and `aligner sft` training adapters: a loss
// that falls, small checkpoints, exact resume, merged output, clear errors for bad input.
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "gen/engine.h"
#include "io/hf_checkpoint.h"
#include "io/peft_adapter.h"
#include "io/safetensors.h"
#include "model/lora.h"
#include "run_outputs.h"
#include "test_util.h"

namespace aligner::test {
namespace {

namespace fs = std::filesystem;

LoraConfig all_linear(int64_t rank = 4) {
  LoraConfig c;
  c.rank = rank;
  c.alpha = 8;
  c.targets = kLoraTargets;
  return c;
}

// Adapters with B random too, so that they change the output.
void randomise_b(Transformer& m, uint64_t seed) {
  auto gen = at::detail::createCPUGenerator(seed);
  at::NoGradGuard no_grad;
  for (auto& [name, t] : adapter_parameters(m))
    if (name.find("lora_B") != std::string::npos)
      t.copy_(at::normal(0.0, 0.05, t.sizes(), gen, at::TensorOptions().dtype(at::kFloat)));
}

ForwardInput sample_input() {
  auto gen = at::detail::createCPUGenerator(3);
  return ForwardInput{at::randint(6000, {2, 12}, gen, at::TensorOptions().dtype(at::kLong))};
}

double max_abs(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).abs().max().item<double>();
}

TEST(Lora, AdaptedForwardEqualsMergedWeightsAndStartsAsTheBase) {
  auto m = load_transformer(tiny_model(), at::kCPU);
  const auto in = sample_input();
  at::NoGradGuard no_grad;
  const auto base = forward_hidden(m, in);
  add_adapters(m, all_linear(), 1);
  EXPECT_EQ(adapter_parameters(m).size(), 2u * 7 * 2);  // A and B, 7 projections, 2 layers
  EXPECT_TRUE(forward_hidden(m, in).equal(base)) << "B = 0: the adapters must start without effect";
  randomise_b(m, 2);
  const auto adapted = forward_hidden(m, in);
  EXPECT_GT(max_abs(adapted, base), 1e-3);
  EXPECT_LT(max_abs(adapted, forward_hidden(merged_copy(m), in)), 1e-5);
  EXPECT_TRUE(forward_hidden(without_adapters(m), in).equal(base));
  // A direct computation of one projection: W x + alpha / r B A x.
  const auto& q = m.layers[0].q;
  const auto x = at::randn({3, 64});
  const auto want = at::matmul(x, q.weight.t()) + at::matmul(at::matmul(x, q.lora.a.t()), q.lora.b.t()) * 2.0;
  EXPECT_LT(max_abs(apply(q, x), want), 1e-5);
}

TEST(Lora, PeftInitialisation) {
  auto m = load_transformer(tiny_model(), at::kCPU);
  auto c = all_linear(8);
  c.targets = {"q_proj", "down_proj"};
  add_adapters(m, c, 5);
  const auto& q = m.layers[0].q.lora;
  EXPECT_TRUE(q.b.eq(0).all().item<bool>());
  const double bound = 1.0 / std::sqrt(64.0);  // Kaiming-uniform(a = sqrt 5): 1 / sqrt(fan_in)
  EXPECT_LE(q.a.abs().max().item<double>(), bound);
  EXPECT_GT(q.a.abs().max().item<double>(), 0.9 * bound);
  EXPECT_EQ(m.layers[0].down.lora.a.size(1), 128);
  EXPECT_FALSE(m.layers[0].k.lora.a.defined());
  EXPECT_EQ(adapter_parameters(m).size(), 2u * 2 * 2);
  auto g = load_transformer(tiny_model(), at::kCPU);
  c.gaussian_init = true;
  add_adapters(g, c, 5);
  EXPECT_NEAR(g.layers[0].q.lora.a.std().item<double>(), 1.0 / 8, 0.02);
  EXPECT_THROW(add_adapters(g, LoraConfig{4, 8, 0, {"qkv_proj"}}, 1), Error);
}

// Only the adapters get gradients; checkpointed layers give them the same ones, also with dropout,
// whose masks the recomputation must draw again.
TEST(Lora, GradientsReachTheAdaptersAlsoThroughCheckpointedLayers) {
  for (double dropout : {0.0, 0.3}) {
    std::vector<at::Tensor> grads[2];
    for (int checkpoint = 0; checkpoint < 2; ++checkpoint) {
      auto m = load_transformer(tiny_model(), at::kCPU);
      auto c = all_linear();
      c.dropout = dropout;
      add_adapters(m, c, 1);
      randomise_b(m, 2);
      for (auto& [n, t] : adapter_parameters(m)) t.requires_grad_(true);
      auto in = sample_input();
      in.checkpointed_layers = checkpoint == 1 ? kAllLayers : 0;
      at::manual_seed(11);
      forward_hidden(m, in).pow(2).sum().backward();
      for (auto& [n, t] : named_parameters(m)) EXPECT_FALSE(t.grad().defined()) << n;
      for (auto& [n, t] : adapter_parameters(m)) {
        ASSERT_TRUE(t.grad().defined()) << n << " checkpoint " << checkpoint;
        grads[checkpoint].push_back(t.grad().clone());
      }
    }
    for (size_t i = 0; i < grads[0].size(); ++i) {
      EXPECT_GT(grads[0][i].abs().max().item<double>(), 0) << i;
      EXPECT_LT(max_abs(grads[0][i], grads[1][i]), 1e-5) << "dropout " << dropout << " tensor " << i;
    }
  }
}

TEST(Lora, PeftFolderRoundTripsAndBadAdaptersAreRefused) {
  const auto dir = temp_dir("lora_peft");
  auto m = load_transformer(tiny_model(), at::kCPU);
  add_adapters(m, all_linear(), 1);
  randomise_b(m, 2);
  save_peft_adapter(m, all_linear(), (dir / "adapter").string(), tiny_model(), "", Replace::ours);
  const auto config = nlohmann::json::parse(std::ifstream(dir / "adapter" / "adapter_config.json"));
  EXPECT_EQ(config["r"], 4);
  EXPECT_EQ(config["lora_alpha"], 8.0);
  EXPECT_EQ(config["task_type"], "CAUSAL_LM");
  const auto file = safetensors::File::open((dir / "adapter" / "adapter_model.safetensors").string());
  EXPECT_TRUE(file.contains("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"));
  EXPECT_EQ(file.tensors().size(), 28u);

  const auto in = sample_input();
  at::NoGradGuard no_grad;
  auto loaded = load_adapted_model(tiny_model(), (dir / "adapter").string(), at::kCPU, std::nullopt);
  EXPECT_TRUE(forward_hidden(loaded, in).equal(forward_hidden(m, in)));

  auto refused = [&](const std::string& adapter, const std::string& model, const std::string& needle) {
    try {
      load_adapted_model(model, adapter, at::kCPU, std::nullopt);
      ADD_FAILURE() << "loaded " << adapter << " onto " << model;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  // Another base: the tiny model with a longer context has the same shapes, so use a fixture.
  refused((dir / "adapter").string(), kRoot + "/tests/fixtures/models/llama2",
          "tensor 'base_model.model.model.layers.0");
  fs::create_directories(dir / "pickle");
  std::ofstream(dir / "pickle" / "adapter_config.json") << config.dump();
  std::ofstream(dir / "pickle" / "adapter_model.bin") << "x";
  refused((dir / "pickle").string(), tiny_model(), "pickle");
  fs::copy(dir / "adapter", dir / "dora");
  auto dora = config;
  dora["use_dora"] = true;
  std::ofstream(dir / "dora" / "adapter_config.json") << dora.dump();
  refused((dir / "dora").string(), tiny_model(), "DoRA");
  fs::copy(dir / "adapter", dir / "unknown");
  auto unknown = config;
  unknown["target_modules"] = {"q_proj", "c_attn"};
  std::ofstream(dir / "unknown" / "adapter_config.json") << unknown.dump();
  refused((dir / "unknown").string(), tiny_model(), "target module 'c_attn'");
  fs::copy(dir / "adapter", dir / "fewer");
  auto fewer = config;
  fewer["target_modules"] = {"q_proj"};
  std::ofstream(dir / "fewer" / "adapter_config.json") << fewer.dump();
  refused((dir / "fewer").string(), tiny_model(), "matches nothing");
  fs::remove_all(dir);
}

// An adapter folder that peft itself wrote (scripts/make_lora_fixture.py), on the llama2 fixture
// model: aligner's log-probs equal peft's, and with the adapters off the base's.
TEST(Lora, PeftWrittenAdapterMatchesPeftsLogProbs) {
  const std::string base = kRoot + "/tests/fixtures/models/llama2";
  const auto expected =
      nlohmann::json::parse(std::ifstream(kRoot + "/tests/fixtures/lora/llama2-peft.expected.json"));
  const auto m = load_adapted_model(base, kRoot + "/tests/fixtures/lora/llama2-peft", at::kCPU, at::kFloat);
  EXPECT_EQ(adapter_config(m).rank, 4);
  at::NoGradGuard no_grad;
  size_t i = 0;
  for (const auto& seq : expected["sequences"]) {
    const auto ids = at::tensor(seq.get<std::vector<int64_t>>()).unsqueeze(0);
    const int64_t n = ids.size(1);
    auto score = [&](const Transformer& model) {
      if (n < 2) return 0.0;
      const auto hidden = forward_hidden(model, ForwardInput{ids});
      return token_logprobs(model, hidden.narrow(1, 0, n - 1), ids.narrow(1, 1, n - 1)).sum().item<double>();
    };
    EXPECT_NEAR(score(m), expected["logprob"][i].get<double>(), 1e-3) << i;
    EXPECT_NEAR(score(without_adapters(m)), expected["base_logprob"][i].get<double>(), 1e-3) << i;
    ++i;
  }
  EXPECT_EQ(i, 5u);
}

// The decoder must not drop adapters: greedy tokens equal the merged model's, log-probs within 1e-4.
TEST(Lora, GenerationWithAdaptersEqualsTheMergedModel) {
  auto m = load_transformer(tiny_model(), at::kCPU);
  add_adapters(m, all_linear(), 1);
  randomise_b(m, 4);
  const auto merged = merged_copy(m);
  GenerationOptions opt;
  opt.max_new_tokens = 12;
  opt.sampling.temperature = 0;
  opt.stop_at_eos = false;
  const std::vector<std::vector<int32_t>> prompts = {{1, 50, 300, 7}, {2, 9}, {100, 200, 300, 400, 500}};
  const auto a = generate(m, prompts, opt), b = generate(merged, prompts, opt),
             base = generate(without_adapters(m), prompts, opt);
  ASSERT_EQ(a.sequences.size(), 3u);
  bool differs_from_base = false;
  for (size_t i = 0; i < a.sequences.size(); ++i) {
    EXPECT_EQ(a.sequences[i].tokens, b.sequences[i].tokens) << i;
    for (size_t t = 0; t < a.sequences[i].logprobs.size(); ++t)
      EXPECT_NEAR(a.sequences[i].logprobs[t], b.sequences[i].logprobs[t], 1e-4) << i << " " << t;
    differs_from_base |= a.sequences[i].tokens != base.sequences[i].tokens;
  }
  EXPECT_TRUE(differs_from_base) << "the adapters changed nothing: the test would not see them dropped";
}

// The demo model (trained, unlike the random tiny one, whose small frozen embeddings leave adapters
// little to move) on the arithmetic data.
const std::string kDemoModel = kRoot + "/examples/models/tiny-llama";

std::string lora_sft_args(const fs::path& out, const std::string& extra) {
  return "sft model.path=" + kDemoModel + " data.train=" + kRoot +
         "/examples/data/arithmetic/sft.jsonl data.max_length=128 optim.lr=3e-3 "
         "optim.scheduler=constant trainer.seed=7 model.device=cpu trainer.micro_batch_size=4 "
         "trainer.global_batch_size=8 lora.rank=8 lora.alpha=16 output_dir=" +
         out.string() + " " + extra;
}

TEST(LoraSft, LossFallsAndTheOutputIsAPeftAdapter) {
  const auto out = temp_dir("lora_sft");
  const auto r = run_aligner(lora_sft_args(out, "trainer.max_steps=12 trainer.save_interval=12"));
  ASSERT_EQ(r.status, 0) << r.output;
  const auto rows = metrics(out);
  ASSERT_EQ(rows.size(), 12u);
  double first = 0, last = 0;
  for (int i = 0; i < 3; ++i) first += rows[i]["loss"].get<double>() / 3;
  for (int i = 9; i < 12; ++i) last += rows[i]["loss"].get<double>() / 3;
  EXPECT_LT(last, first - 0.5) << first << " -> " << last;
  EXPECT_TRUE(fs::exists(out / "final" / "adapter_config.json"));
  EXPECT_FALSE(fs::exists(out / "final" / "model.safetensors"));
  EXPECT_TRUE(fs::exists(out / "final" / "tokenizer.json"));
  // The checkpoint holds the adapters only.
  const auto ckpt = out / "checkpoints" / "step_12";
  const auto trained = safetensors::File::open((ckpt / "model" / "trainable.safetensors").string());
  EXPECT_EQ(trained.tensors().size(), 4u * 7 * 2);  // A and B of 7 projections in 4 layers
  EXPECT_LT(fs::file_size(ckpt / "model" / "trainable.safetensors"),
            fs::file_size(fs::path(kDemoModel) / "model.safetensors") / 8);
  // The base did not move: the adapter on the original folder is the whole model.
  auto adapted = load_adapted_model(kDemoModel, (out / "final").string(), at::kCPU, at::kFloat);
  EXPECT_GT(adapted.layers[0].q.lora.b.abs().max().item<double>(), 0);
  // merge-lora writes the merged weights, which compute what the adapted model does.
  const auto merged =
      run_aligner("merge-lora --base " + kDemoModel + " --adapter " + (out / "final").string() + " --out " +
                  (out / "merged").string() + " --dtype float32");
  ASSERT_EQ(merged.status, 0) << merged.output;
  at::NoGradGuard no_grad;
  const auto in = sample_input();
  auto m = load_transformer((out / "merged").string(), at::kCPU);
  EXPECT_LT(max_abs(forward_hidden(m, in), forward_hidden(adapted, in)), 1e-5);
  // perplexity --adapter scores with the adapters.
  std::ofstream(out / "seqs.jsonl") << "{\"input_ids\": [1, 50, 300, 7, 9, 11]}\n";
  const auto p1 =
      json_lines(run_aligner("perplexity --model " + kDemoModel + " --adapter " + (out / "final").string() +
                             " --data " + (out / "seqs.jsonl").string())
                     .output);
  const auto p2 = json_lines(run_aligner("perplexity --model " + (out / "merged").string() + " --data " +
                                         (out / "seqs.jsonl").string())
                                 .output);
  ASSERT_FALSE(p1.empty());
  ASSERT_FALSE(p2.empty());
  EXPECT_NEAR(p1[0]["logprob"].get<double>(), p2[0]["logprob"].get<double>(), 1e-4);
  fs::remove_all(out);
}

// Adapters of another run's folder continue training (lora.from); merge_on_save writes the merged
// model; a killed run with dropout and activation checkpointing resumes to the same adapters.
TEST(LoraSft, ContinuesFromAnAdapterMergesOnSaveAndResumesExactly) {
  const auto a = temp_dir("lora_resume_a"), b = temp_dir("lora_resume_b");
  const std::string args =
      "trainer.max_steps=4 trainer.save_interval=2 lora.dropout=0.1 model.activation_checkpointing=true";
  run_whole_and_killed([&](const fs::path& out) { return lora_sft_args(out, args); }, a, b, 3);
  if (HasFatalFailure()) return;
  expect_same_adapters(a / "final", b / "final");
  const auto c = temp_dir("lora_from");
  auto r = run_aligner(lora_sft_args(c, "trainer.max_steps=1 lora.from=" + (a / "final").string()));
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("'lora.rank' is set, but lora.from"), std::string::npos) << r.output;
  r = run_aligner(
      lora_sft_args(c, "trainer.max_steps=1 lora.rank=0 lora.alpha=32 lora.from=" + (a / "final").string()));
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("'lora.alpha' is set, but lora.from"), std::string::npos) << r.output;
  r = run_aligner("sft model.path=" + kDemoModel + " data.train=" + kRoot +
                  "/examples/data/arithmetic/sft.jsonl data.max_length=128 model.device=cpu "
                  "trainer.max_steps=1 trainer.micro_batch_size=4 trainer.global_batch_size=4 optim.lr=0 "
                  "lora.from=" +
                  (a / "final").string() + " lora.merge_on_save=true output_dir=" + c.string());
  ASSERT_EQ(r.status, 0) << r.output;
  // lr 0: the merged output is the base with a's adapters folded in.
  EXPECT_TRUE(fs::exists(c / "final" / "model.safetensors"));
  auto adapted = load_adapted_model(kDemoModel, (a / "final").string(), at::kCPU, at::kFloat);
  auto merged = load_transformer((c / "final").string(), at::kCPU);
  at::NoGradGuard no_grad;
  EXPECT_LT(max_abs(forward_hidden(merged, sample_input()), forward_hidden(adapted, sample_input())), 1e-5);
  fs::remove_all(a);
  fs::remove_all(b);
  fs::remove_all(c);
}

// Data parallel: the adapters' gradients are averaged over the ranks like any module's.
TEST(LoraSft, TwoRanksMatchOne) {
  const auto a = temp_dir("lora_rank1"), b = temp_dir("lora_rank2");
  const std::string args = "trainer.max_steps=3 trainer.micro_batch_size=2 trainer.global_batch_size=4";
  const auto ra = run_aligner(lora_sft_args(a, args));
  ASSERT_EQ(ra.status, 0) << ra.output;
  const auto rb = run_aligner_on_two_ranks(lora_sft_args(b, args), 29900);
  if (rb.output.find("needs Gloo") != std::string::npos)
    GTEST_SKIP() << "this libtorch has no Gloo for CPU ranks";
  ASSERT_EQ(rb.status, 0) << rb.output;
  const auto ma = metrics(a), mb = metrics(b);
  ASSERT_EQ(mb.size(), 3u);
  for (size_t i = 0; i < 3; ++i)
    EXPECT_NEAR(ma[i]["loss"].get<double>(), mb[i]["loss"].get<double>(), 1e-5) << i;
  const auto fa = safetensors::File::open((a / "final" / "adapter_model.safetensors").string()),
             fb = safetensors::File::open((b / "final" / "adapter_model.safetensors").string());
  for (const auto& t : fa.tensors())  // Adam's steps: within two learning rates where gradients are tiny
    EXPECT_LT(max_abs(fa.get(t.name), fb.get(t.name)), 6e-3) << t.name;
  fs::remove_all(a);
  fs::remove_all(b);
}

TEST(LoraSft, BadSettingsAreOneLineErrors) {
  const auto out = temp_dir("lora_errors");
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"lora.rank=0 lora.alpha=32", "config key 'lora.alpha' is set, but LoRA is off"},
      {"lora.target_modules=[q_proj,qkv]", "unknown module 'qkv'"},
      {"lora.rank=-1", "'lora.rank' must be >= 0"},
      {"lora.dropout=1.5", "'lora.dropout' must be in [0, 1)"},
      {"lora.init=xavier", "'lora.init' expects default or gaussian"},
      {"lora.rank=0 lora.from=/nonexistent", "not a PEFT adapter folder"},
  };
  for (const auto& [extra, needle] : cases) {
    const auto r = run_aligner(lora_sft_args(out, "trainer.max_steps=1 " + extra));
    EXPECT_NE(r.status, 0) << extra;
    EXPECT_NE(r.output.find(needle), std::string::npos) << extra << "\n" << r.output;
  }
  fs::remove_all(out);
}

}  // namespace
}  // namespace aligner::test
