// Data-parallel gradient synchronisation, as torch's DistributedDataParallel does it: gradients
// travel in buckets of about 25 MB, filled in reverse parameter order (roughly the order backward
// produces them), one asynchronous all-reduce per bucket so that the transfer of one bucket
// overlaps the packing of the next, or, in the last micro-batch's backward, the rest of the
// backward itself.
//
// Per optimizer step:
//   for each micro-batch but the last: forward, backward (gradients accumulate locally)
//   ddp.begin_final_backward();          // optional: lets the last backward start the transfers
//   last micro-batch: forward, backward
//   ddp.sync_gradients();                // every rank now holds the same reduced gradients
//   optimizer step, zero_grad
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "dist/process_group.h"

namespace aligner::dist {

enum class GradReduction {
  kMean,  // divide by the world size, as torch DDP
  kSum,   // for a loss already normalised by a global count (tokens over all ranks)
};

// ZeRO's stages 1 and 2: each rank updates (and keeps optimizer state for) one shard of the
// parameters, 1 / world of every bucket, and all-gathers the updated values. kOptimizer reduces the
// gradients whole (all-reduce); kGradients reduce-scatters them, so that a rank keeps only its
// shard's reduced gradients. Stage 3 (kFull, the parameters sharded too) is dist/sharded_model.h.
enum class Sharding { kNone, kOptimizer, kGradients, kFull };

struct DataParallelOptions {
  int64_t bucket_bytes = 25 * 1024 * 1024;  // torch DDP's bucket_cap_mb
  GradReduction reduction = GradReduction::kMean;
  Sharding sharding = Sharding::kNone;
};

// The part of a parameter that this rank updates under sharding: elements [offset, offset + numel)
// of its flattened values. `param` indexes the constructor's params.
struct ShardPiece {
  size_t param = 0;
  int64_t offset = 0, numel = 0;
};

class DataParallel {
 public:
  // `params` are the model's trainable leaf tensors, the same list in the same order on every
  // rank, on dist.device(); ones that do not require grad are left alone, and a tensor listed twice
  // (tied weights) counts once. `dist` must outlive this object, which must not outlive `params`
  // either: it keeps one reduction buffer per bucket (as much memory as the gradients) and a
  // gradient hook on each parameter.
  DataParallel(Dist& dist, const std::vector<at::Tensor>& params, DataParallelOptions opts = {});
  ~DataParallel();
  DataParallel(const DataParallel&) = delete;
  DataParallel& operator=(const DataParallel&) = delete;

  // Copies rank `root`'s parameter values to every rank, so that all start identical.
  void broadcast_parameters(int root = 0);
  // Announces that the next backward is the last before sync_gradients(): each parameter's hook
  // then packs its final gradient (accumulated plus incoming), and a bucket's all-reduce starts as
  // soon as all its parameters are in, buckets strictly in order so that every rank issues the
  // same sequence of collectives. Without this call sync_gradients() does all the work.
  void begin_final_backward();
  // Reduces every parameter's gradient over all ranks (mean or sum) and writes it back to .grad.
  // A parameter without a gradient counts as zeros and gets one, so all ranks agree on which
  // parameters the optimizer sees. With Sharding::kGradients only this rank's pieces are reduced,
  // into shard_gradients(), and every .grad is dropped.
  void sync_gradients();

  // Sharded: this rank's pieces, in the order of the constructor's params, every bucket's
  // 1 / world chunk (a parameter of a bucket may be split between ranks; it is in one bucket).
  const std::vector<ShardPiece>& shard_pieces() const { return pieces_; }
  // After sync_gradients, the reduced gradient of each piece (flat, as shard_pieces()).
  std::vector<at::Tensor> shard_gradients() const;
  // After the optimizer has written this rank's pieces into the parameters: every rank's pieces to
  // every rank, so that all hold the whole updated parameters.
  void gather_parameters();

  // Indices into the constructor's `params`, per bucket in launch order (for tests and logs).
  std::vector<std::vector<size_t>> bucket_layout() const;

 private:
  struct Bucket {
    std::vector<size_t> members;  // indices into params_
    std::vector<int64_t> offsets;
    int64_t numel = 0;
    int64_t chunk = 0;  // sharded: numel rounded up to world chunks of this size
    at::Tensor flat;    // (sharded: chunk x world elements, the tail zero)
    at::Tensor shard;   // kGradients: this rank's reduced chunk
    size_t ready = 0;
    Work work;
  };

  at::Tensor slot(size_t param) const;
  void on_gradient(size_t param, const at::Tensor& grad);
  void launch_ready_buckets();

  Dist& dist_;
  DataParallelOptions opts_;
  std::vector<at::Tensor> params_;
  std::vector<size_t> original_index_;  // params_[i] is the constructor's params[original_index_[i]]
  std::vector<Bucket> buckets_;
  std::vector<size_t> bucket_of_, position_of_;  // per parameter
  std::vector<bool> received_;                   // final gradient packed during this backward
  std::vector<unsigned> hooks_;
  bool final_backward_ = false;
  size_t next_launch_ = 0;
  // This rank's pieces (as pieces_, in the same order), where they lie: params_[param] elements
  // [offset, offset + numel) at in_bucket in buckets_[bucket].flat.
  struct Held {
    size_t param, bucket;
    int64_t in_bucket, offset, numel;
  };
  std::vector<Held> held_;
  std::vector<ShardPiece> pieces_;
};

}  // namespace aligner::dist
