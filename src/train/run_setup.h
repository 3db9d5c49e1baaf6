// What every training command does first: join the data-parallel group that the launcher
// describes, choose the device, and quiet the other ranks' logs.
#pragma once
#include "core/config.h"
#include "dist/process_group.h"
#include "model/transformer.h"
#include "text/tokenizer.h"

namespace aligner {

struct RunContext {
  dist::Dist dist;
  at::Device device{at::kCPU};
};

// model.device: auto (CUDA when present) | cpu | cuda; each rank takes GPU LOCAL_RANK.
RunContext init_run(const Config& cfg);

// A causal LM folder that training starts from, and its tokenizer: a sequence classifier, or a
// tokenizer with more tokens than the model's vocabulary, is an error naming `key` (the config key
// that gave `dir`).
struct Policy {
  Transformer model;
  std::unique_ptr<Tokenizer> tok;
};
Policy load_policy(const std::string& dir, const std::string& key, at::Device device, at::ScalarType dtype);

}  // namespace aligner
