// The gen.* keys that `aligner generate` and the online algorithms' rollouts share, read into
// GenerationOptions and checked; errors name the key.
#pragma once
#include <string>

#include "core/config.h"
#include "gen/engine.h"

namespace aligner {

// gen.greedy, temperature, top_k, top_p, stop, stop_ids, ignore_eos, seed, batch_size and
// prefill_tokens, with the response length and samples per prompt from the keys given (gen.* for
// `aligner generate`, rollout.* for training; no samples key: one sample). gen.greedy and
// gen.temperature may be missing from the config (sampling at temperature 1 then).
GenerationOptions read_generation_options(const Config& cfg, const std::string& max_new_tokens_key,
                                          const std::string& num_samples_key = "");

}  // namespace aligner
