#include "train/optimizer.h"

#include <c10/core/GradMode.h>
#include <c10/util/StringUtil.h>

#include <cmath>
#include <map>
#include <set>

#include "core/error.h"
#include "core/strings.h"
#include "core/torch_compat.h"

#ifdef ALIGNER_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "kernels/aten_dtype.h"
#include "kernels/optimizer_kernels.h"
#endif

namespace aligner {

namespace {

bool is_low_precision(const at::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf;
}

void check_config(const AdamWConfig& c) {
  if (!(c.lr >= 0.0)) fail("AdamW: lr must be >= 0, got {}", c.lr);
  if (!(c.beta1 >= 0.0 && c.beta1 < 1.0)) fail("AdamW: beta1 must be in [0, 1), got {}", c.beta1);
  if (!(c.beta2 >= 0.0 && c.beta2 < 1.0)) fail("AdamW: beta2 must be in [0, 1), got {}", c.beta2);
  if (!(c.eps >= 0.0)) fail("AdamW: eps must be >= 0, got {}", c.eps);
  if (!(c.weight_decay >= 0.0)) fail("AdamW: weight_decay must be >= 0, got {}", c.weight_decay);
}

// "[10, 6]", as torch prints shapes.
std::string shape_str(const at::Tensor& t) {
  return c10::str(t.sizes());
}

}  // namespace

bool decays(const std::string& name, const at::Tensor& param) {
  return param.dim() >= 2 && name.find("norm") == std::string::npos && !ends_with(name, ".bias");
}

namespace {

std::vector<bool> decay_flags(const NamedParams& params) {
  std::vector<bool> out;
  for (const auto& [name, p] : params) out.push_back(p.defined() && decays(name, p));
  return out;
}

}  // namespace

AdamW::AdamW(NamedParams params, AdamWConfig cfg) : AdamW(params, cfg, decay_flags(params)) {}

AdamW::AdamW(NamedParams params, AdamWConfig cfg, const std::vector<bool>& decay) : cfg_(cfg) {
  check_config(cfg_);
  if (decay.size() != params.size())
    fail("AdamW: {} decay flags for {} parameters", decay.size(), params.size());
  size_t index = 0;
  c10::NoGradGuard no_grad;
  std::set<std::string> seen_names;
  std::set<const void*> seen_tensors;
  for (auto& [name, p] : params) {
    if (!p.defined()) fail("AdamW: parameter '{}' is an undefined tensor", name);
    if (!at::isFloatingType(p.scalar_type()))
      fail("AdamW: parameter '{}' has dtype {}, not a floating type", name, c10::toString(p.scalar_type()));
    if (!seen_names.insert(name).second) fail("AdamW: parameter name '{}' is listed twice", name);
    if (!seen_tensors.insert(p.unsafeGetTensorImpl()).second)
      fail("AdamW: parameter '{}' is a tensor already listed under another name", name);
    const bool master = is_low_precision(p);
    at::Tensor w = master ? p.detach().to(at::kFloat, /*non_blocking=*/false, /*copy=*/true) : p.detach();
    // Moments live in the working dtype (fp32 for masters), preserving the parameter's strides so
    // that the multi-tensor kernels see matching layouts.
    exp_avg_.push_back(at::zeros_like(w));
    exp_avg_sq_.push_back(at::zeros_like(w));
    decays_.push_back(decay[index++]);
    if (decays_.back()) decayed_.push_back(w);
    names_.push_back(name);
    params_.push_back(p);
    working_.push_back(std::move(w));
    has_master_.push_back(master);
  }
}

void AdamW::move_state(at::Device device) {
  c10::NoGradGuard no_grad;
  // New tensors, not set_() on the old ones: torch refuses storage from another device.
  auto moved = [&](const at::Tensor& t) {
    if (t.device() == device) return t;
    const bool pin = device.is_cpu() && at::hasCUDA();
    auto to = at::empty_strided(t.sizes(), t.strides(), t.options().device(device).pinned_memory(pin));
    to.copy_(t);
    return to;
  };
  decayed_.clear();
  for (size_t i = 0; i < params_.size(); ++i) {
    exp_avg_[i] = moved(exp_avg_[i]);
    exp_avg_sq_[i] = moved(exp_avg_sq_[i]);
    if (has_master_[i]) working_[i] = moved(working_[i]);
    if (decays_[i]) decayed_.push_back(working_[i]);
  }
}

void AdamW::step(double lr, double grad_scale) {
  std::vector<at::Tensor> grads;
  grads.reserve(params_.size());
  for (size_t i = 0; i < params_.size(); ++i) {
    const at::Tensor& g = params_[i].grad();
    if (!g.defined())
      fail("AdamW: step {}: parameter '{}' has no gradient (not used in the loss?)", step_ + 1, names_[i]);
    grads.push_back(g);
  }
  step(lr, std::move(grads), grad_scale);
}

void AdamW::step(double lr, std::vector<at::Tensor> grads, double grad_scale) {
  if (!(lr >= 0.0)) fail("AdamW: step {}: lr must be >= 0, got {}", step_ + 1, lr);
  if (grads.size() != params_.size())
    fail("AdamW: step {}: {} gradients for {} parameters", step_ + 1, grads.size(), params_.size());
  c10::NoGradGuard no_grad;
  for (size_t i = 0; i < params_.size(); ++i) {
    auto& g = grads[i];
    if (g.is_sparse()) fail("AdamW: parameter '{}' has a sparse gradient, which is not supported", names_[i]);
    if (!g.sizes().equals(params_[i].sizes()))
      fail("AdamW: step {}: the gradient of '{}' is {}, the parameter {}", step_ + 1, names_[i], shape_str(g),
           shape_str(params_[i]));
  }
  ++step_;
  const double bias_correction1 = 1.0 - std::pow(cfg_.beta1, double(step_));
  const double bias_correction2 = 1.0 - std::pow(cfg_.beta2, double(step_));

#ifdef ALIGNER_WITH_CUDA
  if (fused_step(lr, bias_correction1, bias_correction2, grads, grad_scale)) return;
#endif
  if (grad_scale != 1.0) at::_foreach_mul_(grads, grad_scale);
  for (size_t i = 0; i < params_.size(); ++i)
    if (grads[i].scalar_type() != working_[i].scalar_type())
      grads[i] = grads[i].to(working_[i].scalar_type());
  // The same operations in the same order as torch::optim::AdamW, so results match it exactly.
  if (cfg_.weight_decay != 0.0 && !decayed_.empty())
    at::_foreach_mul_(decayed_, 1.0 - lr * cfg_.weight_decay);
  at::_foreach_mul_(exp_avg_, cfg_.beta1);
  at::_foreach_add_(exp_avg_, grads, 1.0 - cfg_.beta1);
  at::_foreach_mul_(exp_avg_sq_, cfg_.beta2);
  at::_foreach_addcmul_(exp_avg_sq_, grads, grads, 1.0 - cfg_.beta2);
  // Frees the fp32 copies of bf16 gradients before the denominators take the same amount again.
  grads.clear();
  std::vector<at::Tensor> denom = at::_foreach_sqrt(exp_avg_sq_);
  at::_foreach_div_(denom, std::sqrt(bias_correction2));
  at::_foreach_add_(denom, cfg_.eps);
  at::_foreach_addcdiv_(working_, exp_avg_, denom, -lr / bias_correction1);

  for (size_t i = 0; i < params_.size(); ++i)
    if (has_master_[i]) params_[i].copy_(working_[i]);  // round to nearest into bf16/fp16
}

#ifdef ALIGNER_WITH_CUDA
bool AdamW::fused_step(double lr, double bias_correction1, double bias_correction2,
                       const std::vector<at::Tensor>& grads, double grad_scale) {
  const auto supported = [](const at::Tensor& t) {
    return t.is_cuda() && t.is_contiguous() &&
           (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 ||
            t.scalar_type() == at::kHalf);
  };
  for (size_t i = 0; i < params_.size(); ++i)
    if (working_[i].scalar_type() != at::kFloat || !supported(working_[i]) || !supported(exp_avg_[i]) ||
        !supported(exp_avg_sq_[i]) || !supported(params_[i]) || !grads[i].is_cuda())
      return false;
  kernels::AdamWArgs a{};
  a.beta1 = float(cfg_.beta1);
  a.one_minus_beta1 = float(1.0 - cfg_.beta1);
  a.beta2 = float(cfg_.beta2);
  a.one_minus_beta2 = float(1.0 - cfg_.beta2);
  a.step_size = float(-lr / bias_correction1);
  a.bias2_sqrt = float(std::sqrt(bias_correction2));
  a.eps = float(cfg_.eps);
  a.grad_scale = float(grad_scale);
  for (size_t i = 0; i < params_.size(); ++i) {
    const c10::cuda::CUDAGuard on_device(params_[i].device());
    const at::Tensor g = supported(grads[i]) ? grads[i] : grads[i].to(at::kFloat).contiguous();
    a.n = working_[i].numel();
    a.weight = working_[i].data_ptr<float>();
    a.exp_avg = exp_avg_[i].data_ptr<float>();
    a.exp_avg_sq = exp_avg_sq_[i].data_ptr<float>();
    a.grad = g.data_ptr();
    a.grad_dtype = kernels::dtype_of(g.scalar_type());
    a.param = has_master_[i] ? params_[i].data_ptr() : nullptr;
    a.param_dtype = kernels::dtype_of(params_[i].scalar_type());
    a.decay = decays_[i] && cfg_.weight_decay != 0.0 ? float(1.0 - lr * cfg_.weight_decay) : 1.f;
    const cudaError_t e = kernels::adamw_step(a, at::cuda::getCurrentCUDAStream());
    if (e != cudaSuccess) fail("AdamW: the update of '{}' failed: {}", names_[i], cudaGetErrorString(e));
  }
  return true;
}
#endif

void AdamW::zero_grad() {
  for (auto& p : params_) p.mutable_grad() = at::Tensor();
}

NamedParams AdamW::state() const {
  NamedParams out;
  out.reserve(1 + 3 * names_.size());
  out.emplace_back("step", at::scalar_tensor(step_, at::kLong));
  for (size_t i = 0; i < names_.size(); ++i) {
    out.emplace_back("exp_avg." + names_[i], exp_avg_[i]);
    out.emplace_back("exp_avg_sq." + names_[i], exp_avg_sq_[i]);
    if (has_master_[i]) out.emplace_back("master." + names_[i], working_[i]);
  }
  return out;
}

void AdamW::load_state(const NamedParams& state) {
  std::map<std::string, at::Tensor> given;
  for (const auto& [name, t] : state)
    if (!given.emplace(name, t).second) fail("AdamW state: '{}' appears twice", name);

  // Pairs (source, destination) for every expected entry, all checked before anything is copied.
  const NamedParams expected = this->state();
  std::vector<std::pair<at::Tensor, at::Tensor>> copies;
  for (const auto& [name, dst] : expected) {
    auto it = given.find(name);
    if (it == given.end())
      fail("AdamW state: '{}' is missing (state from a different model or optimizer?)", name);
    const at::Tensor& src = it->second;
    if (src.scalar_type() != dst.scalar_type() || !src.sizes().equals(dst.sizes()))
      fail("AdamW state: '{}' is {} {}, expected {} {}", name, c10::toString(src.scalar_type()),
           shape_str(src), c10::toString(dst.scalar_type()), shape_str(dst));
    copies.emplace_back(src, dst);
    given.erase(it);
  }
  if (!given.empty())
    fail("AdamW state: '{}' matches no parameter of this optimizer ({} unexpected entries)",
         given.begin()->first, given.size());
  const int64_t step = copies.front().first.item<int64_t>();  // "step" comes first in state()
  if (step < 0) fail("AdamW state: step is {}, expected >= 0", step);

  c10::NoGradGuard no_grad;
  for (size_t i = 1; i < copies.size(); ++i) copies[i].second.copy_(copies[i].first);
  step_ = step;
}

double grad_norm(const std::vector<at::Tensor>& grads, const std::function<double(double)>& sum_over_ranks) {
  c10::NoGradGuard no_grad;
  // Per-tensor norms accumulated in float32 on GPUs (one multi-tensor kernel) and in float64 on the
  // CPU, where libtorch 1.13's float32 kernel drifts by 1e-5 over long vectors (enough to tell a
  // sharded norm from a whole one); their squares summed in float64.
  double local = 0.0;
  if (!grads.empty()) {
    std::vector<at::Tensor> norms;
    if (grads.front().is_cuda())
      norms = compat::float_norms(grads);
    else
      for (const auto& g : grads)
        norms.push_back(at::linalg_vector_norm(g, 2, c10::nullopt, false, at::kDouble));
    for (auto& n : norms) n = n.to(grads.front().device(), at::kDouble);
    local = at::stack(norms).square().sum().item<double>();
  }
  return std::sqrt(sum_over_ranks(local));
}

double clip_coefficient(double norm, double max_norm) {
  if (!(max_norm > 0.0)) fail("gradient clipping: max_norm must be > 0, got {}", max_norm);
  return std::min(1.0, max_norm / (norm + 1e-6));
}

}  // namespace aligner
