// What the online algorithms' tests (ppo, reinforce, rs) run on: the tiny model as the policy, the
// same model with a random score head as the reward model, and a few prompts.
#pragma once
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>

#include "data/packing.h"
#include "io/hf_checkpoint.h"
#include "run_outputs.h"
#include "test_util.h"
#include "text/tokenizer.h"

namespace aligner::test {

// The tiny model with a random score head (seed 7): a fixed function of the text that a policy can
// learn to please. Made once per test binary.
inline const std::string& tiny_reward_model() {
  static std::string dir;
  if (dir.empty()) {
    const auto d = temp_dir("online_reward_model") / "rm";
    const auto tok = load_tokenizer(tiny_model());
    auto m = load_reward_model(tiny_model(), at::kCPU, at::kFloat, {"reward"}, pad_id_for(*tok), 7);
    save_transformer(m, d.string(), std::nullopt, 0, tiny_model());
    dir = d.string();
  }
  return dir;
}

// train.jsonl: 32 prompts in NeMo's PPO layout ("text", with an "answer" that no response gives);
// val.jsonl: 8 held-out chat-style "prompt" strings.
inline const std::filesystem::path& online_prompts() {
  static std::filesystem::path dir;
  if (dir.empty()) {
    dir = temp_dir("online_prompts");
    const char* topics[] = {"the sea", "a cat", "rain", "music", "bread", "the moon", "a garden", "winter"};
    std::ofstream train(dir / "train.jsonl"), val(dir / "val.jsonl");
    for (int i = 0; i < 32; ++i)
      train << nlohmann::json{{"text", fmt::format("Tell me about {} ({})", topics[i % 8], i)},
                              {"answer", "x"}}
                   .dump()
            << "\n";
    for (int i = 0; i < 8; ++i)
      val << nlohmann::json{{"prompt", fmt::format("Write a line on {}", topics[(i * 3) % 8])}}.dump()
          << "\n";
  }
  return dir;
}

// The keys every online test run shares: the tiny policy and reward model on the CPU, the prompts
// above, short responses sampled from the top 20 tokens.
inline std::string online_args(const std::string& command, const std::filesystem::path& out) {
  return command + " reward.model=" + tiny_reward_model() +
         " data.train=" + (online_prompts() / "train.jsonl").string() +
         " data.validation=" + (online_prompts() / "val.jsonl").string() +
         " model.device=cpu rollout.max_new_tokens=6 gen.top_k=20 trainer.seed=3 output_dir=" + out.string();
}

// An online command `args` (output_dir `one`) run again on two local ranks with trainer.sharding
// `sharding`, into `two`, its rendezvous from port_base (run_aligner_on_two_ranks); then each of
// `keys` of every step within 1e-4 (relative) of the one-rank run's. false: no Gloo, skip.
inline bool expect_two_ranks_match_one(const std::string& args, const std::filesystem::path& one,
                                       const std::filesystem::path& two, const std::string& sharding,
                                       int port_base, const std::vector<std::string>& keys) {
  std::string two_args = args + " trainer.sharding=" + sharding;
  two_args.replace(two_args.find(one.string()), one.string().size(), two.string());
  const auto r = run_aligner_on_two_ranks(two_args, port_base);
  if (r.output.find("needs Gloo") != std::string::npos) return false;
  EXPECT_EQ(r.status, 0) << r.output;
  const auto a = metrics(one), b = metrics(two);
  EXPECT_EQ(a.size(), b.size()) << two;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i)
    for (const auto& key : keys)
      EXPECT_NEAR(a[i][key].get<double>(), b[i][key].get<double>(),
                  1e-4 * (1 + std::abs(a[i][key].get<double>())))
          << sharding << " step " << i + 1 << " " << key;
  return true;
}

// The train rows of a run whose reference is the base with the adapters (LoRA) off: no KL at the
// first step, where the adapters still have no effect, and some at the last, once they have moved
// the policy (a reference that kept them would show none).
inline void expect_kl_to_the_base(const std::vector<nlohmann::json>& train, size_t steps) {
  ASSERT_EQ(train.size(), steps);
  EXPECT_EQ(train.front()["kl"].get<double>(), 0.0);
  EXPECT_GT(std::abs(train.back()["kl"].get<double>()), 1e-6);
}

}  // namespace aligner::test
