#include "dist/sharded_model.h"

#include <ATen/core/grad_mode.h>
#include <c10/core/DeviceGuard.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <map>
#include <set>
#include <tuple>

#include "core/error.h"
#include "model/lora.h"

namespace aligner::dist {
namespace {

// The layer a parameter belongs to ("model.layers.N."), or -1 for the rest.
int64_t layer_of(const std::string& name) {
  const std::string prefix = "model.layers.";
  if (name.rfind(prefix, 0) != 0) return -1;
  return std::stoll(name.substr(prefix.size(), name.find('.', prefix.size()) - prefix.size()));
}

bool starts_with(const std::string& s, const std::string& prefix) {
  return s.rfind(prefix, 0) == 0;
}

// What a layer's backward pass needs done to its group of units: gathered before it (on the
// layer's output: the layer's gradients have yet to flow in), or freed after it (on its input).
struct GroupAction : torch::CustomClassHolder {
  ShardedModel* owner = nullptr;
  size_t group = 0;
  bool gather = false;
};

// The identity whose backward does the action (gathering also starts on the layer below).
struct OnBackward : torch::autograd::Function<OnBackward> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            c10::intrusive_ptr<GroupAction> action) {
    ctx->saved_data["action"] = c10::IValue::make_capsule(action);
    return x;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto a = c10::static_intrusive_pointer_cast<GroupAction>(ctx->saved_data["action"].toCapsule());
    a->gather ? a->owner->gather(a->group) : a->owner->release_group(a->group);
    return {grads[0], at::Tensor()};
  }
};

// The layer's input or output through OnBackward.
at::Tensor on_backward(const at::Tensor& x, ShardedModel* owner, size_t group, bool gather) {
  auto action = c10::make_intrusive<GroupAction>();
  action->owner = owner;
  action->group = group;
  action->gather = gather;
  return OnBackward::apply(x, action);
}

// Runs once a parameter's gradient has been accumulated into .grad.
struct AfterAccumulate : torch::autograd::FunctionPostHook {
  AfterAccumulate(ShardedModel* owner, size_t param) : owner(owner), param(param) {}
  torch::autograd::variable_list operator()(const torch::autograd::variable_list& outputs,
                                            const torch::autograd::variable_list&) override {
    owner->on_gradient(param);
    return outputs;
  }
  ShardedModel* owner;
  size_t param;
};

}  // namespace

std::shared_ptr<ShardedModel> ShardedModel::shard(Dist& dist, Transformer& m) {
  std::shared_ptr<ShardedModel> s(new ShardedModel(dist, m));
  m.hooks = s;
  return s;
}

ShardedModel::ShardedModel(Dist& dist, Transformer& m) : dist_(dist), model_(m) {
  const int64_t L = m.cfg.num_layers, world = dist.world_size(), rank = dist.rank();
  // The embeddings' weights are not needed by their backward pass (it scatters into the gradient),
  // so they are gathered for the lookup alone; tied to the head, they stay for the whole pass.
  const bool tied = m.lm_head.weight.defined() && m.lm_head.weight.is_same(m.embed);
  head_ = size_t(L);
  embed_ = tied ? head_ : head_ + 1;
  groups_.resize(size_t(L) + 2);
  group_trains_.assign(groups_.size(), false);
  auto all = named_parameters(m);
  for (auto& p : adapter_parameters(m)) all.push_back(std::move(p));
  std::set<const void*> seen;
  std::map<std::tuple<size_t, at::ScalarType, bool>, size_t> unit_at;
  for (const auto& [name, t] : all) {
    if (!seen.insert(t.unsafeGetTensorImpl()).second) continue;
    if (!t.is_contiguous()) fail("trainer.sharding=full: '{}' is not contiguous", name);
    const int64_t layer = layer_of(name);
    const size_t group = layer >= 0                                 ? size_t(layer)
                         : starts_with(name, "model.embed_tokens.") ? embed_
                                                                    : head_;
    const auto key = std::make_tuple(group, t.scalar_type(), t.requires_grad());
    auto it = unit_at.find(key);
    if (it == unit_at.end()) {
      it = unit_at.emplace(key, units_.size()).first;
      groups_[group].push_back(units_.size());
      units_.emplace_back();
    }
    Unit& x = units_[it->second];
    x.params.push_back(params_.size());
    x.trainable += t.requires_grad();
    group_trains_[group] = group_trains_[group] || t.requires_grad();
    unit_of_.push_back(it->second);
    start_of_.push_back(x.numel);
    x.numel += t.numel();
    names_.push_back(name);
    params_.push_back(t);
  }

  at::NoGradGuard no_grad;
  for (size_t u = 0; u < units_.size(); ++u) {
    Unit& x = units_[u];
    std::vector<at::Tensor> members;
    for (size_t p : x.params) members.push_back(params_[p]);
    dist.broadcast(members);  // every rank starts from rank 0's values
    x.chunk = (x.numel + world - 1) / world;
    const auto& first = params_[x.params.front()];
    const auto options = first.options().requires_grad(false);
    // A raw allocation lands on the current device, which need not be this rank's GPU.
    const c10::DeviceGuard on_device(first.device());
    // The unit's storage, filled once with the whole values; the parameters move into it.
    x.full = at::Storage(at::Storage::use_byte_size_t(), size_t(x.chunk * world) * first.element_size(),
                         first.storage().allocator(), /*resizable=*/true);
    auto flat = at::empty({0}, options).set_(x.full, 0, {x.chunk * world}, {1});
    flat.zero_();
    for (size_t j = 0; j < x.params.size(); ++j) {
      auto& t = params_[x.params[j]];
      flat.narrow(0, start_of_[x.params[j]], t.numel()).copy_(t.reshape({-1}));
      t.set_(x.full, start_of_[x.params[j]], t.sizes(), t.strides());
    }
    x.shard = flat.narrow(0, rank * x.chunk, x.chunk).clone();
    x.gathered = true;
    release_unit(u);
    if (x.trainable == 0) continue;
    // This rank's chunk, cut along the parameters it overlaps.
    const int64_t begin = rank * x.chunk, end = std::min(begin + x.chunk, x.numel);
    for (size_t j = 0; j < x.params.size(); ++j) {
      const auto& t = params_[x.params[j]];
      const int64_t from = std::max(begin, start_of_[x.params[j]]),
                    to = std::min(end, start_of_[x.params[j]] + t.numel());
      if (from >= to) continue;
      pieces_.push_back({names_[x.params[j]], x.shard.narrow(0, from - begin, to - from),
                         from - start_of_[x.params[j]], t});
      piece_at_.emplace_back(u, from - begin);
    }
  }
  got_gradient_.assign(params_.size(), false);
  for (size_t p = 0; p < params_.size(); ++p) {
    if (!params_[p].requires_grad()) continue;
    accumulators_.push_back(torch::autograd::impl::grad_accumulator(params_[p]));
    hook_keys_.push_back(accumulators_.back()->add_post_hook(std::make_unique<AfterAccumulate>(this, p)));
  }
}

ShardedModel::~ShardedModel() {
  for (size_t p = 0; p < accumulators_.size(); ++p) accumulators_[p]->del_post_hook(hook_keys_[p]);
}

void ShardedModel::start_gather(size_t u) {
  Unit& x = units_[u];
  if (x.gathered || x.params.empty()) return;
  auto* impl = x.full.unsafeGetStorageImpl();
  const int64_t world = dist_.world_size();
  const size_t bytes = size_t(x.chunk * world) * x.shard.element_size();
  const c10::DeviceGuard on_device(x.shard.device());
  impl->set_data_ptr_noswap(impl->allocator()->allocate(bytes));
  impl->set_nbytes(bytes);
  // A tensor of its own on the storage: writing through it leaves the parameters' version
  // counters alone (autograd saved them for the backward pass).
  auto flat = at::empty({0}, x.shard.options()).set_(x.full, 0, {x.chunk * world}, {1});
  flat.narrow(0, dist_.rank() * x.chunk, x.chunk).copy_(x.shard);
  x.pending = dist_.all_gather_async(flat);
  x.gathered = x.waiting = true;
}

void ShardedModel::finish_gather(size_t u) {
  Unit& x = units_[u];
  start_gather(u);
  if (!x.waiting) return;
  x.pending.wait();
  x.pending = Work();
  x.waiting = false;
}

void ShardedModel::release_unit(size_t u) {
  Unit& x = units_[u];
  if (held_ || !x.gathered) return;
  if (x.waiting) finish_gather(u);
  auto* impl = x.full.unsafeGetStorageImpl();
  impl->set_data_ptr_noswap(at::DataPtr(nullptr, x.shard.device()));
  impl->set_nbytes(0);
  x.gathered = false;
}

void ShardedModel::start_group(size_t g) {
  if (g < groups_.size())
    for (size_t u : groups_[g]) start_gather(u);
}

void ShardedModel::finish_group(size_t g) {
  for (size_t u : groups_[g]) finish_gather(u);
}

void ShardedModel::release_group(size_t g) {
  at::NoGradGuard no_grad;
  for (size_t u : groups_[g]) release_unit(u);
}

void ShardedModel::gather(size_t g) {
  at::NoGradGuard no_grad;
  finish_group(g);
  if (g > 0 && g < head_) start_group(g - 1);
}

void ShardedModel::before_forward() {
  at::NoGradGuard no_grad;
  finish_group(embed_);
  start_group(0);
}

void ShardedModel::after_embedding() {
  at::NoGradGuard no_grad;
  if (embed_ != head_) release_group(embed_);
}

at::Tensor ShardedModel::before_layer(int64_t layer, const at::Tensor& in) {
  {
    at::NoGradGuard no_grad;
    finish_group(size_t(layer));
    start_group(size_t(layer) + 1);  // the next layer, or after the last the head
  }
  if (!at::GradMode::is_enabled() || (!in.requires_grad() && !group_trains_[size_t(layer)])) return in;
  // A layer that trains after frozen ones (adapters on frozen embeddings): its input asks for a
  // gradient, so that the release below runs.
  const at::Tensor x = in.requires_grad() ? in : in.detach().requires_grad_(true);
  return on_backward(x, this, size_t(layer), /*gather=*/false);
}

void ShardedModel::before_head() {
  at::NoGradGuard no_grad;
  finish_group(head_);
}

at::Tensor ShardedModel::after_layer(int64_t layer, const at::Tensor& out) {
  at::Tensor y = out;
  if (at::GradMode::is_enabled() && out.requires_grad())
    y = on_backward(out, this, size_t(layer), /*gather=*/true);
  at::NoGradGuard no_grad;
  release_group(size_t(layer));
  return y;
}

void ShardedModel::on_gradient(size_t p) {
  at::NoGradGuard no_grad;
  Unit& x = units_[unit_of_[p]];
  at::Tensor& g = params_[p].mutable_grad();
  if (!g.defined()) return;
  if (!x.grad_flat.defined()) {
    // Every element is written by a gradient's copy but the padding after the last parameter
    // (and, in reduce(), the ranges of parameters that got none).
    const int64_t n = x.chunk * dist_.world_size();
    x.grad_flat = at::empty({n}, x.shard.options());
    x.grad_flat.narrow(0, x.numel, n - x.numel).zero_();
  }
  x.grad_flat.narrow(0, start_of_[p], g.numel()).copy_(g.reshape({-1}));
  got_gradient_[p] = true;
  g = at::Tensor();
  if (++x.received == x.trainable) reduce(unit_of_[p]);
}

void ShardedModel::reduce(size_t u) {
  Unit& x = units_[u];
  for (size_t p : x.params) {
    if (x.received < x.trainable && !got_gradient_[p])
      x.grad_flat.narrow(0, start_of_[p], params_[p].numel()).zero_();
    got_gradient_[p] = false;
  }
  Reduction r{u, x.grad_flat, at::empty({x.chunk}, x.grad_flat.options()), Work()};
  r.work = dist_.reduce_scatter_sum_async(r.flat, r.mine);
  reducing_.push_back(std::move(r));
  x.grad_flat = at::Tensor();
  x.received = 0;
  release_unit(u);
  while (reducing_.size() > 1) finish_reduction();
}

void ShardedModel::finish_reduction() {
  Reduction& r = reducing_.front();
  r.work.wait();
  Unit& x = units_[r.unit];
  if (x.grad_shard.defined())
    x.grad_shard.add_(r.mine);
  else
    x.grad_shard = r.mine;
  reducing_.pop_front();
}

std::vector<at::Tensor> ShardedModel::sync_gradients() {
  at::NoGradGuard no_grad;
  // Weights without a gradient in the last backward count zeros (every rank the same ones).
  for (size_t u = 0; u < units_.size(); ++u)
    if (units_[u].received > 0) reduce(u);
  while (!reducing_.empty()) finish_reduction();
  for (auto& x : units_)
    if (x.trainable > 0 && !x.grad_shard.defined()) x.grad_shard = at::zeros({x.chunk}, x.shard.options());
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < pieces_.size(); ++i) {
    const auto [u, at] = piece_at_[i];
    out.push_back(units_[u].grad_shard.narrow(0, at, pieces_[i].values.numel()));
  }
  return out;
}

void ShardedModel::end_step() {
  at::NoGradGuard no_grad;
  for (size_t u = 0; u < units_.size(); ++u) {
    units_[u].grad_shard = at::Tensor();
    release_unit(u);
  }
}

void ShardedModel::hold() {
  at::NoGradGuard no_grad;
  for (size_t u = 0; u < units_.size(); ++u) start_gather(u);
  for (size_t u = 0; u < units_.size(); ++u) finish_gather(u);
  held_ = true;
}

void ShardedModel::release() {
  held_ = false;
  at::NoGradGuard no_grad;
  for (size_t u = 0; u < units_.size(); ++u) release_unit(u);
}

void ShardedModel::unshard() {
  hold();
  if (model_.hooks.get() == this) model_.hooks.reset();
}

std::optional<Transformer> ShardedModel::host_copy(int root) {
  at::NoGradGuard no_grad;
  std::optional<Transformer> host;
  std::map<std::string, at::Tensor*> to;
  if (dist_.rank() == root) {
    // The model's fields, each given a host tensor of its own, filled below unit by unit (every
    // weight is in one).
    host = model_;
    host->hooks = nullptr;
    auto slots = parameter_slots(*host);
    for (auto& s : adapter_slots(*host)) slots.push_back(s);
    for (auto& [name, slot] : slots) {
      *slot = at::empty(slot->sizes(), slot->options().device(at::kCPU).requires_grad(false));
      to.emplace(name, slot);
    }
    if (model_.lm_head.weight.defined() && model_.lm_head.weight.is_same(model_.embed))
      host->lm_head.weight = host->embed;
  }
  for (size_t u = 0; u < units_.size(); ++u) {
    const bool was = units_[u].gathered;
    finish_gather(u);
    if (host)
      for (size_t p : units_[u].params) to.at(names_[p])->copy_(params_[p]);
    if (!was) release_unit(u);
  }
  return host;
}

int64_t ShardedModel::shard_bytes() const {
  int64_t n = 0;
  for (const auto& x : units_)
    if (x.shard.defined()) n += int64_t(x.shard.nbytes());
  return n;
}

int64_t ShardedModel::largest_unit_bytes() const {
  int64_t n = 0;
  for (const auto& x : units_)
    if (x.shard.defined()) n = std::max(n, int64_t(x.shard.nbytes()) * dist_.world_size());
  return n;
}

}  // namespace aligner::dist
