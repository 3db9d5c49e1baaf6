// Hugging Face model folders: config.json + safetensors weights (+ tokenizer files).
#pragma once
#include <ATen/ATen.h>

#include <filesystem>
#include <functional>
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

// What save_transformer may do with something already at its folder's path.
enum class Replace {
  // Replace nothing but an empty folder or a model folder aligner wrote: one that holds its marker
  // file (.written-by-aligner) and no file that save_transformer does not write (config.json,
  // weights, tokenizer files). Anything else is an error that names it.
  ours,
  // Replace whatever is there: a person asked for it (--overwrite).
  anything,
};

// Writes config.json, the weights (sharded above max_shard_bytes, if > 0) in `dtype` (default: the
// model's) and the marker file into a new folder of a unique hidden name beside `dir`, then moves
// it to `dir` (what was there is moved aside to another such name, then deleted), so that a
// failure leaves the old folder in place and nothing else behind. Tokenizer files are copied from
// `tokenizer_from` when given; a `dir` that holds `tokenizer_from` (other than `dir` itself) is an
// error even with Replace::anything. `dir` may end in "/"; a symlink is followed.
void save_transformer(const Transformer& m, const std::string& dir,
                      std::optional<at::ScalarType> dtype = std::nullopt, int64_t max_shard_bytes = 0,
                      const std::string& tokenizer_from = "", Replace replace = Replace::ours);

// Writes `text` to `path`; a failed write is an error naming the file.
void write_text(const std::filesystem::path& path, const std::string& text);
// The same, written to "<path>.tmp" and renamed, so that a crash never leaves a partial file under
// `path` (no fsync: for files that are cheap to make again, such as images and data sets).
void write_text_atomically(const std::string& path, const std::string& text);

// How save_transformer writes its folder, for other folders of model files (PEFT adapters, diffusion
// models):
// `write(tmp)` fills a new folder, which gets the marker file and the tokenizer files and then
// replaces `dir`, with save_transformer's checks and guarantees. Files other than a model's or an
// adapter's make a folder one that only Replace::anything replaces.
void save_folder(const std::string& dir, Replace replace, const std::string& tokenizer_from,
                 const std::function<void(const std::string& tmp)>& write);

// The error save_transformer(m, dir, ..., tokenizer_from = source, replace) would give for what is
// at `dir` now, so that a command can refuse before it loads or builds a model.
void check_model_folder_target(const std::string& dir, Replace replace, const std::string& source = "");

// "float32" | "bfloat16" | "float16" -> dtype; anything else is an error naming `what`.
at::ScalarType parse_dtype_name(const std::string& name, const std::string& what);
// parse_dtype_name for a model that computes on `device`: float16 on the CPU is an error naming
// `what`, since libtorch's CPU kernels lack it (matmuls fail deep inside a forward pass).
at::ScalarType parse_compute_dtype(const std::string& name, at::Device device, const std::string& what);
std::string dtype_name(at::ScalarType t);

// "auto" (CUDA when there is a GPU, else the CPU) | "cpu" | "cuda" -> a device, CUDA without an
// index; anything else, or cuda where there is none, is an error naming `what`.
at::Device parse_device_name(const std::string& name, const std::string& what);

}  // namespace aligner
