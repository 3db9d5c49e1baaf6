// AdamW with decoupled weight decay (as torch.optim.AdamW), fp32 master weights for bf16/fp16
// parameters, and global-norm gradient clipping (as torch.nn.utils.clip_grad_norm_, its multiply
// done by the update). Every update is a handful of multi-tensor (_foreach) calls over all
// parameters, or on a GPU one kernel per parameter.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace aligner {

using NamedParams = std::vector<std::pair<std::string, at::Tensor>>;

struct AdamWConfig {
  double lr = 1e-3;  // used by step() without an argument
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
};

// Whether weight decay applies: to matrices only, never to norm weights, biases or vectors.
bool decays(const std::string& name, const at::Tensor& param);

class AdamW {
 public:
  // `params` are the model's leaf tensors (the optimizer updates them in place). bf16/fp16 ones
  // get an fp32 master copy taken now, so construct the optimizer after the weights are loaded.
  // Throws aligner::Error for a bad config, an undefined or non-floating tensor, a repeated name,
  // or the same tensor under two names (tied weights must be listed once).
  AdamW(NamedParams params, AdamWConfig cfg);
  // For pieces of parameters (a sharded optimizer's flat views into them): whether weight decay
  // applies to each, as decays() says of the whole parameter.
  AdamW(NamedParams params, AdamWConfig cfg, const std::vector<bool>& decay);

  void step() { step(cfg_.lr); }
  // One update at learning rate `lr` (the schedule's value for this step) from the gradients times
  // grad_scale (clip_coefficient's): on a GPU inside the update kernel in float32, saving a pass over
  // the gradients; elsewhere on the gradients in their own type, as torch's clip_grad_norm_ scales.
  // Every parameter must have a gradient: an aligner::Error names one that has none, as skipping it
  // would leave its moments behind the shared step count.
  void step(double lr, double grad_scale = 1.0);
  // The same with the gradients given, one per parameter in order (views have no .grad).
  void step(double lr, std::vector<at::Tensor> grads, double grad_scale = 1.0);
  // Drops the gradients (torch's set_to_none), freeing their memory until the next backward.
  void zero_grad();
  int64_t step_count() const { return step_; }
  // Moves the moments and fp32 master weights (not the parameters) to `device`: host memory while
  // something else needs the GPU's (an online algorithm's generation), back before the next step.
  void move_state(at::Device device);
  const AdamWConfig& config() const { return cfg_; }

  // The optimizer's state as named tensors for safetensors: "step" (int64 scalar), then per
  // parameter "exp_avg.<name>", "exp_avg_sq.<name>" and, for bf16/fp16 ones, "master.<name>".
  // The tensors alias the live state (no copy of gigabytes): write them before the next step.
  NamedParams state() const;
  // Restores state() output bit-exactly, so a resumed run continues as if never stopped. The
  // parameters themselves come from the model checkpoint and are not touched. Every name must
  // match with its shape and dtype; otherwise an aligner::Error, and nothing is changed.
  void load_state(const NamedParams& state);

 private:
#ifdef ALIGNER_WITH_CUDA
  // The update as one kernel per tensor (kernels/adamw.cu) where every tensor is on a GPU and
  // dense; false (nothing done) otherwise.
  bool fused_step(double lr, double bias_correction1, double bias_correction2,
                  const std::vector<at::Tensor>& grads, double grad_scale);
#endif
  AdamWConfig cfg_;
  std::vector<std::string> names_;
  std::vector<at::Tensor> params_;
  // What the update writes: the fp32 master for bf16/fp16 parameters, else the parameter itself.
  std::vector<at::Tensor> working_;
  std::vector<bool> has_master_;
  std::vector<bool> decays_;         // per parameter: weight decay applies
  std::vector<at::Tensor> decayed_;  // the subset of working_ that weight decay applies to
  std::vector<at::Tensor> exp_avg_, exp_avg_sq_;
  int64_t step_ = 0;
};

// The global L2 norm of gradients given as tensors, each part of the whole, whose squared norms
// `sum_over_ranks` adds up over the ranks that hold the other parts (a sharded optimizer's pieces):
// sqrt(sum of squared per-tensor norms), accumulated in fp32 or wider also for bf16 gradients.
double grad_norm(const std::vector<at::Tensor>& grads, const std::function<double(double)>& sum_over_ranks);
// What clipping to max_norm (> 0, else an aligner::Error) multiplies gradients of norm `norm` by:
// max_norm / (norm + 1e-6) when that is below 1, else 1 (also for a NaN norm; 0 for an infinite
// one: callers skip updates whose norm is not finite).
double clip_coefficient(double norm, double max_norm);

}  // namespace aligner
