// Distillation from stored teacher logits: `aligner kd-prepare` runs the teacher once over SFT data
// and stores its top-k logits at every loss token, so that `aligner sft kd.logits=FILE` distils
// without running the teacher beside the student at every step of every run.
//
// The file is safetensors, one row per loss token (a token the model is trained to predict), each
// example's rows in the order of its tokens:
//   offsets  [E + 1] int64  example (record) e of the data file has rows offsets[e] .. offsets[e+1];
//                           none when it was dropped for length or skipped as bad
//   ids      [N, k]  int32  the token ids of the teacher's k largest logits, largest first
//   targets  [N]     int32  the token each row predicts: sft checks that it tokenizes the same
//   values   [N, k]         those logits in the teacher's dtype (model.dtype: float32, bfloat16 or
//                           float16), so that they are exactly what the live teacher would give
// Its metadata names the teacher, k, the vocabulary, the data file (path, records, bytes, FNV-1a
// hash of its content) and the data.* settings that decide the tokens; sft refuses a file whose
// data, settings or vocabulary differ from its own.
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <utility>

#include "core/config.h"
#include "data/sft_data.h"
#include "io/safetensors.h"

namespace aligner {

// `aligner kd-prepare`, configured by the sft keys (configs/sft.yaml): the teacher kd.teacher on
// model.device in model.dtype, micro_batch_size examples per forward; the tokens as sft makes them
// from data.* with model.path's tokenizer (kd.teacher's when model.path is null). Writes
// data.train's logits to kd.logits and data.validation's to kd.validation_logits, by default
// default_kd_logits_path.
void run_kd_prepare(const Config& cfg);

// "<data_path>.kd-top<k>.safetensors"
std::string default_kd_logits_path(const std::string& data_path, int64_t k);

// A file that kd-prepare wrote, memory-mapped, checked against the data set it is used with.
class StoredTopK {
 public:
  // Refuses (an error naming the file and what differs) a file made from other data than `ds`
  // (`split` is the config key that names it, for messages), tokenized with other settings, for
  // another vocabulary than `vocab`, or with fewer than top_k logits per token.
  static StoredTopK open(const std::string& path, const SftDataset& ds, const std::string& split,
                         int64_t top_k, int64_t vocab);

  int64_t k() const { return stored_k_; }  // logits per token in the file

  // Example `index` (tokens `seq`, record `where`): its values (float32) and ids (int64) of the top
  // top_k logits, [n, top_k] each for its n loss tokens. Tokens that differ from those the file
  // was made from are an error.
  std::pair<at::Tensor, at::Tensor> rows(int64_t index, const Sequence& seq, const std::string& where) const;

 private:
  safetensors::File file_;
  at::Tensor offsets_, ids_, targets_, values_;
  int64_t stored_k_ = 0, top_k_ = 0;
};

}  // namespace aligner
