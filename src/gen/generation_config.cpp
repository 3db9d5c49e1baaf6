#include "gen/generation_config.h"

#include "core/error.h"

namespace aligner {

GenerationOptions read_generation_options(const Config& cfg, const std::string& max_new_tokens_key,
                                          const std::string& num_samples_key) {
  GenerationOptions o;
  o.max_new_tokens = cfg.get_int(max_new_tokens_key);
  // A command that sets the temperature itself (cai compare: one per response) has neither key.
  if (cfg.has("gen.greedy")) o.sampling.greedy = cfg.get_bool("gen.greedy");
  if (cfg.has("gen.temperature")) o.sampling.temperature = cfg.get_float("gen.temperature");
  o.sampling.top_k = cfg.get_int("gen.top_k");
  o.sampling.top_p = cfg.get_float("gen.top_p");
  o.num_samples = num_samples_key.empty() ? 1 : cfg.get_int(num_samples_key);
  o.stop_strings = cfg.get_string_list("gen.stop");
  o.stop_ids = cfg.get_int_list("gen.stop_ids");
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
