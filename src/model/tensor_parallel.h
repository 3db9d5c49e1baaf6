// Tensor parallelism as Megatron-LM splits a transformer: each rank of a tensor-parallel group holds
// a slice of every layer. q, k, v, gate and up are column-parallel (this rank's heads and
// intermediate columns), o and down row-parallel (their inputs' matching slice; partial outputs
// summed over the group), the embedding and the LM head vocabulary-parallel (a range of rows). Norms,
// the score head and the row-parallel biases are replicated. With fewer key/value heads than ranks,
// each rank holds the key/value head its query heads read (replicated across the ranks that share it).
//
// Two autograd operators carry the group through a layer: tp_copy (identity forward, gradients summed
// over the group backward) where replicated activations enter the split region, and tp_sum (partial
// results summed forward, identity backward) where they leave it. Replicated weights used inside the
// split region (Qwen3's per-head norms, a shared key/value head) go through tp_copy too, so that every
// rank's replicated gradients are whole and equal. Every rank computes the same loss.
//
// A LoRA adapter (model/lora.h) splits as its projection: column-parallel, B holds the weight's rows and
// A is replicated; row-parallel, A holds the weight's columns and B is replicated. The replicated factor
// goes through tp_copy (tp_copy_shared for a shared key/value head's B), as its gradient is each rank's
// part of the whole one.
#pragma once
#include <ATen/ATen.h>

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "dist/process_group.h"
#include "model/config.h"

namespace aligner {

struct Transformer;
struct Linear;

// This process's tensor-parallel group.
struct TensorParallel {
  std::shared_ptr<dist::Dist> group;
  int rank() const { return group ? group->rank() : 0; }
  int size() const { return group ? group->world_size() : 1; }
};

// The tensor-parallel group that every model this process loads is split over (set by init_run for
// trainer.tensor_parallel > 1, and by the inference commands' --tensor-parallel); null: none.
const TensorParallel* process_tensor_parallel();
void set_process_tensor_parallel(std::optional<TensorParallel> tp);

// How one model lies on the ranks of a group.
struct TensorSplit {
  TensorParallel tp;
  ModelConfig full;  // the whole model's config; the Transformer's cfg has this rank's head and column counts
  int64_t vocab_start = 0, vocab_rows = 0;  // this rank's rows of the embedding and LM head
  int64_t vocab_chunk = 0;                  // rows per rank, the last rank's possibly fewer
  // Fewer key/value heads than ranks: this rank holds head kv_slot of kv_slots, shared with the ranks
  // whose query heads read it. kv_slots 0: the key/value heads are split like the query heads.
  int64_t kv_slot = 0, kv_slots = 0;
  int rank() const { return tp.rank(); }
  int size() const { return tp.size(); }
};

// The split of a model of config `full` over `tp`; a config that does not divide (heads,
// intermediate size, key/value heads) is an error naming the numbers. Mixtral's experts are each split
// as a gated MLP (their intermediate columns), the router replicated.
std::shared_ptr<const TensorSplit> make_tensor_split(const ModelConfig& full, const TensorParallel& tp);
// The config of this rank's slice: its query and key/value heads and intermediate columns (the vocabulary
// size stays the model's).
ModelConfig local_config(const TensorSplit& s);

// Which part of the whole model's tensor `name` (a Hugging Face name, or an adapter's as
// adapter_parameters names it) rank `rank` holds: rows [start, start + length) of dimension `dim` of
// `full_length`; dim -1: all of it (replicated).
struct SliceSpec {
  int64_t dim = -1, start = 0, length = 0, full_length = 0;
};
SliceSpec tensor_slice(const TensorSplit& s, const std::string& name, int rank);
inline SliceSpec tensor_slice(const TensorSplit& s, const std::string& name) {
  return tensor_slice(s, name, s.rank());
}
at::Tensor take_slice(const at::Tensor& full, const SliceSpec& spec);
// The whole tensor's sizes, of a slice of `local` sizes.
std::vector<int64_t> whole_sizes(at::IntArrayRef local, const SliceSpec& spec);

// The autograd operators above; without a group (one rank) both are the identity.
at::Tensor tp_copy(const at::Tensor& x, const TensorSplit& s);
at::Tensor tp_sum(const at::Tensor& x, const TensorSplit& s);
// A replicated key/value weight: identity forward, gradients summed over the ranks that share it.
at::Tensor tp_copy_shared(const at::Tensor& x, const TensorSplit& s);
// Every rank's last dimension (vocabulary rows) side by side: [..., vocab]; the backward pass takes
// this rank's columns of the gradient.
at::Tensor tp_gather_vocab(const at::Tensor& x, const TensorSplit& s);

// Embedding rows of `ids` from a vocabulary-parallel table.
at::Tensor tensor_parallel_embedding(const TensorSplit& s, const at::Tensor& table, const at::Tensor& ids);
// token_logprobs over a vocabulary-parallel LM head: the log-softmax's max, normaliser and target logit
// summed over the group, the full logits never gathered. [rows, H] hidden, [rows] targets (-1: none).
at::Tensor tensor_parallel_logprobs(const Transformer& m, const at::Tensor& hidden, const at::Tensor& targets,
                                    int64_t chunk_rows);

// The whole model, in host memory on every rank of the group, gathered one tensor at a time (for
// saving). Every rank of the group must call it.
Transformer gather_transformer(const Transformer& m);
// Tensors of this rank named as the model's parameters (or with a prefix before the name, as an
// optimizer's "exp_avg.<name>"), made whole in host memory on every rank; `name_of` gives the
// parameter's name of a key.
std::vector<std::pair<std::string, at::Tensor>> gather_named(
    const TensorSplit& s, const std::vector<std::pair<std::string, at::Tensor>>& local,
    const std::function<std::string(const std::string&)>& name_of);
// The inverse: this rank's slices of whole tensors.
std::vector<std::pair<std::string, at::Tensor>> slice_named(
    const TensorSplit& s, const std::vector<std::pair<std::string, at::Tensor>>& whole,
    const std::function<std::string(const std::string&)>& name_of);

}  // namespace aligner
