// What every training command does first: join the data-parallel group that the launcher
// describes, choose the device, and quiet the other ranks' logs.
#pragma once
#include "core/config.h"
#include "dist/process_group.h"
#include "model/lora.h"
#include "model/transformer.h"
#include "text/tokenizer.h"
#include "train/trainer.h"

namespace aligner {

struct RunContext {
  dist::Dist dist;
  at::Device device{at::kCPU};
};

// model.device: auto (CUDA when present) | cpu | cuda; each rank takes GPU LOCAL_RANK. With
// trainer.tensor_parallel N, the ranks form groups of N that split each model (the process's tensor
// parallel group, model/tensor_parallel.h), and `dist` is the data-parallel group across them.
// With trainer.deterministic: true, GPU kernels are chosen for run-to-run equality
// (use_deterministic_kernels).
RunContext init_run(const Config& cfg);

// cuDNN's deterministic algorithms (its convolutions' backward passes otherwise add in varying
// order), deterministic attention backward passes and a fixed cuBLAS workspace: a resumed GPU run
// then repeats the uninterrupted one bit for bit, at some cost in speed. CPU kernels already are.
void use_deterministic_kernels();

// The process's tensor-parallel group of `tensor_parallel` consecutive ranks of `world`, set as the
// process's; returns the data-parallel group across the groups (`world` itself for 1). `key` names the
// setting in errors.
dist::Dist split_tensor_parallel(dist::Dist world, int64_t tensor_parallel, const std::string& key);

// An inference command (generate, perplexity, rm-score) started by aligner launch: its ranks split the
// model (model.tensor_parallel, which must be the number of ranks) and `device` becomes this rank's
// GPU. Returns whether this rank writes the results (one process: true).
bool init_inference_ranks(const Config& cfg, at::Device& device);

// A causal LM folder that training starts from, and its tokenizer: a sequence classifier, or a
// tokenizer with more tokens than the model's vocabulary, is an error naming `key` (the config key
// that gave `dir`).
struct Policy {
  Transformer model;
  std::unique_ptr<Tokenizer> tok;
};
Policy load_policy(const std::string& dir, const std::string& key, at::Device device, at::ScalarType dtype);

// lora.* checked (errors name the key): rank, alpha, dropout, target_modules (all-linear for every
// projection), init. Keys set while lora.rank is 0 and lora.from unset are an error: LoRA is off.
LoraConfig read_lora_config(const Config& cfg);
// lora.init: default (PEFT's Kaiming-uniform A) or gaussian (true); anything else names the key.
bool read_lora_gaussian_init(const Config& cfg);

// How many layers recompute their activations in the backward pass (ForwardInput::checkpointed_layers):
// none without model.activation_checkpointing, else model.activation_checkpointing_layers (null: all).
int64_t checkpointed_layers(const Config& cfg);

// The module that trains `model` (loaded from model_dir): every weight, or with lora.rank > 0 or
// lora.from the adapters, which this adds to the model (new ones seeded with trainer.seed, or
// lora.from's), plus a sequence classifier's score head. Add them before anything reads the model
// (a reference, a generation session): those then see the adapters.
TrainableModule trainable_model(Transformer& model, const Config& cfg, OptimizerSettings optim,
                                const std::string& model_dir, std::string name = "model");
// The module that trains the adapters already added to `model` (and a classifier's score head).
TrainableModule adapter_module(Transformer& model, const LoraConfig& lora, OptimizerSettings optim,
                               const std::string& model_dir, std::string name, bool merge_on_save);

}  // namespace aligner
