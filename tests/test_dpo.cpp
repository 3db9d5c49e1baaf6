// DPO and its variants: each loss against a direct computation, gradients against finite
// differences, log 2 at the first step through `aligner dpo`, the reference cache against the
// reference model, resume, and held-out preference accuracy on real data.
#include <gtest/gtest.h>

#include <ATen/CPUGeneratorImpl.h>

#include <cmath>

#include "algo/dpo.h"
#include "core/error.h"
#include "run_outputs.h"
#include "test_util.h"

using namespace aligner;
using namespace aligner::test;
namespace fs = std::filesystem;

namespace {

const std::string kDummyDpo = kRoot + "/examples/data/nemo-aligner/dummy-dpo.jsonl";
const std::string kHh = kRoot + "/examples/data/hh-rlhf/harmless-test-600.jsonl";

double log_sigmoid(double x) {
  return x >= 0 ? -std::log1p(std::exp(-x)) : x - std::log1p(std::exp(x));
}
double sigmoid(double x) {
  return 1 / (1 + std::exp(-x));
}

std::string dpo_args(const fs::path& out, const std::string& extra) {
  return "dpo model.path=" + tiny_model() + " data.train=" + kDummyDpo +
         " model.device=cpu optim.lr=1e-3 optim.scheduler=constant trainer.seed=3 output_dir=" +
         out.string() + " " + extra;
}

TEST(Dpo, LossesMatchDirectComputation) {
  auto gen = at::detail::createCPUGenerator(5);
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  const int64_t B = 6;
  const auto pc = -10 * at::rand({B}, gen, opts), pr = -10 * at::rand({B}, gen, opts);
  const auto rc = -10 * at::rand({B}, gen, opts), rr = -10 * at::rand({B}, gen, opts);
  const auto gc = 3 * at::randn({B}, gen, opts), gr = 3 * at::randn({B}, gen, opts);
  const double beta = 0.3, scale = 0.7;
  for (const auto& [name, ls] : std::vector<std::pair<std::string, double>>{{"dpo", 0.0},
                                                                            {"dpo", 0.2},
                                                                            {"ipo", 0.0},
                                                                            {"rpo_sq", 0.0},
                                                                            {"rpo_fwd_kl", 0.0},
                                                                            {"rpo_bwd_kl", 0.0}}) {
    PreferenceLossOptions o;
    o.loss = parse_preference_loss(name);
    o.beta = beta;
    o.label_smoothing = ls;
    o.gt_reward_scale = scale;
    const auto got = preference_loss(o, pc, pr, rc, rr, gc, gr);
    ASSERT_EQ(got.sizes(), at::IntArrayRef({B}));
    for (int64_t i = 0; i < B; ++i) {
      const double logits =
          (pc[i].item<double>() - rc[i].item<double>()) - (pr[i].item<double>() - rr[i].item<double>());
      const double gt = scale * (gc[i].item<double>() - gr[i].item<double>());
      const double p = sigmoid(beta * logits), q = sigmoid(gt);
      double want = 0;
      if (name == "dpo") want = -(1 - ls) * log_sigmoid(beta * logits) - ls * log_sigmoid(-beta * logits);
      if (name == "ipo") want = std::pow(logits - 1 / (2 * beta), 2);
      if (name == "rpo_sq") want = std::pow(beta * logits - gt, 2);
      if (name == "rpo_fwd_kl") want = p * std::log(p / q) + (1 - p) * std::log((1 - p) / (1 - q));
      if (name == "rpo_bwd_kl") want = q * std::log(q / p) + (1 - q) * std::log((1 - q) / (1 - p));
      EXPECT_NEAR(got[i].item<double>(), want, 1e-10) << name << " ls=" << ls << " pair " << i;
    }
  }
  PreferenceLossOptions rpo;
  rpo.loss = PreferenceLoss::kRpoSq;
  EXPECT_THROW(preference_loss(rpo, pc, pr, rc, rr), Error);
  EXPECT_THROW(parse_preference_loss("kto"), Error);
}

// The gradient of the whole DPO objective (one concatenated pass over chosen and rejected, the
// reference frozen, plus the SFT term) against central differences, in float64 on a tiny model.
TEST(Dpo, GradientsMatchFiniteDifferences) {
  nlohmann::json j = {{"model_type", "llama"},
                      {"vocab_size", 40},
                      {"hidden_size", 16},
                      {"intermediate_size", 24},
                      {"num_hidden_layers", 2},
                      {"num_attention_heads", 4},
                      {"num_key_value_heads", 2},
                      {"max_position_embeddings", 64},
                      {"tie_word_embeddings", false},
                      {"torch_dtype", "float32"}};
  auto cfg = parse_model_config(j, "fd");
  cfg.dtype = at::kDouble;
  auto policy = init_transformer(cfg, at::kCPU, 1);
  const auto reference = init_transformer(cfg, at::kCPU, 2);
  // Three pairs of different prompt and response lengths, so that rows are padded.
  auto seq = [](std::vector<int32_t> ids, size_t prompt) {
    Sequence s{ids, std::vector<uint8_t>(ids.size(), 1)};
    std::fill(s.loss_mask.begin(), s.loss_mask.begin() + prompt, 0);
    return s;
  };
  std::vector<PreferenceExample> pairs(3);
  pairs[0] = {seq({1, 5, 6, 7, 8, 9}, 3), seq({1, 5, 6, 10, 11}, 3), 3};
  pairs[1] = {seq({1, 12, 13, 14, 15, 16, 17, 18}, 4), seq({1, 12, 13, 14, 19}, 4), 4};
  pairs[2] = {seq({1, 20, 21, 22}, 2), seq({1, 20, 23, 24, 25, 26, 27}, 2), 2};
  const auto batch = collate_preferences(pairs, 0).seqs;
  for (const bool average : {false, true}) {
    PreferenceLossOptions o;
    o.loss = average ? PreferenceLoss::kIpo : PreferenceLoss::kDpo;
    o.beta = 0.5;
    o.label_smoothing = average ? 0.0 : 0.1;
    auto objective = [&] {
      const auto pi = response_logprobs(policy, batch);
      at::Tensor ref;
      {
        at::NoGradGuard no_grad;
        ref = response_logprobs(reference, batch).sum;
      }
      const auto n = pi.count.to(at::kDouble);
      const auto p = average ? pi.sum / n : pi.sum, r = average ? ref / n : ref;
      const auto pc = p.narrow(0, 0, 3), pr = p.narrow(0, 3, 3);
      return preference_loss(o, pc, pr, r.narrow(0, 0, 3), r.narrow(0, 3, 3)).sum() - 0.3 * pc.sum();
    };
    auto params = named_parameters(policy);
    for (auto& [name, t] : params) {
      t.requires_grad_(true);
      t.mutable_grad() = at::Tensor();
    }
    objective().backward();
    int checked = 0;
    for (auto& [name, t] : params) {
      if (name != "model.embed_tokens.weight" && name != "model.layers.0.self_attn.q_proj.weight" &&
          name != "model.layers.1.mlp.down_proj.weight" && name != "model.norm.weight" &&
          name != "lm_head.weight")
        continue;
      // Row 6 of the embedding is a chosen response token of pair 0; the others are any entries.
      for (const int64_t k : {(6 * 16 + 3) % t.numel(), int64_t(7), t.numel() - 2}) {
        const double grad = t.grad().reshape({-1})[k].item<double>();
        auto flat = t.detach().reshape({-1});
        const double h = 1e-6, w = flat[k].item<double>();
        at::NoGradGuard no_grad;
        flat[k] = w + h;
        const double up = objective().item<double>();
        flat[k] = w - h;
        const double down = objective().item<double>();
        flat[k] = w;
        const double fd = (up - down) / (2 * h);
        EXPECT_NEAR(grad, fd, 1e-6 * std::max(1.0, std::abs(fd)))
            << name << "[" << k << "] average=" << average;
        checked += std::abs(grad) > 1e-8;
      }
    }
    EXPECT_GE(checked, 12) << "too few coordinates with a gradient to check";
  }
}

// With the policy equal to the reference every logit is 0, so the first step's loss is log 2 and
// both implicit rewards 0, whether the reference log-probs come from the cache, from the policy's
// folder loaded again, or from an explicit dpo.reference; and the three runs then train alike.
TEST(Dpo, FirstStepLossIsLog2AndTheCacheMatchesTheReferenceModel) {
  const std::string steps = "trainer.max_steps=3 trainer.micro_batch_size=4 trainer.global_batch_size=8 ";
  std::vector<std::vector<nlohmann::json>> runs;
  for (const std::string& extra :
       std::vector<std::string>{"", "dpo.cache_reference=false", "dpo.reference=" + tiny_model(),
                                "dpo.sft_weight=0.5", "data.packing=true data.max_length=256"}) {
    const auto out = temp_dir("dpo_log2");
    const auto r = run_aligner(dpo_args(out, steps + extra));
    ASSERT_EQ(r.status, 0) << r.output;
    runs.push_back(metrics(out));
    ASSERT_EQ(runs.back().size(), 3u) << extra;
    const auto& first = runs.back()[0];
    EXPECT_EQ(first["rewards_chosen"].get<double>(), 0.0) << extra;
    EXPECT_EQ(first["rewards_rejected"].get<double>(), 0.0) << extra;
    EXPECT_EQ(first["accuracy"].get<double>(), 0.0) << extra;
    double want = std::log(2.0);
    if (first.contains("sft_loss")) want += 0.5 * first["sft_loss"].get<double>();
    EXPECT_NEAR(first["loss"].get<double>(), want, 1e-6 * want) << extra;
    fs::remove_all(out);
  }
  EXPECT_TRUE(runs[3][0].contains("sft_loss"));
  EXPECT_FALSE(runs[0][0].contains("sft_loss"));
  // Neither the reference's source nor packing the responses into shared rows changes the losses.
  for (size_t run : {1, 2, 4})
    for (size_t i = 0; i < 3; ++i)
      EXPECT_NEAR(runs[run][i]["loss"].get<double>(), runs[0][i]["loss"].get<double>(), 1e-5)
          << run << " " << i;
  EXPECT_LT(runs[0][2]["loss"].get<double>(), std::log(2.0)) << "the loss did not fall";
}

// The reference cache is computed again on resume: a killed run ends where an uninterrupted one does.
TEST(Dpo, KilledRunResumesToTheSameWeights) {
  const auto a = temp_dir("dpo_resume_a"), b = temp_dir("dpo_resume_b");
  const std::string args =
      "trainer.max_steps=4 trainer.micro_batch_size=2 trainer.global_batch_size=4 trainer.save_interval=2";
  const auto ra = run_aligner(dpo_args(a, args));
  ASSERT_EQ(ra.status, 0) << ra.output;
  const auto killed = run_aligner(dpo_args(b, args), "ALIGNER_KILL_AT_STEP=3");
  ASSERT_EQ(killed.status, 128 + SIGKILL) << killed.output;
  const auto resumed = run_aligner(dpo_args(b, args));
  ASSERT_EQ(resumed.status, 0) << resumed.output;
  EXPECT_NE(resumed.output.find("resuming from"), std::string::npos) << resumed.output;
  expect_same_weights(a / "final", b / "final");
  const auto ma = metrics(a), mb = metrics(b);
  ASSERT_EQ(mb.size(), 4u);
  for (size_t i = 0; i < 4; ++i) EXPECT_EQ(ma[i]["loss"].get<double>(), mb[i]["loss"].get<double>()) << i;
  fs::remove_all(a);
  fs::remove_all(b);
}

// The rpo losses read each pair's rewards from the data, and name the pair that has none.
TEST(Dpo, RpoLossesUseTheDataRewards) {
  const auto out = temp_dir("dpo_rpo");
  {
    std::ifstream in(kDummyDpo);
    std::ofstream f(out / "rewards.jsonl");
    std::string line;
    for (int i = 0; i < 8 && std::getline(in, line); ++i) {
      auto rec = nlohmann::json::parse(line);
      rec["chosen_reward"] = 1.0 + i % 3;
      rec["rejected_reward"] = -1.0;
      f << rec.dump() << "\n";
    }
  }
  const std::string steps = " trainer.max_steps=2 trainer.micro_batch_size=4 trainer.global_batch_size=4";
  for (const char* loss : {"rpo_sq", "rpo_fwd_kl", "rpo_bwd_kl"}) {
    const auto run_dir = out / loss;
    auto r = run_aligner(dpo_args(run_dir, std::string("dpo.loss=") + loss + steps +
                                               " data.train=" + (out / "rewards.jsonl").string()));
    ASSERT_EQ(r.status, 0) << r.output;
    // At the first step the policy's preference is even (logits 0), the data's is not.
    const double first = metrics(run_dir)[0]["loss"].get<double>();
    EXPECT_GT(first, 0.01) << loss;
  }
  auto r = run_aligner(dpo_args(out / "none", "dpo.loss=rpo_sq" + steps));
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("dummy-dpo.jsonl:"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("chosen_reward"), std::string::npos) << r.output;
  fs::remove_all(out);
}

// The demo model on real preference pairs: a dozen steps raise the implicit reward's accuracy on
// pairs it never trained on above chance, and the held-out loss below log 2.
TEST(Dpo, TrainingRaisesHeldOutAccuracyOnRealData) {
  const auto out = temp_dir("dpo_hh");
  copy_lines(kHh, out / "train.jsonl", 0, 540);
  copy_lines(kHh, out / "val.jsonl", 540, 600);
  const auto r = run_aligner(
      "dpo model.path=" + kRoot + "/examples/models/tiny-llama data.train=" + (out / "train.jsonl").string() +
      " data.validation=" + (out / "val.jsonl").string() +
      " data.skip_bad_lines=true data.max_length=128 model.device=cpu trainer.max_steps=12"
      " trainer.micro_batch_size=16 trainer.global_batch_size=16 optim.lr=3e-5"
      " optim.scheduler=constant dpo.beta=0.1 trainer.seed=1 output_dir=" +
      (out / "run").string());
  ASSERT_EQ(r.status, 0) << r.output;
  const auto val = metrics(out / "run", "validation");
  ASSERT_EQ(val.size(), 1u);
  EXPECT_GT(val[0]["accuracy"].get<double>(), 0.55);
  EXPECT_LT(val[0]["loss"].get<double>(), std::log(2.0) - 0.005);
  EXPECT_GT(val[0]["reward_margin"].get<double>(), 0.0);
  fs::remove_all(out);
}

// With adapters the reference is the base with them off: the first step's loss is log 2 whether its
// log-probs are cached or computed beside the policy, the two train alike, and final/ is an adapter.
TEST(Dpo, LoraTrainsAdaptersAgainstTheBaseWithThemOff) {
  std::vector<std::vector<nlohmann::json>> runs;
  for (const std::string cache : {"true", "false"}) {
    const auto out = temp_dir("dpo_lora");
    const auto r =
        run_aligner(dpo_args(out,
                             "trainer.max_steps=3 trainer.micro_batch_size=4 trainer.global_batch_size=8 "
                             "lora.rank=4 optim.lr=3e-2 dpo.cache_reference=" +
                                 cache));
    ASSERT_EQ(r.status, 0) << r.output;
    runs.push_back(metrics(out));
    ASSERT_EQ(runs.back().size(), 3u);
    EXPECT_NEAR(runs.back()[0]["loss"].get<double>(), std::log(2.0), 1e-6) << cache;
    EXPECT_TRUE(fs::exists(out / "final" / "adapter_model.safetensors"));
    fs::remove_all(out);
  }
  for (size_t i = 0; i < 3; ++i)
    EXPECT_NEAR(runs[0][i]["loss"].get<double>(), runs[1][i]["loss"].get<double>(), 1e-5) << i;
  EXPECT_GT(std::abs(runs[0][2]["rewards_chosen"].get<double>()), 1e-4)
      << "the adapters did not move the policy";
}

}  // namespace
