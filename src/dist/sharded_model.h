// ZeRO stage 3 (trainer.sharding=full) for one model: each rank keeps 1 / world of every unit's
// weights (a unit: one transformer layer; the final norm and heads; the embeddings, or with tied
// embeddings those and the heads together), and a unit's full weights exist only while it runs. The forward
// pass gathers a layer just before it (the next one's gather already under way) and frees it after; the
// backward pass gathers it again before its gradients flow into it, and once all of its weights have their
// gradients, reduce- scatters them into this rank's shard of the unit's gradient and frees both the gathered
// weights and the full gradients. The optimizer then updates the shards alone.
//
// The parameters stay the model's own tensors (their names, shapes and autograd identity); what
// changes is their storage, one per unit, which holds the gathered values or nothing.
#pragma once
#include <ATen/ATen.h>

#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "dist/process_group.h"
#include "model/transformer.h"

namespace torch::autograd {
struct Node;
}

namespace aligner::dist {

class ShardedModel : public LayerHooks {
 public:
  // Shards every weight of `m` and its adapters, in units of one layer (or the head, or the
  // embeddings), one dtype, trained or frozen; rank 0's values are broadcast first. Installs itself
  // as m.hooks.
  static std::shared_ptr<ShardedModel> shard(Dist& dist, Transformer& m);
  ~ShardedModel() override;

  void before_forward() override;
  void after_embedding() override;
  at::Tensor before_layer(int64_t layer, const at::Tensor& in) override;
  at::Tensor after_layer(int64_t layer, const at::Tensor& out) override;
  void before_head() override;

  // This rank's part of the weights: flat views into its shards, one per parameter it overlaps,
  // each with the parameter's name, its offset into the flattened parameter, and the parameter.
  struct Piece {
    std::string name;
    at::Tensor values;
    int64_t offset = 0;
    at::Tensor param;  // its storage empty outside use: for its name and shape
  };
  const std::vector<Piece>& pieces() const { return pieces_; }
  // After the last backward of a step: the summed gradients of the pieces (flat, as pieces()),
  // over the micro-batches and ranks. A unit whose weights got no gradient counts zeros.
  std::vector<at::Tensor> sync_gradients();
  // After the optimizer step: drops the summed gradients and frees every gathered unit.
  void end_step();
  // Gathers the whole model and keeps it (generation), until release().
  void hold();
  void release();
  // Gathers the whole model for good and takes the hooks off it: its weights are its own again.
  void unshard();
  // The whole model in host memory on rank `root` (nullopt elsewhere), gathered one unit at a time,
  // for saving. Every rank must call it.
  std::optional<Transformer> host_copy(int root = 0);
  // Bytes this rank keeps, and the largest unit gathered at once.
  int64_t shard_bytes() const;
  int64_t largest_unit_bytes() const;

  // Internal: the backward pass's entry points.
  void gather(size_t group);
  void release_group(size_t group);
  void on_gradient(size_t param);

 private:
  struct Unit {
    std::vector<size_t> params;  // indices into params_
    int64_t numel = 0, chunk = 0;
    at::Storage full;       // the gathered weights, or no bytes
    at::Tensor shard;       // [chunk]: this rank's part, persistent
    at::Tensor grad_flat;   // [chunk x world] while gradients arrive
    at::Tensor grad_shard;  // [chunk]: summed over micro-batches and ranks
    size_t trainable = 0;   // its parameters train (all of them, or none)
    size_t received = 0;    // parameters whose gradient has arrived in this backward
    bool gathered = false;  // the storage holds bytes (the values once `pending` is waited on)
    bool waiting = false;   // `pending` not yet waited on
    Work pending;
  };

  ShardedModel(Dist& dist, Transformer& m);
  void start_gather(size_t unit);
  void finish_gather(size_t unit);
  void release_unit(size_t unit);
  // The same for every unit of a group.
  void start_group(size_t group);
  void finish_group(size_t group);
  void reduce(size_t unit);
  void finish_reduction();

  Dist& dist_;
  Transformer& model_;
  std::vector<std::string> names_;
  std::vector<at::Tensor> params_;
  std::vector<size_t> unit_of_;     // per parameter
  std::vector<int64_t> start_of_;   // per parameter: its first element in its unit
  std::vector<bool> got_gradient_;  // per parameter: copied into its unit's grad_flat this backward
  std::vector<Unit> units_;
  // Per group (layers 0 .. L-1, the head, the embeddings) its units.
  std::vector<std::vector<size_t>> groups_;
  std::vector<bool> group_trains_;  // per group: one of its units trains
  size_t head_ = 0, embed_ = 0;     // their groups; embed_ == head_ when the embeddings are tied
  std::vector<Piece> pieces_;
  std::vector<std::pair<size_t, int64_t>> piece_at_;  // per piece: unit, offset into its shard
  // Reduce-scatters under way, oldest first: each is waited on (and added into its unit's summed
  // gradient) only once the next has started, so that it overlaps the backward pass.
  struct Reduction {
    size_t unit;
    at::Tensor flat, mine;
    Work work;
  };
  std::deque<Reduction> reducing_;
  std::vector<std::shared_ptr<torch::autograd::Node>> accumulators_;
  std::vector<uintptr_t> hook_keys_;
  bool held_ = false;
};

}  // namespace aligner::dist
