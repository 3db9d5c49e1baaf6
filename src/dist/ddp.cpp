#include "dist/ddp.h"

#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <map>
#include <unordered_set>

#include "core/error.h"

namespace aligner::dist {

DataParallel::DataParallel(Dist& dist, const std::vector<at::Tensor>& params, DataParallelOptions opts)
    : dist_(dist), opts_(opts) {
  if (opts_.bucket_bytes <= 0) {
    fail("data parallel: bucket_bytes must be positive, got {}", opts_.bucket_bytes);
  }
  std::unordered_set<const void*> seen;
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& p = params[i];
    if (!p.defined()) fail("data parallel: parameter {} is undefined", i);
    if (!p.requires_grad()) continue;
    if (!seen.insert(p.unsafeGetTensorImpl()).second) continue;
    if (!p.is_leaf()) fail("data parallel: parameter {} is not a leaf tensor", i);
    if (p.device() != dist_.device()) {
      fail("data parallel: parameter {} is on {}, the process group on {}", i, p.device().str(),
           dist_.device().str());
    }
    params_.push_back(p);
    original_index_.push_back(i);
  }

  // Reverse order, one open bucket per dtype (a bucket is one flat buffer of one dtype).
  std::map<at::ScalarType, size_t> open;
  bucket_of_.resize(params_.size());
  position_of_.resize(params_.size());
  for (size_t i = params_.size(); i-- > 0;) {
    const auto dtype = params_[i].scalar_type();
    auto it = open.find(dtype);
    if (it == open.end()) {
      it = open.emplace(dtype, buckets_.size()).first;
      buckets_.emplace_back();
    }
    Bucket& b = buckets_[it->second];
    bucket_of_[i] = it->second;
    position_of_[i] = b.members.size();
    b.members.push_back(i);
    b.offsets.push_back(b.numel);
    b.numel += params_[i].numel();
    if (b.numel * params_[i].element_size() >= opts_.bucket_bytes) open.erase(it);
  }

  // A world of one keeps the layout (for bucket_layout) but needs no buffers and no hooks.
  const int64_t world = dist_.world_size(), rank = dist_.rank();
  if (world == 1) return;
  const bool sharded = opts_.sharding != Sharding::kNone;
  for (size_t k = 0; k < buckets_.size(); ++k) {
    Bucket& b = buckets_[k];
    const auto options = params_[b.members.front()].options().requires_grad(false);
    if (!sharded) {
      b.flat = at::empty({b.numel}, options);
      continue;
    }
    b.chunk = (b.numel + world - 1) / world;
    b.flat = at::zeros({b.chunk * world}, options);
    if (opts_.sharding == Sharding::kGradients) b.shard = at::empty({b.chunk}, options);
    // This rank's chunk, cut along the parameters it overlaps.
    const int64_t begin = rank * b.chunk, end = std::min(begin + b.chunk, b.numel);
    for (size_t j = 0; j < b.members.size(); ++j) {
      const int64_t from = std::max(begin, b.offsets[j]);
      const int64_t to = std::min(end, b.offsets[j] + params_[b.members[j]].numel());
      if (from < to) held_.push_back({b.members[j], k, from, from - b.offsets[j], to - from});
    }
  }
  std::sort(held_.begin(), held_.end(), [](const Held& x, const Held& y) { return x.param < y.param; });
  for (const auto& h : held_) pieces_.push_back({original_index_[h.param], h.offset, h.numel});
  received_.assign(params_.size(), false);
  for (size_t i = 0; i < params_.size(); ++i) {
    hooks_.push_back(params_[i].register_hook([this, i](const at::Tensor& grad) { on_gradient(i, grad); }));
  }
}

DataParallel::~DataParallel() {
  for (size_t i = 0; i < hooks_.size(); ++i) params_[i].remove_hook(hooks_[i]);
}

std::vector<std::vector<size_t>> DataParallel::bucket_layout() const {
  std::vector<std::vector<size_t>> out;
  for (const auto& b : buckets_) {
    out.emplace_back();
    for (size_t i : b.members) out.back().push_back(original_index_[i]);
  }
  return out;
}

at::Tensor DataParallel::slot(size_t param) const {
  const Bucket& b = buckets_[bucket_of_[param]];
  const auto& p = params_[param];
  return b.flat.narrow(0, b.offsets[position_of_[param]], p.numel()).view(p.sizes());
}

void DataParallel::broadcast_parameters(int root) {
  if (dist_.world_size() == 1) return;
  at::NoGradGuard no_grad;
  for (auto& b : buckets_) {
    for (size_t i : b.members) slot(i).copy_(params_[i]);
    dist_.broadcast_async(b.flat, root).wait();
    for (size_t i : b.members) params_[i].copy_(slot(i));
  }
}

void DataParallel::begin_final_backward() {
  if (dist_.world_size() == 1) return;
  final_backward_ = true;
}

// Runs as a hook on the leaf, before autograd adds `grad` into .grad: the packed value is therefore
// the sum of both, which is what .grad will hold once this backward is done.
void DataParallel::on_gradient(size_t param, const at::Tensor& grad) {
  if (!final_backward_) return;
  if (received_[param]) {
    fail(
        "data parallel: parameter {} got a second gradient after begin_final_backward() (call "
        "sync_gradients() after each final backward)",
        original_index_[param]);
  }
  received_[param] = true;
  at::NoGradGuard no_grad;
  at::Tensor out = slot(param);
  const at::Tensor& accumulated = params_[param].grad();
  if (accumulated.defined()) {
    at::add_out(out, accumulated, grad);
  } else {
    out.copy_(grad);
  }
  ++buckets_[bucket_of_[param]].ready;
  launch_ready_buckets();
}

void DataParallel::launch_ready_buckets() {
  while (next_launch_ < buckets_.size() &&
         buckets_[next_launch_].ready == buckets_[next_launch_].members.size()) {
    Bucket& b = buckets_[next_launch_++];
    b.work = opts_.sharding == Sharding::kGradients ? dist_.reduce_scatter_sum_async(b.flat, b.shard)
                                                    : dist_.all_reduce_sum_async(b.flat);
  }
}

void DataParallel::sync_gradients() {
  if (dist_.world_size() == 1) return;
  at::NoGradGuard no_grad;
  // Whatever the hooks did not pack and launch: all of it, without begin_final_backward().
  for (size_t k = next_launch_; k < buckets_.size(); ++k) {
    Bucket& b = buckets_[k];
    for (size_t i : b.members) {
      if (received_[i]) continue;
      const at::Tensor& g = params_[i].grad();
      if (g.defined()) {
        slot(i).copy_(g);
      } else {
        slot(i).zero_();
      }
    }
    b.ready = b.members.size();
  }
  launch_ready_buckets();

  for (auto& b : buckets_) {
    b.work.wait();
    b.work = Work();
    b.ready = 0;
    if (opts_.sharding == Sharding::kGradients) {
      if (opts_.reduction == GradReduction::kMean) b.shard.div_(dist_.world_size());
      for (size_t i : b.members) params_[i].mutable_grad() = at::Tensor();
      continue;
    }
    if (opts_.reduction == GradReduction::kMean) b.flat.div_(dist_.world_size());
    for (size_t i : b.members) {
      at::Tensor& g = params_[i].mutable_grad();
      if (g.defined()) {
        g.copy_(slot(i));
      } else {
        g = slot(i).clone();
      }
    }
  }
  received_.assign(params_.size(), false);
  final_backward_ = false;
  next_launch_ = 0;
}

std::vector<at::Tensor> DataParallel::shard_gradients() const {
  std::vector<at::Tensor> out;
  for (const auto& h : held_) {
    const Bucket& b = buckets_[h.bucket];
    if (opts_.sharding == Sharding::kGradients) {
      out.push_back(b.shard.narrow(0, h.in_bucket - dist_.rank() * b.chunk, h.numel));
      continue;
    }
    const at::Tensor& g = params_[h.param].grad();
    if (!g.defined()) fail("data parallel: shard_gradients() before sync_gradients()");
    out.push_back(g.view(-1).narrow(0, h.offset, h.numel));
  }
  return out;
}

void DataParallel::gather_parameters() {
  if (opts_.sharding == Sharding::kNone) fail("data parallel: gather_parameters() needs sharding");
  at::NoGradGuard no_grad;
  for (const auto& h : held_)
    buckets_[h.bucket]
        .flat.narrow(0, h.in_bucket, h.numel)
        .copy_(params_[h.param].view(-1).narrow(0, h.offset, h.numel));
  // All launched before the first wait, so that NCCL overlaps the buckets' transfers.
  std::vector<Work> works;
  for (auto& b : buckets_) works.push_back(dist_.all_gather_async(b.flat));
  for (size_t k = 0; k < buckets_.size(); ++k) {
    works[k].wait();
    for (size_t i : buckets_[k].members) params_[i].copy_(slot(i));
  }
}

}  // namespace aligner::dist
