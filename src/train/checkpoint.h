// Training checkpoints: OUTPUT_DIR/checkpoints/step_N/ holds the model as a Hugging Face folder
// (model/), the optimizer state (optimizer.safetensors) and trainer_state.json (step, data
// position, RNG). Each is written under step_N.tmp/ and renamed once complete, so a kill at any
// moment leaves every step_N/ whole.
#pragma once
#include <nlohmann/json.hpp>

#include <optional>
#include <string>

#include "io/safetensors.h"
#include "model/transformer.h"

namespace aligner {

struct CheckpointState {
  int64_t step = 0;
  nlohmann::json trainer;  // step, data position, RNG, anything the algorithm needs
};

// Writes step_<step>/ and then deletes all but the newest keep_last (keep_last <= 0 keeps all).
void save_checkpoint(const std::string& output_dir, const Transformer& model,
                     const safetensors::NamedTensors& optimizer_state, const CheckpointState& state,
                     int64_t keep_last, const std::string& tokenizer_dir);

// The newest complete checkpoint folder, or "" when there is none.
std::string latest_checkpoint(const std::string& output_dir);

// Reads trainer_state.json; the model and optimizer files are read by the caller from
// <dir>/model and <dir>/optimizer.safetensors.
CheckpointState read_checkpoint_state(const std::string& checkpoint_dir);

}  // namespace aligner
