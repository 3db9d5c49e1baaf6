// The training loop that every algorithm shares. An algorithm supplies micro-batches and a loss;
// the trainer owns everything else: the global batch (micro batch x accumulation x ranks), loss
// normalisation over the whole global batch, data-parallel gradient sync, clipping, the optimizer
// and schedule, logging, validation, checkpoints and resume, and the final export.
#pragma once
#include <nlohmann/json.hpp>

#include <string>
#include <utility>
#include <vector>

#include "core/config.h"
#include "dist/process_group.h"
#include "model/transformer.h"

namespace aligner {

// One micro-batch's contribution, as sums over its loss units (tokens for SFT, pairs for DPO), so
// that the trainer can divide by the count over the whole global batch on every rank.
struct LossSums {
  at::Tensor loss;                                      // scalar; carries the graph when training
  double units = 0;                                     // what the loss is averaged over
  int64_t tokens = 0;                                   // tokens processed, for throughput
  std::vector<std::pair<std::string, double>> metrics;  // sums over units, reported as means
};

// This rank's share of the validation set, and the names its micro-batches' metrics carry, in their
// order. The names are the same on every rank, also on one whose share is empty, because the
// trainer sums the metrics over ranks position by position and every rank must send as many.
struct ValidationSums {
  std::vector<std::string> metric_names;
  std::vector<LossSums> parts;
};

class Algorithm {
 public:
  virtual ~Algorithm() = default;
  // Examples per epoch on all ranks together, to turn max_epochs into steps.
  virtual int64_t steps_per_epoch(int64_t global_batch_size) const = 0;
  // Loads this rank's next `n` micro-batches; false once max_epochs are done.
  virtual bool next_step(int64_t n) = 0;
  // Loss units in micro-batch i of the loaded step (known before any forward pass).
  virtual double units(int64_t i) const = 0;
  virtual LossSums loss(int64_t i) = 0;
  // The validation set once over (this rank's share), without gradients; no parts when none.
  virtual ValidationSums validate() = 0;
  // Where the data stands, for checkpoints; load_state continues from there.
  virtual nlohmann::json state() const = 0;
  virtual void load_state(const nlohmann::json& state) = 0;
};

struct TrainerOptions {
  int64_t max_steps = 0;  // 0: as many as max_epochs take
  int64_t max_epochs = 1;
  int64_t micro_batch_size = 1;
  int64_t global_batch_size = 1;
  int64_t val_interval = 0;  // 0: validate at the end only
  int64_t save_interval = 0;
  int64_t keep_last = 2;
  int64_t log_interval = 1;
  uint64_t seed = 1234;
  double grad_clip = 1.0;  // 0: no clipping (the norm is still reported)
  std::string output_dir;
  std::string resume = "auto";  // auto | true | false
  bool overwrite = false;
};

// Reads trainer.*, output_dir, resume and overwrite; checks them.
TrainerOptions read_trainer_options(const Config& cfg);

// Prepares output_dir per resume/overwrite (rank 0), writes the resolved config beside the run's
// outputs, trains, and exports OUTPUT_DIR/final with the tokenizer files of `tokenizer_dir`.
void train(const Config& cfg, const TrainerOptions& opt, Transformer& model, Algorithm& algo,
           dist::Dist& dist, const std::string& tokenizer_dir);

}  // namespace aligner
