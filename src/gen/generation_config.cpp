#include "gen/generation_config.h"

#include "core/error.h"

namespace aligner {
namespace {

// An empty list default is a list of strings to the config schema, so the ids are parsed here.
std::vector<int64_t> int_list(const Config& cfg, const std::string& key) {
  std::vector<int64_t> out;
  for (const auto& s : cfg.get_string_list(key)) {
    size_t used = 0;
    int64_t value = 0;
    try {
      value = std::stoll(s, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used == 0 || used != s.size()) fail("config key '{}' expects a list of ints, got '{}'", key, s);
    out.push_back(value);
  }
  return out;
}

}  // namespace

GenerationOptions read_generation_options(const Config& cfg, const std::string& max_new_tokens_key,
                                          const std::string& num_samples_key) {
  GenerationOptions o;
  o.max_new_tokens = cfg.get_int(max_new_tokens_key);
  o.sampling.greedy = cfg.get_bool("gen.greedy");
  o.sampling.temperature = cfg.get_float("gen.temperature");
  o.sampling.top_k = cfg.get_int("gen.top_k");
  o.sampling.top_p = cfg.get_float("gen.top_p");
  o.num_samples = num_samples_key.empty() ? 1 : cfg.get_int(num_samples_key);
  o.stop_strings = cfg.get_string_list("gen.stop");
  o.stop_ids = int_list(cfg, "gen.stop_ids");
  o.stop_at_eos = !cfg.get_bool("gen.ignore_eos");
  o.seed = uint64_t(cfg.get_int("gen.seed"));
  o.batch_size = cfg.get_int("gen.batch_size");
  o.prefill_tokens = cfg.get_int("gen.prefill_tokens");
  for (const std::string& key : {max_new_tokens_key, num_samples_key, std::string("gen.batch_size")})
    if (!key.empty() && cfg.get_int(key) < 1) fail("config key '{}' must be at least 1, got {}", key, cfg.get_int(key));
  if (!(o.sampling.temperature >= 0))
    fail("config key 'gen.temperature' must not be negative (0 is greedy), got {}", o.sampling.temperature);
  if (o.sampling.top_k < 0)
    fail("config key 'gen.top_k' must not be negative (0: off), got {}", o.sampling.top_k);
  if (!(o.sampling.top_p > 0 && o.sampling.top_p <= 1))
    fail("config key 'gen.top_p' must be in (0, 1], got {}", o.sampling.top_p);
  return o;
}

}  // namespace aligner
