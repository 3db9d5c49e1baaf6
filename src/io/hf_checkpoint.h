// Hugging Face model folders: config.json + safetensors weights (+ tokenizer files).
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>

#include "model/transformer.h"

namespace aligner {

// Loads config.json and every weight, checking names and shapes: a missing tensor, a shape that
// does not match the config, or a tensor the model does not know is an error naming the folder
// and tensor. dtype: the compute dtype (default: the dtype in config.json).
Transformer load_transformer(const std::string& dir, at::Device device,
                             std::optional<at::ScalarType> dtype = std::nullopt);

// Writes config.json and the weights (sharded above max_shard_bytes, if > 0) in `dtype` (default:
// the model's), into "<dir>.tmp" first and then renamed over `dir`, so that a crash leaves either
// the old folder or the new one. Tokenizer files are copied from `tokenizer_from` when given.
void save_transformer(const Transformer& m, const std::string& dir,
                      std::optional<at::ScalarType> dtype = std::nullopt, int64_t max_shard_bytes = 0,
                      const std::string& tokenizer_from = "");

// "float32" | "bfloat16" | "float16" -> dtype; anything else is an error naming `what`.
at::ScalarType parse_dtype_name(const std::string& name, const std::string& what);
std::string dtype_name(at::ScalarType t);

}  // namespace aligner
