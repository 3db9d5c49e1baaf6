#include "algo/data_stream.h"

#include <algorithm>
#include <cstdlib>
#include <thread>

#include "core/error.h"

namespace aligner {

DataOptions read_data_options(const Config& cfg, const ModelConfig& model) {
  DataOptions opt;
  // Data with a single layout and its own end-of-turn (steerlm2) has no data.format or data.add_eos.
  if (cfg.has("data.format")) opt.format = cfg.get_string("data.format");
  opt.max_length = cfg.get_int("data.max_length");
  opt.truncation = parse_truncation(cfg.get_string("data.truncation"));
  opt.skip_bad_lines = cfg.get_bool("data.skip_bad_lines");
  if (cfg.has("data.add_eos")) opt.add_eos = cfg.get_bool("data.add_eos");
  if (model.max_position_embeddings > 0 && opt.max_length > model.max_position_embeddings) {
    if (!cfg.is_default("data.max_length"))
      fail("config key 'data.max_length' ({}) is beyond the model's context (max_position_embeddings {})",
           opt.max_length, model.max_position_embeddings);
    log_info("data.max_length: {}, the model's context (the default {} is beyond it)",
             model.max_position_embeddings, opt.max_length);
    opt.max_length = model.max_position_embeddings;
  }
  return opt;
}

int data_check_threads() {
  const char* local = std::getenv("LOCAL_WORLD_SIZE");
  const int ranks = local ? std::max(1, std::atoi(local)) : 1;
  return std::max(1, int(std::thread::hardware_concurrency()) / ranks);
}

}  // namespace aligner
