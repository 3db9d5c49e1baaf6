// The training loop that every algorithm shares. An algorithm supplies micro-batches and a loss;
// the trainer owns everything else: the global batch (micro batch x accumulation x ranks), loss
// normalisation over the whole global batch, data-parallel gradient sync, clipping, the optimizer
// and schedule, logging, validation, checkpoints and resume, and the final export.
#pragma once
#include <nlohmann/json.hpp>

#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/config.h"
#include "dist/ddp.h"
#include "dist/process_group.h"
#include "model/lora.h"
#include "model/transformer.h"
#include "train/optimizer.h"
#include "train/schedule.h"

namespace aligner {

// ---- The algorithm interface ----
//
// An algorithm is a loss and a data (or rollout) recipe; the trainer owns the rest. Per optimizer
// step, on every rank, the trainer calls
//   next_step(n)                 load this rank's n micro-batches (an online algorithm generates and
//                                scores its rollouts here)
//   units(i), i < n              what micro-batch i's loss is a sum over (tokens, pairs, labels)
//   loss(i),  i < n              that sum, with the graph; the trainer divides it by the units of the
//                                whole global batch (all micro-batches of all ranks) and backpropagates
//   after_optimizer_step(step)   once every module has stepped (adaptive KL, refreshing caches)
// and validate() every trainer.val_interval steps and at the end.
//
// An online algorithm makes several optimizer updates of one rollout (PPO's epochs x minibatches):
// with updates_per_step() = U, next_step loads U x n micro-batches and update u trains on
// micro-batches [u n, (u + 1) n), each loss(i) computed after the updates before it, so that a
// later minibatch sees the policy that the earlier ones moved. The schedule counts updates; a
// step, its metrics and its checkpoints cover the whole rollout.
//
// What trains is a list of TrainableModule (below): each names a subset of one model's parameters
// and its own optimizer settings. Parameters of a module's model that no module lists are frozen
// (no gradient, no optimizer state), and models in no module (a reference, a teacher) are left
// alone.
//
// Collectives: an algorithm that needs them (advantage whitening, counts over all ranks) keeps the
// run's dist::Dist (init_run) and may call them in any of the methods above, provided every rank
// calls the same ones in the same order, including a rank whose next_step finds no data: ranks
// agree on the end of the data after next_step, and all stop at the first step where any rank has
// none.
//
// Data parallel sends each parameter's gradient as soon as the last micro-batch's backward has it,
// so with model.activation_checkpointing (whose recomputed layers accumulate their gradients on
// their own) loss(i) must run each model once per micro-batch, batching its sequences.
//
// tests/test_trainer.cpp has an algorithm with two modules (an "actor" and a "critic" with their
// own learning rates) that shows every part of this.

// A mean over the global batch: sums and counts are added over the micro-batches of every rank
// before the division, so the count decides what the metric is a mean of: loss tokens (per-token
// quantities), sequences (reward, KL, length), or 1 from one micro-batch per rank (per-step
// quantities such as timings: their mean over ranks). A metric whose count is 0 over the whole
// global batch is not reported.
struct Metric {
  std::string name;
  double sum = 0;
  double count = 0;
};

// One micro-batch's contribution, as sums over its loss units (tokens for SFT, pairs for DPO), so
// that the trainer can divide by the count over the whole global batch on every rank. Every
// micro-batch of a step, on every rank, reports the same metric names in the same order (a metric
// with nothing to add reports count 0).
struct LossSums {
  at::Tensor loss;     // scalar; carries the graph when training
  double units = 0;    // what the loss is averaged over
  int64_t tokens = 0;  // tokens processed, for throughput
  std::vector<Metric> metrics;
};

// This rank's share of the validation set, and the names its micro-batches' metrics carry, in their
// order. The names are the same on every rank, also on one whose share is empty, because the
// trainer sums the metrics over ranks position by position and every rank must send as many.
// An image the validation made (a text-to-image model's samples): the main rank's are written to
// OUTPUT_DIR/images/step_N/<name>.png and to TensorBoard under validation/<name>.
struct ValidationImage {
  std::string name;  // letters, digits, '_', '-', '.'
  std::string png;   // an encoded PNG
  int64_t height = 0, width = 0, channels = 3;
};

struct ValidationSums {
  std::vector<std::string> metric_names;
  std::vector<LossSums> parts;
  std::vector<ValidationImage> images;
};

class Algorithm {
 public:
  virtual ~Algorithm() = default;
  // Training examples per epoch on all ranks together (prompts, for an online algorithm), to turn
  // max_epochs into steps and to refuse a global batch larger than the data.
  virtual int64_t train_examples() const = 0;
  // Training examples that one step takes from the data, on all ranks together, and the config key
  // that sets it: the global batch, or the prompts of one rollout.
  struct StepExamples {
    int64_t count = 0;
    std::string key;
  };
  virtual StepExamples examples_per_step(int64_t global_batch_size) const {
    return {global_batch_size, "trainer.global_batch_size"};
  }
  // Optimizer updates per step (see above).
  virtual int64_t updates_per_step() const { return 1; }
  // true: the optimizers' state waits in host memory while next_step runs (generation needs the
  // room for its KV cache) and comes back for the updates.
  virtual bool offload_optimizer_in_next_step() const { return false; }
  // true: next_step and validate() read the models' weights outside forward passes (generation),
  // so that a sharded model is gathered whole around them.
  virtual bool generates() const { return false; }
  // Loads this rank's next `n` micro-batches; false once its data is done (data_epochs).
  virtual bool next_step(int64_t n) = 0;
  // Loss units in micro-batch i of the loaded step (known before any forward pass).
  virtual double units(int64_t i) const = 0;
  virtual LossSums loss(int64_t i) = 0;
  // Called after the optimizer step that made `step` steps in all.
  virtual void after_optimizer_step(int64_t step) {}
  // The validation set once over (this rank's share), without gradients; no parts when none.
  virtual ValidationSums validate() = 0;
  // Where this rank's data stands, for checkpoints; load_state continues from there. Each rank
  // saves and restores its own.
  virtual nlohmann::json state() const = 0;
  virtual void load_state(const nlohmann::json& state) = 0;
  // The state() with which this rank (of this run's ranks) continues the data where the ranks of a
  // checkpoint written by another number of them had left it (`saved`: each of their state()), for
  // load_state; nullopt where that cannot be done exactly (the default).
  virtual std::optional<nlohmann::json> reshard_state(const std::vector<nlohmann::json>& saved) const {
    (void)saved;
    return std::nullopt;
  }
};

// How one module's parameters are updated: AdamW, a learning-rate schedule over the run's steps,
// and gradient clipping by the module's own global norm.
struct OptimizerSettings {
  AdamWConfig adam;
  ScheduleKind schedule = ScheduleKind::kConstant;
  double min_lr = 0;
  int64_t warmup_steps = 0;
  double grad_clip = 1.0;        // 0: no clipping (the norm is still reported)
  std::string prefix = "optim";  // where the settings came from, for errors
};

// <prefix>.lr, .betas, .eps, .weight_decay, .scheduler, .min_lr, .warmup_steps and the clipping
// norm at `grad_clip_key`, checked; errors name the key.
OptimizerSettings read_optimizer_settings(const Config& cfg, const std::string& prefix,
                                          const std::string& grad_clip_key);

// A model that is not a Transformer (the diffusion models): what the trainer needs of it. Its modules
// train on one rank or data parallel (not trainer.sharding=full, not tensor parallel), their
// checkpoints hold the trained tensors, and final/ is written by `save`.
struct OtherModel {
  std::function<NamedParams()> parameters;           // all of the model's, adapters included
  std::function<void(const std::string& dir)> save;  // the model (or its adapters) as a folder
};

struct TrainableModule {
  // Names the module's checkpoint entry, its metrics ("<name>/lr", "<name>/grad_norm" when there
  // are several modules) and its folder in final/.
  std::string name;
  Transformer* model = nullptr;  // or null, and `other` below
  // What trains: a subset of the model's parameters, by their names. A parameter may belong to one
  // module only.
  NamedParams params;
  OptimizerSettings optim;
  // Written to OUTPUT_DIR/final (one module exported) or final/<name> (several) as a Hugging Face
  // folder with the tokenizer files of tokenizer_dir.
  bool export_final = true;
  std::string tokenizer_dir;
  // rank > 0: params are adapters (model/lora.h) of the base model in tokenizer_dir's folder, and
  // final/ is a PEFT adapter folder, or with merge_on_save the model with the adapters merged.
  LoraConfig lora;
  bool merge_on_save = false;
  OtherModel other;  // when model is null
};

// Every parameter of `model` trains: what SFT, RM, DPO and KD use (module "model").
TrainableModule whole_model(Transformer& model, OptimizerSettings optim, std::string tokenizer_dir,
                            std::string name = "model");

// How many times the data is read: trainer.max_epochs, or no limit (0) when trainer.max_steps is
// set, so that max_steps is reached even when it takes more than max_epochs (as in TRL).
int64_t data_epochs(const Config& cfg);

struct TrainerOptions {
  dist::Sharding sharding = dist::Sharding::kNone;  // trainer.sharding, with several ranks
  int64_t max_steps = 0;                            // 0: as many as max_epochs take
  int64_t max_epochs = 1;
  int64_t micro_batch_size = 1;
  int64_t global_batch_size = 1;
  int64_t val_interval = 0;  // 0: validate at the end only
  int64_t save_interval = 0;
  int64_t keep_last = 2;
  // trainer.async_checkpoint: "auto" (when training on a GPU), "true" or "false": checkpoints
  // written by a thread of their own (CheckpointWriter) while training goes on.
  std::string async_checkpoint = "auto";
  int64_t log_interval = 1;
  uint64_t seed = 1234;
  std::string output_dir;
  std::string resume = "auto";  // auto | true | false | a checkpoint folder
  bool overwrite = false;
};

// Reads trainer.*, output_dir, resume and overwrite; checks them.
TrainerOptions read_trainer_options(const Config& cfg);

// Locks output_dir for the run's life and prepares it per resume/overwrite (rank 0), writes the
// resolved config beside the run's outputs, trains the modules, and exports them to
// OUTPUT_DIR/final. SIGTERM or SIGINT (Slurm's pre-emption, Ctrl-C) ends the step under way, writes
// a checkpoint and stops with an aligner::Error saying so; a second one kills at once.
void train(const Config& cfg, const TrainerOptions& opt, std::vector<TrainableModule> modules,
           Algorithm& algo, dist::Dist& dist);

}  // namespace aligner
