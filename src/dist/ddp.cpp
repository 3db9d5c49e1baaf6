#include "dist/ddp.h"

#include <ATen/core/grad_mode.h>

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
  if (dist_.world_size() == 1) return;
  for (auto& b : buckets_) {
    const auto& first = params_[b.members.front()];
    b.flat = at::empty({b.numel}, first.options().requires_grad(false));
  }
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
    b.work = dist_.all_reduce_sum_async(b.flat);
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

}  // namespace aligner::dist
