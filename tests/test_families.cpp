// The newer families (Qwen3's per-head q/k norms; Nemotron's LayerNorm1P, squared-ReLU MLP without
// a gate and partial rotary embeddings; Mixtral's sparse experts) through the training commands: an
// SFT run whose loss falls, a DPO step at log 2, LoRA on every projection they have. Parity with
// transformers is in test_model.cpp and test_generate.cpp (fixtures qwen3, nemotron, mixtral).
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>

#include "io/hf_checkpoint.h"
#include "io/peft_adapter.h"
#include "io/safetensors.h"
#include "model/lora.h"
#include "run_outputs.h"
#include "test_util.h"

namespace aligner::test {
namespace {

namespace fs = std::filesystem;

// A random model of the family with the 6k BPE tokenizer, made once per test binary.
const std::string& family_model(const std::string& type) {
  static std::map<std::string, std::string> made;
  auto& dir = made[type];
  if (dir.empty()) {
    nlohmann::json j = {{"model_type", type},
                        {"vocab_size", 6000},
                        {"hidden_size", 64},
                        {"intermediate_size", 128},
                        {"num_hidden_layers", 2},
                        {"num_attention_heads", 4},
                        {"num_key_value_heads", 2},
                        {"max_position_embeddings", 512},
                        {"tie_word_embeddings", false},
                        {"torch_dtype", "float32"}};
    if (type == "nemotron") j.update({{"hidden_act", "relu2"}, {"partial_rotary_factor", 0.5}});
    if (type == "qwen3") j["head_dim"] = 32;
    if (type == "mixtral") j.update({{"num_local_experts", 4}, {"num_experts_per_tok", 2}});
    const auto d = temp_dir("family_" + type) / "m";
    auto m = init_transformer(parse_model_config(j, type), at::kCPU, 9);
    save_transformer(m, d.string(), std::nullopt, 0, kRoot + "/tests/fixtures/tokenizers/llama3-style-bpe6k");
    dir = d.string();
  }
  return dir;
}

// `aligner sft` of `model` on code-alpaca on the CPU, into `out`.
std::string sft_args(const std::string& model, const fs::path& out, const std::string& extra) {
  return "sft model.path=" + model + " data.train=" + kRoot +
         "/examples/data/code-alpaca/code-alpaca-300.jsonl model.device=cpu trainer.micro_batch_size=2 "
         "trainer.global_batch_size=4 output_dir=" +
         out.string() + " " + extra;
}

class Family : public ::testing::TestWithParam<std::string> {};

TEST_P(Family, ConfigAndWeightsAreTheFamilys) {
  const auto m = load_transformer(family_model(GetParam()), at::kCPU);
  const bool nemotron = GetParam() == "nemotron";
  EXPECT_EQ(m.cfg.layernorm1p, nemotron);
  EXPECT_EQ(m.cfg.gated_mlp, !nemotron);
  EXPECT_EQ(m.cfg.qk_norm, GetParam() == "qwen3");
  EXPECT_EQ(m.cfg.rotary_dim, nemotron ? 8 : GetParam() == "qwen3" ? 32 : 16);
  EXPECT_EQ(m.cfg.num_experts, GetParam() == "mixtral" ? 4 : 0);
  EXPECT_EQ(m.layers[0].gate.weight.defined(), GetParam() == "qwen3");
  EXPECT_EQ(m.layers[0].q_norm.defined(), GetParam() == "qwen3");
  // Nemotron's LayerNorm1P starts as the identity scale: weight 0, bias 0.
  if (nemotron) {
    EXPECT_EQ(m.layers[1].post_attention_norm.abs().max().item<double>(), 0.0);
  }
}

TEST_P(Family, SftLossFallsAndDpoStartsAtLog2) {
  const std::string model = family_model(GetParam());
  const auto out = temp_dir("family_sft_" + GetParam());
  auto r =
      run_aligner(sft_args(model, out,
                           "data.max_length=128 optim.lr=3e-3 optim.scheduler=constant trainer.max_steps=8 "
                           "model.activation_checkpointing=true"));
  ASSERT_EQ(r.status, 0) << r.output;
  const auto rows = metrics(out);
  ASSERT_EQ(rows.size(), 8u);
  EXPECT_LT(rows.back()["loss"].get<double>(), rows.front()["loss"].get<double>() - 0.3);
  EXPECT_EQ(load_transformer((out / "final").string(), at::kCPU).cfg.model_type, GetParam());

  const auto dpo = temp_dir("family_dpo_" + GetParam());
  r = run_aligner("dpo model.path=" + model + " data.train=" + kRoot +
                  "/examples/data/nemo-aligner/dummy-dpo.jsonl model.device=cpu trainer.max_steps=1 "
                  "trainer.micro_batch_size=2 trainer.global_batch_size=2 lora.rank=4 output_dir=" +
                  dpo.string());
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NEAR(metrics(dpo)[0]["loss"].get<double>(), std::log(2.0), 1e-6);
  // LoRA on all-linear adapts every projection the family has (Nemotron: no gate_proj).
  const auto adapted = load_adapted_model(model, (dpo / "final").string(), at::kCPU, std::nullopt);
  // (Nemotron has no gate_proj; Mixtral's experts are not adapted.)
  const size_t projections = GetParam() == "nemotron" ? 6 : GetParam() == "mixtral" ? 4 : 7;
  EXPECT_EQ(adapter_parameters(adapted).size(), 2u * 2 * projections);
  fs::remove_all(out);
  fs::remove_all(dpo);
}

// Mixtral's load-balancing loss against transformers' (scripts/make_router_aux_fixture.py): its
// value, and the gradient it gives each layer's router, for a sequence and for a padded batch, with
// and without activation checkpointing (whose recomputed layers must not count their tokens again).
TEST(Mixtral, LoadBalancingLossMatchesTransformers) {
  const std::string dir = kRoot + "/tests/fixtures/models/mixtral";
  const auto ref = nlohmann::json::parse(std::ifstream(dir + "/router_aux.json"));
  const auto grads = safetensors::File::open(dir + "/router_aux.safetensors");
  auto m = load_transformer(dir, at::kCPU, at::kFloat);
  for (const auto& c : ref["cases"]) {
    for (bool checkpoint : {false, true}) {
      for (auto& b : m.layers) b.moe.router.weight.requires_grad_(true).mutable_grad() = at::Tensor();
      ForwardInput in{at::tensor(c["input_ids"].get<std::vector<std::vector<int64_t>>>()[0]).unsqueeze(0)};
      const auto rows = c["input_ids"].get<std::vector<std::vector<int64_t>>>();
      const auto masks = c["attention_mask"].get<std::vector<std::vector<int64_t>>>();
      std::vector<at::Tensor> id_rows, mask_rows;
      for (size_t r = 0; r < rows.size(); ++r) {
        id_rows.push_back(at::tensor(rows[r]));
        mask_rows.push_back(at::tensor(masks[r]));
      }
      in.input_ids = at::stack(id_rows);
      in.attention_mask = at::stack(mask_rows);
      in.checkpointed_layers = checkpoint ? kAllLayers : 0;
      router_aux_loss() = {1.0, 0, 0};
      // A loss with no gradient of its own: what reaches the routers is the load-balancing loss's.
      (forward_hidden(m, in).sum() * 0).backward();
      const auto seen = router_aux_loss();
      router_aux_loss() = {};
      const std::string name = c["name"];
      ASSERT_EQ(seen.count, 1) << name;
      EXPECT_NEAR(seen.sum, c["aux_loss"].get<double>(), 1e-5) << name << " checkpoint " << checkpoint;
      for (size_t l = 0; l < m.layers.size(); ++l) {
        const auto want = grads.get(fmt::format("{}.layer{}", name, l));
        EXPECT_LT((m.layers[l].moe.router.weight.grad() - want).abs().max().item<double>(), 1e-5)
            << name << " layer " << l << " checkpoint " << checkpoint;
      }
    }
  }
  // Without a weight, or without gradients, nothing is counted.
  at::NoGradGuard no_grad;
  router_aux_loss() = {1.0, 0, 0};
  forward_hidden(m, ForwardInput{at::tensor(std::vector<int64_t>{5, 6, 7}).unsqueeze(0)});
  EXPECT_EQ(router_aux_loss().count, 0);
  router_aux_loss() = {};
}

// model.router_aux_loss_coef trains with the loss and reports it.
TEST(Mixtral, SftReportsTheLoadBalancingLoss) {
  const auto out = temp_dir("mixtral_aux");
  const auto r =
      run_aligner(sft_args(family_model("mixtral"), out,
                           "data.max_length=64 trainer.max_steps=2 model.router_aux_loss_coef=0.02"));
  ASSERT_EQ(r.status, 0) << r.output;
  const auto rows = metrics(out);
  ASSERT_EQ(rows.size(), 2u);
  // E x sum_e F_e P_e with sum_e F_e = k (each token picks k experts): a router as nearly uniform as
  // a fresh one (P_e ~ 1/E) gives about k = 2 (seen: 2.004 and 2.017).
  for (const auto& row : rows) EXPECT_NEAR(row["router_aux_loss"].get<double>(), 2.0, 0.1);
  fs::remove_all(out);
}

INSTANTIATE_TEST_SUITE_P(Families, Family, ::testing::Values("qwen3", "nemotron", "mixtral"));

}  // namespace
}  // namespace aligner::test
