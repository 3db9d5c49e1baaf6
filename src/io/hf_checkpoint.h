// Hugging Face model folders: config.json + safetensors weights (+ tokenizer files).
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

#include "model/transformer.h"

namespace aligner {

// Loads config.json and every weight, checking names and shapes: a missing tensor, a shape that
// does not match the config, or a tensor the model does not know is an error naming the folder
// and tensor. dtype: the compute dtype (default: the dtype in config.json).
Transformer load_transformer(const std::string& dir, at::Device device,
                             std::optional<at::ScalarType> dtype = std::nullopt);

// A reward model (a sequence classifier with one output per label) from `dir`. A classifier folder
// is loaded as it is, its outputs renamed to `labels` (their number must match). A causal LM
// folder gets a new score head, normal with std 1/sqrt(hidden + 1) drawn with `seed`, and its lm_head is
// dropped. pad_token_id is set where config.json has none (model/config.h
// sequence_classifier_config says why).
Transformer load_reward_model(const std::string& dir, at::Device device, std::optional<at::ScalarType> dtype,
                              const std::vector<std::string>& labels, int64_t pad_token_id, uint64_t seed);

// Writes config.json and the weights (sharded above max_shard_bytes, if > 0) in `dtype` (default:
// the model's), into "<dir>.tmp" first and then renamed over `dir`, so that a crash leaves either
// the old folder or the new one. Tokenizer files are copied from `tokenizer_from` when given.
void save_transformer(const Transformer& m, const std::string& dir,
                      std::optional<at::ScalarType> dtype = std::nullopt, int64_t max_shard_bytes = 0,
                      const std::string& tokenizer_from = "");

// "float32" | "bfloat16" | "float16" -> dtype; anything else is an error naming `what`.
at::ScalarType parse_dtype_name(const std::string& name, const std::string& what);
std::string dtype_name(at::ScalarType t);

// "auto" (CUDA when there is a GPU, else the CPU) | "cpu" | "cuda" -> a device, CUDA without an
// index; anything else, or cuda where there is none, is an error naming `what`.
at::Device parse_device_name(const std::string& name, const std::string& what);

}  // namespace aligner
