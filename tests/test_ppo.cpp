// PPO: the math against direct computations, and `aligner ppo` end to end on the tiny model with a
// random reward model: the held-out reward rises, the first update's ratio is exactly 1, a killed
// run resumes to the same weights, two ranks match one.
#include <gtest/gtest.h>

#include <cmath>
#include <csignal>
#include <fstream>

#include "algo/ppo.h"
#include "data/packing.h"
#include "io/hf_checkpoint.h"
#include "io/safetensors.h"
#include "online_fixtures.h"
#include "reward/reward_model.h"
#include "reward/reward_server.h"
#include "run_outputs.h"
#include "test_util.h"
#include "text/tokenizer.h"

namespace aligner::test {
namespace {

namespace fs = std::filesystem;
const auto kDouble = at::TensorOptions().dtype(at::kDouble);

// Two rows of 6 positions; row 0's response is positions 1-3, row 1's positions 2-5.
at::Tensor fixed_mask() {
  return at::tensor({0., 1., 1., 1., 0., 0., 0., 0., 1., 1., 1., 1.}, kDouble).view({2, 6});
}

TEST(PpoMath, TokenRewardsPenaliseKlAndAddTheScoreAtTheLastResponseToken) {
  const auto mask = fixed_mask();
  const auto kl = at::arange(12, kDouble).view({2, 6}) * 0.1;
  const auto scores = at::tensor({2.0, -1.0}, kDouble);
  const auto r = token_rewards(scores, kl, mask, 0.5);
  for (int64_t n = 0; n < 2; ++n)
    for (int64_t t = 0; t < 6; ++t) {
      double want = mask[n][t].item<double>() * -0.5 * kl[n][t].item<double>();
      if ((n == 0 && t == 3) || (n == 1 && t == 5)) want += scores[n].item<double>();
      EXPECT_NEAR(r[n][t].item<double>(), want, 1e-12) << n << "," << t;
    }
}

// GAE's recursion against its definition: A_t = sum_l (gamma lambda)^l delta_{t+l} over the
// response, delta_t = r_t + gamma V_{t+1} - V_t with V after the last token 0.
TEST(PpoMath, GaeMatchesItsDefinition) {
  const auto mask = fixed_mask();
  const auto rewards = at::tensor({0., .3, -.2, 1.5, 0., 0., 0., 0., .1, .2, -.4, 2.}, kDouble).view({2, 6});
  const auto values = at::tensor({9., .5, .4, .9, 9., 9., 9., 9., -.3, .7, .2, .1}, kDouble).view({2, 6});
  const double gamma = 0.9, lambda = 0.8;
  const auto g = gae(rewards, values, mask, gamma, lambda);
  for (int64_t n = 0; n < 2; ++n) {
    std::vector<int64_t> pos;
    for (int64_t t = 0; t < 6; ++t)
      if (mask[n][t].item<double>() > 0) pos.push_back(t);
    for (size_t i = 0; i < pos.size(); ++i) {
      double want = 0;
      for (size_t l = i; l < pos.size(); ++l) {
        const double next = l + 1 < pos.size() ? values[n][pos[l + 1]].item<double>() : 0.0;
        const double delta =
            rewards[n][pos[l]].item<double>() + gamma * next - values[n][pos[l]].item<double>();
        want += std::pow(gamma * lambda, double(l - i)) * delta;
      }
      EXPECT_NEAR(g.advantages[n][pos[i]].item<double>(), want, 1e-12) << n << "," << pos[i];
      EXPECT_NEAR(g.returns[n][pos[i]].item<double>(), want + values[n][pos[i]].item<double>(), 1e-12);
    }
    for (int64_t t = 0; t < 6; ++t)
      if (mask[n][t].item<double>() == 0) {
        EXPECT_EQ(g.advantages[n][t].item<double>(), 0.0);
        EXPECT_EQ(g.returns[n][t].item<double>(), 0.0);
      }
  }
}

TEST(PpoMath, WhitenAndBothLossesMatchDirectComputation) {
  const auto mask = fixed_mask();
  const auto x = at::arange(12, kDouble).view({2, 6});
  const auto w = whiten(x, mask, 5.0, 4.0);
  for (int64_t n = 0; n < 2; ++n)
    for (int64_t t = 0; t < 6; ++t)
      EXPECT_NEAR(w[n][t].item<double>(),
                  mask[n][t].item<double>() * (x[n][t].item<double>() - 5) / std::sqrt(4 + 1e-8), 1e-12);

  // Ratios on both sides of the clip, for positive and negative advantages.
  const auto logp = at::tensor({0., .5, -.5, .05, 0., 0., 0., 0., .3, -.3, .1, 0.}, kDouble).view({2, 6});
  const auto old = at::zeros({2, 6}, kDouble);
  const auto adv = at::tensor({0., 1., 1., -1., 0., 0., 0., 0., -2., -2., 2., .5}, kDouble).view({2, 6});
  const auto actor = ppo_actor_loss(logp, old, adv, mask, 0.2);
  const auto v = at::tensor({0., .5, 1., 0., 0., 0., 0., 0., .1, .9, -1., .3}, kDouble).view({2, 6});
  const auto v_old = at::tensor({0., .2, .1, .3, 0., 0., 0., 0., .1, .2, .3, .4}, kDouble).view({2, 6});
  const auto ret = at::tensor({0., 1., .5, -.2, 0., 0., 0., 0., 1., 0., -1., .3}, kDouble).view({2, 6});
  const auto critic = ppo_critic_loss(v, v_old, ret, mask, 0.2);
  for (int64_t n = 0; n < 2; ++n)
    for (int64_t t = 0; t < 6; ++t) {
      const double m = mask[n][t].item<double>();
      const double ratio = std::exp(logp[n][t].item<double>() * m), a = adv[n][t].item<double>();
      const double clipped = std::min(std::max(ratio, 0.8), 1.2);
      EXPECT_NEAR(actor[n][t].item<double>(), m * std::max(-a * ratio, -a * clipped), 1e-12) << n << "," << t;
      const double vv = v[n][t].item<double>(), vo = v_old[n][t].item<double>(), r = ret[n][t].item<double>();
      const double vc = vo + std::min(std::max(vv - vo, -0.2), 0.2);
      EXPECT_NEAR(critic[n][t].item<double>(), m * 0.5 * std::max((vv - r) * (vv - r), (vc - r) * (vc - r)),
                  1e-12);
    }
}

TEST(PpoMath, AdaptiveKlMovesTowardTheTarget) {
  // TRL's AdaptiveKLController: error clipped to +-0.2, scaled by sequences / horizon.
  EXPECT_NEAR(adapt_kl_coef(0.1, 12.0, 6.0, 10000, 100), 0.1 * (1 + 0.2 * 100 / 10000.0), 1e-15);
  EXPECT_NEAR(adapt_kl_coef(0.1, 5.7, 6.0, 10000, 100), 0.1 * (1 - 0.05 * 100 / 10000.0), 1e-15);
  EXPECT_NEAR(adapt_kl_coef(0.1, 0.0, 6.0, 1000, 500), 0.1 * (1 - 0.2 * 0.5), 1e-15);
}

// ---- aligner ppo end to end ----

std::string ppo_args(const fs::path& out, const std::string& extra) {
  return online_args("ppo actor.path=" + tiny_model(), out) +
         " rollout.prompts_per_step=8 rollout.samples_per_prompt=2 trainer.micro_batch_size=4 "
         "ppo.minibatches=2"
         " ppo.mask_unfinished=false actor.optim.lr=2e-3 critic.optim.lr=2e-3 " +
         extra;
}

TEST(Ppo, HeldOutRewardRisesAndTheFirstUpdateHasRatioOne) {
  const auto out = temp_dir("ppo_learns");
  const auto r = run_aligner(ppo_args(out, "trainer.max_steps=24 trainer.val_interval=24 ppo.epochs=2"));
  ASSERT_EQ(r.status, 0) << r.output;
  const auto train = metrics(out), val = metrics(out, "validation");
  ASSERT_EQ(train.size(), 24u);
  ASSERT_EQ(val.size(), 2u);
  for (const auto& row : train) {
    for (const char* key : {"reward_mean",        "reward_std",      "kl",
                            "response_length",    "ended_fraction",  "entropy",
                            "clip_fraction",      "approx_kl",       "value_loss",
                            "explained_variance", "advantage_mean",  "actor/lr",
                            "critic/lr",          "actor/grad_norm", "critic/grad_norm",
                            "time_generation",    "time_inference",  "gen_tokens_per_s",
                            "step_seconds",       "update_seconds"})
      ASSERT_TRUE(row.contains(key)) << key << " in " << row.dump();
    // Old log-probs come from the training forward on the first update's own micro-batches.
    EXPECT_EQ(row["ratio_max"].get<double>(), 1.0) << row.dump();
    EXPECT_EQ(row["response_length"].get<double>(), 6.0);
  }
  EXPECT_EQ(train[0]["kl"].get<double>(), 0.0);  // the actor is still the reference
  EXPECT_GT(train.back()["kl"].get<double>(), 0.0);
  // Seen at the time of writing: held-out 1.35 -> 4.62, the first six rollouts' mean 1.3 and the
  // last six's 3.8.
  const double before = val[0]["reward"].get<double>(), after = val[1]["reward"].get<double>();
  EXPECT_GT(after, before + 1.0) << "held-out reward " << before << " -> " << after;
  double first = 0, last = 0;
  for (size_t i = 0; i < 6; ++i) {
    first += train[i]["reward_mean"].get<double>() / 6;
    last += train[train.size() - 1 - i]["reward_mean"].get<double>() / 6;
  }
  EXPECT_GT(last, first + 1.0) << "rollout reward " << first << " -> " << last;
  for (const char* m : {"actor", "critic"}) EXPECT_TRUE(fs::exists(out / "final" / m / "config.json")) << m;
  const auto critic = load_transformer((out / "final/critic").string(), at::kCPU);
  EXPECT_EQ(critic.cfg.num_labels, 1);
  fs::remove_all(out);
}

TEST(Ppo, KilledRunResumesToTheSameWeights) {
  const auto a = temp_dir("ppo_resume_a"), b = temp_dir("ppo_resume_b");
  const std::string args = "trainer.max_steps=4 trainer.save_interval=1 ppo.target_kl=0.01";
  run_whole_and_killed([&](const fs::path& out) { return ppo_args(out, args); }, a, b, 2);
  if (HasFatalFailure()) return;
  for (const char* m : {"actor", "critic"}) expect_same_weights(a / "final" / m, b / "final" / m);
  const auto ma = metrics(a), mb = metrics(b);
  ASSERT_EQ(mb.size(), 4u);
  for (size_t i = 0; i < 4; ++i)
    for (const char* key : {"loss", "reward_mean", "kl_coef"})
      EXPECT_EQ(ma[i][key].get<double>(), mb[i][key].get<double>()) << i << " " << key;
  fs::remove_all(a);
  fs::remove_all(b);
}

// Greedy rollouts are the same however the prompts are shared out, so two Gloo ranks see one
// rank's rollout and, with the advantages whitened over both, make the same updates.
TEST(Ppo, TwoRanksMatchOneRank) {
  const auto out = temp_dir("ppo_ranks");
  const std::string args =
      ppo_args(out / "one",
               "gen.greedy=true trainer.max_steps=2 ppo.minibatches=1 actor.optim.lr=1e-5 "
               "critic.optim.lr=1e-5 trainer.micro_batch_size=2");
  const auto one = run_aligner(args);
  ASSERT_EQ(one.status, 0) << one.output;
  // Whole models on each rank, and sharded (trainer.sharding=full: gathered whole to generate).
  for (const std::string sharding : {"none", "full"}) {
    const fs::path two = out / ("two_" + sharding);
    if (!expect_two_ranks_match_one(
            args, out / "one", two, sharding, sharding == "none" ? 29750 : 30100,
            {"loss", "reward_mean", "reward_std", "kl", "value_loss", "advantage_mean"}))
      GTEST_SKIP() << "this libtorch has no Gloo for CPU ranks";
    ASSERT_EQ(metrics(two).size(), 2u);
    // Two Adam steps of lr 1e-5 move a weight by at most 2e-5; the runs agree far inside that.
    for (const char* m : {"actor", "critic"})
      expect_same_weights(out / "one/final" / m, two / "final" / m, 5e-6);
  }
  fs::remove_all(out);
}

// The reward model behind `aligner serve-reward`'s server (here in the test's process, on the
// loopback) scores as the same model in the run's own process: the runs are the same.
TEST(Ppo, RewardUrlGivesTheSameRunAsRewardModel) {
  const auto out = temp_dir("ppo_url");
  RewardModelOptions ro;
  ro.path = tiny_reward_model();
  RewardServer server(load_reward_scorer(ro), {});
  server.start("127.0.0.1", 0);
  const std::string args = "trainer.max_steps=3 trainer.val_interval=3";
  const auto local = run_aligner(ppo_args(out / "local", args));
  ASSERT_EQ(local.status, 0) << local.output;
  const auto served = run_aligner(
      ppo_args(out / "served", args + " reward.model=null critic.path=" + tiny_reward_model() +
                                   " reward.url=http://127.0.0.1:" + std::to_string(server.port())));
  ASSERT_EQ(served.status, 0) << served.output;
  server.stop();
  const auto a = metrics(out / "local"), b = metrics(out / "served");
  ASSERT_EQ(a.size(), 3u);
  ASSERT_EQ(b.size(), 3u);
  for (size_t i = 0; i < 3; ++i)
    for (const char* key : {"reward_mean", "reward_std", "loss", "kl"})
      EXPECT_NEAR(a[i][key].get<double>(), b[i][key].get<double>(), 1e-6) << i << " " << key;
  const auto va = metrics(out / "local", "validation"), vb = metrics(out / "served", "validation");
  ASSERT_EQ(va.size(), 2u);
  ASSERT_EQ(vb.size(), 2u);
  EXPECT_NEAR(va[1]["reward"].get<double>(), vb[1]["reward"].get<double>(), 1e-6);
  fs::remove_all(out);
}

TEST(Ppo, BadConfigurationsAreOneLineErrors) {
  const auto out = temp_dir("ppo_errors");
  struct Case {
    std::string args, message;
  };
  const std::vector<Case> cases = {
      {"reward.url=http://127.0.0.1:1", "config keys 'reward.model' and 'reward.url' are both set"},
      {"rollout.prompts_per_step=6", "must split into ppo.minibatches (2) of whole micro-batches"},
      {"ppo.clip_eps=0", "config key 'ppo.clip_eps' must be positive"},
      {"ppo.lambda=1.5", "config key 'ppo.lambda' must be in [0, 1]"},
      {"reference.offload=maybe", "config key 'reference.offload' expects auto, true or false"},
      {"data.max_length=600", "add up to more than the model's context"},
      {"reward.attribute_weights=[1,2]", "reward.attribute_weights"},
  };
  for (const auto& c : cases) {
    const auto r = run_aligner(ppo_args(out, c.args + " trainer.max_steps=1"));
    EXPECT_NE(r.status, 0) << c.args;
    EXPECT_NE(r.output.find(c.message), std::string::npos) << c.args << "\n" << r.output;
  }
  // The actor must be a causal LM.
  const auto r = run_aligner(ppo_args(out, "trainer.max_steps=1 actor.path=" + tiny_reward_model()));
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("is a reward model"), std::string::npos) << r.output;
  fs::remove_all(out);
}

// Adapters on the actor and the critic (lora.critic): no KL at the first step (the reference is the
// base with the adapters off), and each final folder is a PEFT adapter, the critic's with its value head.
TEST(Ppo, LoraOnActorAndCritic) {
  const auto out = temp_dir("ppo_lora");
  const auto r = run_aligner(ppo_args(
      out, "trainer.max_steps=3 lora.rank=4 lora.critic=true actor.optim.lr=5e-2 data.validation=null"));
  ASSERT_EQ(r.status, 0) << r.output;
  expect_kl_to_the_base(metrics(out), 3);
  if (HasFatalFailure()) return;
  const auto critic = nlohmann::json::parse(std::ifstream(out / "final" / "critic" / "adapter_config.json"));
  EXPECT_EQ(critic["task_type"], "SEQ_CLS");
  const auto file =
      safetensors::File::open((out / "final" / "critic" / "adapter_model.safetensors").string());
  EXPECT_TRUE(file.contains("base_model.model.score.weight"));
  EXPECT_TRUE(fs::exists(out / "final" / "actor" / "adapter_model.safetensors"));
  fs::remove_all(out);
}

}  // namespace
}  // namespace aligner::test
