// What online algorithms (PPO, REINFORCE, rejection sampling) score their rollouts with: a reward
// model in this process (reward.model) or one served by `aligner serve-reward` over HTTP
// (reward.url). Both answer the same question the same way: one number per (prompt, response).
#pragma once
#include <ATen/ATen.h>

#include <nlohmann/json.hpp>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/config.h"
#include "text/tokenizer.h"

namespace aligner {

// One rollout to score, as the actor generated it.
struct RewardQuery {
  std::vector<int32_t> prompt;    // the prompt's token ids (the actor's tokenizer)
  std::vector<int32_t> response;  // the response's ids as generated: ends with EOS when it ended so
  std::string prompt_text;        // the prompt as the actor saw it (rendered chat template)
  std::string response_text;      // the response decoded without special tokens
  bool ended = false;             // ended by EOS or a stop (not cut by the length limit)
  nlohmann::json record;          // the prompt's JSONL line: reference answers, verifier fields
};

class Reward {
 public:
  virtual ~Reward() = default;
  // One reward per query, in order.
  virtual std::vector<double> score(const std::vector<RewardQuery>& queries) = 0;
};

struct RewardModelOptions {
  std::string path;  // a reward-model folder (XxxForSequenceClassification) with its tokenizer
  at::Device device{at::kCPU};
  at::ScalarType dtype = at::kFloat;
  // A regression model's outputs combined into one reward: weights in the model's label order.
  // Empty: the model must have one output.
  std::vector<double> attribute_weights;
  int64_t batch_size = 16;  // sequences per forward pass
};

// A reward model in this process. When its tokenizer is not the actor's (`actor_tokenizer`), the
// texts are encoded with its own, as `aligner rm` encodes a prompt/response record; else the token
// ids are scored as they are.
std::unique_ptr<Reward> load_model_reward(const RewardModelOptions& opt, const Tokenizer& actor_tokenizer);

// A reward model served by `aligner serve-reward` at `url` (http://HOST:PORT). Checks the server's
// health on connecting; errors name the url and what the server answered.
std::unique_ptr<Reward> connect_reward_server(const std::string& url, const Tokenizer& actor_tokenizer,
                                              double timeout_s = 600);

// The reward that the config's reward.* keys describe (configs/ppo.yaml lists them): any of a reward
// model (reward.model, or reward.url served), a built-in verifiable rule (reward.rule, against the
// prompt line's reference answer: reward/rule_reward.h), a format check (reward.format_pattern) and
// an external program (reward.command: reward/command_reward.h), each times its weight
// (reward.model_weight, rule_weight, format_weight, command_weight), summed. At least one must be
// set; errors name the key, and every key is checked before a model loads or the program starts.
std::unique_ptr<Reward> make_reward(const Config& cfg, const Tokenizer& tok, at::Device device,
                                    at::ScalarType dtype);

// reward.attribute_weights, parsed (a regression reward model's outputs combined into one).
std::vector<double> reward_attribute_weights(const Config& cfg);

// make_reward's checks of the reward.* keys alone (patterns compiled, nothing loaded or started),
// for a command to call before it loads its own models.
void check_reward_config(const Config& cfg);

}  // namespace aligner
