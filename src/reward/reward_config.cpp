// make_reward (reward.h): the reward.* keys checked and turned into one reward, the weighted sum
// of its sources.
#include <fmt/format.h>

#include <cmath>

#include "core/error.h"
#include "core/log.h"
#include "reward/command_reward.h"
#include "reward/reward.h"
#include "reward/rule_reward.h"

namespace aligner {
namespace {

struct Source {
  std::string name;  // for the log
  double weight = 1;
  std::unique_ptr<Reward> reward;
};

class WeightedSum final : public Reward {
 public:
  explicit WeightedSum(std::vector<Source> sources) : sources_(std::move(sources)) {}

  std::vector<double> score(const std::vector<RewardQuery>& queries) override {
    std::vector<double> total(queries.size(), 0.0);
    for (const auto& s : sources_) {
      const auto scores = s.reward->score(queries);
      if (scores.size() != queries.size())
        fail("reward {}: {} scores for {} queries", s.name, scores.size(), queries.size());
      for (size_t i = 0; i < total.size(); ++i) total[i] += s.weight * scores[i];
    }
    return total;
  }

 private:
  std::vector<Source> sources_;
};

// A set source's weight must be a finite non-zero number. A weight (or any key only a source reads)
// changed for a source that is not set is a mistake, not nothing to do: the user expects it to count.
double weight(const Config& cfg, const std::string& key, bool used, const std::string& source) {
  const double w = cfg.get_float(key);
  if (!used) {
    if (!cfg.is_default(key)) fail("config key '{}' is set but {} is not", key, source);
    return 0;
  }
  if (w == 0) fail("config key '{}' is 0: give {} a non-zero weight, or leave it unset", key, source);
  if (!std::isfinite(w)) fail("config key '{}' must be a finite number, got {}", key, w);
  return w;
}

// The reward.* keys, every one checked, with the rule and format rewards built: their patterns
// compile here, so that a bad one is an error before any model loads.
struct Spec {
  std::string model, url, command;
  double model_weight = 0, rule_weight = 0, format_weight = 0, command_weight = 0, timeout_s = 0;
  int64_t batch_size = 0;
  std::vector<double> attribute_weights;
  std::string rule_name;  // for the log
  std::unique_ptr<Reward> rule, format;
};

Spec read_spec(const Config& cfg) {
  Spec s;
  s.model = cfg.get_string("reward.model");
  s.url = cfg.get_string("reward.url");
  s.command = cfg.get_string("reward.command");
  const std::string rule = cfg.get_string("reward.rule"), format = cfg.get_string("reward.format_pattern");
  if (!s.model.empty() && !s.url.empty())
    fail(
        "config keys 'reward.model' and 'reward.url' are both set: the reward model runs in this process or "
        "is served, not both");
  if (s.model.empty() && s.url.empty() && rule.empty() && format.empty() && s.command.empty())
    fail(
        "no reward: set reward.model (or reward.url), reward.rule, reward.format_pattern or reward.command, "
        "or several of them");
  s.model_weight =
      weight(cfg, "reward.model_weight", !s.model.empty() || !s.url.empty(), "reward.model (or reward.url)");
  s.rule_weight = weight(cfg, "reward.rule_weight", !rule.empty(), "reward.rule");
  s.format_weight = weight(cfg, "reward.format_weight", !format.empty(), "reward.format_pattern");
  s.command_weight = weight(cfg, "reward.command_weight", !s.command.empty(), "reward.command");

  RuleOptions ro;
  ro.rule = rule;
  ro.answer_field = cfg.get_string("reward.answer_field");
  ro.pattern = cfg.get_string("reward.pattern");
  ro.tolerance = cfg.get_float("reward.tolerance");
  for (const char* key : {"reward.answer_field", "reward.pattern", "reward.tolerance"})
    if (rule.empty() && !cfg.is_default(key)) fail("config key '{}' is set but reward.rule is not", key);
  if (!rule.empty() && rule != "numeric" && !cfg.is_default("reward.tolerance"))
    fail("config key 'reward.tolerance' is set but reward.rule is {}, not numeric", rule);
  s.timeout_s = cfg.get_float("reward.timeout_s");
  if ((!s.url.empty() || !s.command.empty()) && (!(s.timeout_s > 0) || !std::isfinite(s.timeout_s)))
    fail("config key 'reward.timeout_s' must be a positive number of seconds, got {}", s.timeout_s);
  s.batch_size = cfg.get_int("reward.batch_size");
  if (!s.model.empty() && s.batch_size < 1)
    fail("config key 'reward.batch_size' must be at least 1, got {}", s.batch_size);
  s.attribute_weights = reward_attribute_weights(cfg);

  if (!rule.empty()) {
    s.rule = make_rule_reward(ro);
    s.rule_name = fmt::format("rule {} on '{}'", rule, ro.answer_field);
  }
  if (!format.empty()) s.format = make_format_reward(format);
  return s;
}

}  // namespace

void check_reward_config(const Config& cfg) {
  read_spec(cfg);
}

std::vector<double> reward_attribute_weights(const Config& cfg) {
  return cfg.get_float_list("reward.attribute_weights");
}

std::unique_ptr<Reward> make_reward(const Config& cfg, const Tokenizer& tok, at::Device device,
                                    at::ScalarType dtype) {
  Spec s = read_spec(cfg);
  std::vector<Source> sources;
  if (!s.model.empty()) {
    RewardModelOptions mo;
    mo.path = s.model;
    mo.device = device;
    mo.dtype = dtype;
    mo.attribute_weights = s.attribute_weights;
    mo.batch_size = s.batch_size;
    sources.push_back({"model " + s.model, s.model_weight, load_model_reward(mo, tok)});
  }
  if (!s.url.empty())
    sources.push_back({"server " + s.url, s.model_weight, connect_reward_server(s.url, tok, s.timeout_s)});
  if (s.rule) sources.push_back({s.rule_name, s.rule_weight, std::move(s.rule)});
  if (s.format) sources.push_back({"format", s.format_weight, std::move(s.format)});
  if (!s.command.empty())
    sources.push_back(
        {"command '" + s.command + "'", s.command_weight, start_command_reward(s.command, s.timeout_s)});

  std::string described;
  for (const auto& source : sources)
    described += fmt::format("{}{} x {}", described.empty() ? "" : " + ", source.weight, source.name);
  log_info("reward: {}", described);
  return std::make_unique<WeightedSum>(std::move(sources));
}

}  // namespace aligner
