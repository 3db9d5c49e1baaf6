// aligner reinforce: each estimator's advantages and loss terms against direct computations on a
// fixed rollout, then end to end on the tiny model: GRPO and RLOO raise a reward model's score,
// dynamic sampling drops groups with nothing to learn, a killed run resumes to the same weights.
#include <gtest/gtest.h>

#include <cmath>
#include <csignal>
#include <fstream>

#include "algo/reinforce.h"
#include "data/packing.h"
#include "io/hf_checkpoint.h"
#include "online_fixtures.h"
#include "run_outputs.h"
#include "test_util.h"
#include "text/tokenizer.h"

namespace aligner::test {
namespace {

namespace fs = std::filesystem;
const auto kDouble = at::TensorOptions().dtype(at::kDouble);

// Two prompts with four samples each.
const std::vector<double> kRewards = {1.0, 0.0, 0.5, 2.0, -1.0, -1.0, 3.0, 0.0};
const std::vector<double> kEnded = {1, 1, 0, 1, 1, 0, 0, 1};

TEST(ReinforceMath, RlooBaselineIsTheMeanOfTheOtherEndedSamples) {
  const auto a = rloo_advantages(at::tensor(kRewards, kDouble), at::tensor(kEnded, kDouble), 4);
  for (int g = 0; g < 2; ++g) {
    double count = 0, sum = 0;
    for (int j = 0; j < 4; ++j) {
      count += kEnded[g * 4 + j];
      sum += kEnded[g * 4 + j] * kRewards[g * 4 + j];
    }
    for (int j = 0; j < 4; ++j) {
      const int i = g * 4 + j;
      const double baseline = (sum - kEnded[i] * kRewards[i]) / (count - 1);
      EXPECT_NEAR(a[i].item<double>(), kRewards[i] - baseline, 1e-12) << i;
    }
  }
  // One ended sample in a group: no baseline, no signal.
  const auto lone = rloo_advantages(at::tensor({1.0, 5.0}, kDouble), at::tensor({1.0, 0.0}, kDouble), 2);
  EXPECT_EQ(lone[0].item<double>(), 0.0);
  EXPECT_EQ(lone[1].item<double>(), 0.0);
}

TEST(ReinforceMath, GroupAdvantagesNormaliseByTheGroupsMeanAndStd) {
  const auto grpo = group_advantages(at::tensor(kRewards, kDouble), 4, true);
  const auto dr = group_advantages(at::tensor(kRewards, kDouble), 4, false);
  for (int g = 0; g < 2; ++g) {
    double mean = 0, var = 0;
    for (int j = 0; j < 4; ++j) mean += kRewards[g * 4 + j] / 4;
    for (int j = 0; j < 4; ++j) var += std::pow(kRewards[g * 4 + j] - mean, 2) / 3;  // unbiased, as torch.std
    for (int j = 0; j < 4; ++j) {
      const int i = g * 4 + j;
      EXPECT_NEAR(dr[i].item<double>(), kRewards[i] - mean, 1e-12);
      EXPECT_NEAR(grpo[i].item<double>(), (kRewards[i] - mean) / (std::sqrt(var) + 1e-4), 1e-12);
    }
  }
  // A group whose rewards are all equal has nothing to learn (and no division by zero).
  const auto flat = group_advantages(at::tensor({2.0, 2.0, 2.0}, kDouble), 3, true);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(flat[i].item<double>(), 0.0);
}

TEST(ReinforceMath, OverlongPenaltyFallsLinearlyOverTheBuffer) {
  EXPECT_EQ(overlong_penalty(80, 100, 20, 1.0), 0.0);
  EXPECT_NEAR(overlong_penalty(90, 100, 20, 1.0), -0.5, 1e-15);
  EXPECT_NEAR(overlong_penalty(100, 100, 20, 2.0), -2.0, 1e-15);
  EXPECT_EQ(overlong_penalty(100, 100, 0, 1.0), 0.0);  // off
}

TEST(ReinforceMath, TokenLossesAndK3MatchDirectComputation) {
  const auto mask = at::tensor({1., 1., 1., 0., 1., 1., 1., 1.}, kDouble).view({2, 4});
  const auto logp = at::tensor({-1., -.5, -2., 0., -.3, -1.2, -.1, -.9}, kDouble).view({2, 4});
  const auto old = at::tensor({-1.3, -.5, -1.5, 0., -.3, -.9, -.4, -.2}, kDouble).view({2, 4});
  const auto ref = at::tensor({-1.1, -.7, -2.2, 0., -.1, -1.0, -.3, -.8}, kDouble).view({2, 4});
  const auto adv = at::tensor({1., 1., 1., 1., -2., -2., -2., -2.}, kDouble).view({2, 4});
  const auto rloo = reinforce_token_loss(logp, old, adv, mask, false, 0.2, 0.2);
  const auto grpo = reinforce_token_loss(logp, old, adv, mask, true, 0.2, 0.28);
  const auto k3 = k3_kl(logp, ref);
  for (int64_t n = 0; n < 2; ++n)
    for (int64_t t = 0; t < 4; ++t) {
      const double m = mask[n][t].item<double>(), l = logp[n][t].item<double>(), a = adv[n][t].item<double>();
      EXPECT_NEAR(rloo[n][t].item<double>(), -l * a * m, 1e-12);
      const double ratio = std::exp((l - old[n][t].item<double>()) * m);
      const double clipped = std::min(std::max(ratio, 0.8), 1.28);  // DAPO's asymmetric clip
      EXPECT_NEAR(grpo[n][t].item<double>(), m * std::max(-a * ratio, -a * clipped), 1e-12) << n << "," << t;
      const double d = ref[n][t].item<double>() - l;
      EXPECT_NEAR(k3[n][t].item<double>(), std::exp(d) - d - 1, 1e-12);
    }
}

// ---- aligner reinforce end to end ----

std::string reinforce_args(const fs::path& out, const std::string& extra) {
  return online_args("reinforce model.path=" + tiny_model(), out) +
         " rollout.prompts_per_step=4 rollout.samples_per_prompt=4 trainer.micro_batch_size=4"
         " reinforce.mask_unfinished=false optim.lr=2e-3 " +
         extra;
}

// Seen at the time of writing (validation reward, greedy): 1.35 -> 4.62 for each estimator.
TEST(Reinforce, EachEstimatorRaisesTheHeldOutReward) {
  for (const std::string estimator : {"rloo", "grpo", "dr_grpo"}) {
    const auto out = temp_dir("reinforce_" + estimator);
    const std::string updates = estimator == "rloo" ? "" : " reinforce.epochs=2 reinforce.minibatches=2";
    const auto r = run_aligner(reinforce_args(
        out, "reinforce.advantage=" + estimator + updates + " trainer.max_steps=24 trainer.val_interval=24"));
    ASSERT_EQ(r.status, 0) << r.output;
    const auto train = metrics(out), val = metrics(out, "validation");
    ASSERT_EQ(train.size(), 24u) << estimator;
    ASSERT_EQ(val.size(), 2u);
    for (const char* key :
         {"reward_mean", "reward_std", "kl", "response_length", "ended_fraction", "entropy", "approx_kl",
          "advantage_abs_mean", "time_generation", "time_inference", "gen_tokens_per_s"})
      EXPECT_TRUE(train.back().contains(key)) << estimator << " " << key;
    EXPECT_EQ(train[0]["kl"].get<double>(), 0.0) << estimator;  // the policy is still the reference
    const double before = val[0]["reward"].get<double>(), after = val[1]["reward"].get<double>();
    EXPECT_GT(after, before + 1.0) << estimator << ": held-out reward " << before << " -> " << after;
    fs::remove_all(out);
  }
}

// A reward that is the same for every response (an answer nobody writes) leaves every group
// without signal: dynamic sampling draws more prompts each round, then fills in with dropped groups.
TEST(Reinforce, DynamicSamplingDropsGroupsWhoseRewardsAreAllEqual) {
  const auto out = temp_dir("reinforce_dynamic");
  const auto r =
      run_aligner(reinforce_args(out,
                                 "reinforce.advantage=grpo reward.model=null reward.rule=exact_match "
                                 "reinforce.dynamic_sampling=true reinforce.max_sampling_rounds=3 "
                                 "trainer.max_steps=2 data.validation=null"));
  ASSERT_EQ(r.status, 0) << r.output;
  const auto train = metrics(out);
  ASSERT_EQ(train.size(), 2u);
  // Three rounds of four prompts, every group dropped; four of them fill the step.
  EXPECT_EQ(train[0]["dropped_groups"].get<double>(), 12.0) << train[0].dump();
  EXPECT_EQ(train[0]["advantage_abs_mean"].get<double>(), 0.0);
  fs::remove_all(out);
}

TEST(Reinforce, KilledRunResumesToTheSameWeights) {
  const auto a = temp_dir("reinforce_resume_a"), b = temp_dir("reinforce_resume_b");
  const std::string args =
      "reinforce.advantage=grpo reinforce.minibatches=2 trainer.max_steps=4 trainer.save_interval=1";
  run_whole_and_killed([&](const fs::path& out) { return reinforce_args(out, args); }, a, b, 2);
  if (HasFatalFailure()) return;
  expect_same_weights(a / "final", b / "final");
  const auto ma = metrics(a), mb = metrics(b);
  ASSERT_EQ(mb.size(), 4u);
  for (size_t i = 0; i < 4; ++i)
    EXPECT_EQ(ma[i]["reward_mean"].get<double>(), mb[i]["reward_mean"].get<double>()) << i;
  fs::remove_all(a);
  fs::remove_all(b);
}

TEST(Reinforce, BadConfigurationsAreOneLineErrors) {
  const auto out = temp_dir("reinforce_errors");
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"reinforce.advantage=ppo", "config key 'reinforce.advantage' expects rloo, grpo or dr_grpo"},
      {"rollout.samples_per_prompt=1", "config key 'rollout.samples_per_prompt' must be at least 2"},
      {"reinforce.minibatches=2", "reinforce.advantage=rloo makes one update per rollout"},
      {"reinforce.loss_aggregation=mean", "config key 'reinforce.loss_aggregation' expects"},
      {"reinforce.overlong_buffer=6",
       "config key 'reinforce.overlong_buffer' must be in [0, rollout.max_new_tokens)"},
      {"reinforce.advantage=grpo reinforce.minibatches=3", "must split into reinforce.minibatches (3)"},
  };
  for (const auto& [args, message] : cases) {
    const auto r = run_aligner(reinforce_args(out, args + " trainer.max_steps=1"));
    EXPECT_NE(r.status, 0) << args;
    EXPECT_NE(r.output.find(message), std::string::npos) << args << "\n" << r.output;
  }
  fs::remove_all(out);
}

// With adapters the reference is the base with them off: no KL at the first step, some once the
// adapters have moved the policy; final/ is a PEFT adapter.
TEST(Reinforce, LoraKlIsToTheBaseWithTheAdaptersOff) {
  const auto out = temp_dir("reinforce_lora");
  const auto r = run_aligner(reinforce_args(
      out, "reinforce.advantage=grpo trainer.max_steps=4 lora.rank=4 optim.lr=5e-2 data.validation=null"));
  ASSERT_EQ(r.status, 0) << r.output;
  expect_kl_to_the_base(metrics(out), 4);
  if (HasFatalFailure()) return;
  EXPECT_TRUE(fs::exists(out / "final" / "adapter_config.json"));
  fs::remove_all(out);
}

}  // namespace
}  // namespace aligner::test
