// A layer's elementwise pieces as one CUDA kernel each way (src/kernels/layer_kernels.h) where the
// tensors are on a GPU, each an autograd function whose backward pass is one kernel too; elsewhere
// the ATen code of layers.h, which is their reference.
#include <torch/csrc/autograd/custom_function.h>

#include <initializer_list>

#include "model/layers.h"
#ifdef ALIGNER_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>

#include "core/error.h"
#include "kernels/aten_dtype.h"
#include "kernels/layer_kernels.h"
#endif

namespace aligner {

#ifdef ALIGNER_WITH_CUDA
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Tensors the kernels take: on a GPU, of one element type they compute in.
bool on_kernels(std::initializer_list<at::Tensor> ts) {
  for (const auto& t : ts)
    if (!t.defined() || !t.is_cuda() || t.scalar_type() != ts.begin()->scalar_type()) return false;
  const auto type = ts.begin()->scalar_type();
  return type == at::kFloat || type == at::kBFloat16 || type == at::kHalf;
}

void check(cudaError_t e, const char* kernel) {
  if (e != cudaSuccess) fail("the {} kernel failed: {}", kernel, cudaGetErrorString(e));
}

cudaStream_t stream() {
  return at::cuda::getCurrentCUDAStream().stream();
}

// (x + delta, rms_norm(x + delta)), or without delta (x, rms_norm(x)): the forward kernel, whose
// saved sum and rstd norm_backward reads.
variable_list norm_forward(AutogradContext* ctx, const at::Tensor& x_in, const at::Tensor& delta_in,
                           const at::Tensor& weight, double eps) {
  const auto x = x_in.contiguous();
  const auto delta = delta_in.defined() ? delta_in.contiguous() : at::Tensor();
  const int64_t cols = x.size(-1), rows = x.numel() / cols;
  auto sum = delta.defined() ? at::empty_like(x) : x, out = at::empty_like(x);
  auto rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  check(
      kernels::add_rms_norm(kernels::dtype_of(x.scalar_type()), x.data_ptr(),
                            delta.defined() ? delta.data_ptr() : nullptr, cols, weight.data_ptr(), float(eps),
                            sum.data_ptr(), out.data_ptr(), rstd.data_ptr<float>(), rows, cols, stream()),
      "add_rms_norm");
  ctx->save_for_backward({sum, weight, rstd});
  // An output that gets no gradient (the final norm's sum) stays undefined rather than a pass of
  // zeros for the backward kernel to read.
  ctx->set_materialize_grads(false);
  return {sum, out};
}

// The sum's gradient (the residual stream's, grads[0], plus the norm's for grads[1]) and the
// weight's (when input `weight_input` needs one).
std::pair<at::Tensor, at::Tensor> norm_backward(AutogradContext* ctx, const variable_list& grads,
                                                size_t weight_input) {
  const auto saved = ctx->get_saved_variables();
  const auto &sum = saved[0], &weight = saved[1], &rstd = saved[2];
  const auto& grad_sum = grads[0];
  if (!grads[1].defined()) return {grad_sum, at::Tensor()};
  const auto grad_out = grads[1].contiguous();
  const auto residual = grad_sum.defined() ? grad_sum.contiguous() : at::Tensor();
  const int64_t cols = sum.size(-1), rows = sum.numel() / cols;
  auto grad_in = at::empty_like(sum);
  auto grad_weight = ctx->needs_input_grad(weight_input) ? at::empty_like(weight) : at::Tensor();
  auto workspace = at::empty({kernels::rms_norm_backward_workspace(rows, cols)}, rstd.options());
  check(kernels::rms_norm_backward(kernels::dtype_of(sum.scalar_type()), grad_out.data_ptr(),
                                   residual.defined() ? residual.data_ptr() : nullptr, sum.data_ptr(),
                                   weight.data_ptr(), rstd.data_ptr<float>(), grad_in.data_ptr(),
                                   grad_weight.defined() ? grad_weight.data_ptr() : nullptr,
                                   workspace.data_ptr<float>(), rows, cols, stream()),
        "rms_norm_backward");
  return {grad_in, grad_weight};
}

struct AddRmsNorm : torch::autograd::Function<AddRmsNorm> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& delta,
                               const at::Tensor& weight, double eps) {
    return norm_forward(ctx, x, delta, weight, eps);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto [grad_in, grad_weight] = norm_backward(ctx, grads, 2);
    return {grad_in, grad_in, grad_weight, at::Tensor()};
  }
};

// x passed through beside its norm, so that x's gradient from later layers joins the norm's in the
// backward kernel instead of a separate sum.
struct RmsNormPassing : torch::autograd::Function<RmsNormPassing> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               double eps) {
    return norm_forward(ctx, x, at::Tensor(), weight, eps);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto [grad_in, grad_weight] = norm_backward(ctx, grads, 1);
    return {grad_in, grad_weight, at::Tensor()};
  }
};

// The stride between rows of t viewed as [-1, t.size(-1)], or -1 where no such view exists.
int64_t row_stride(const at::Tensor& t) {
  if (t.dim() < 2 || t.stride(-1) != 1) return -1;
  for (int64_t d = 0; d + 2 < t.dim(); ++d)
    if (t.size(d) > 1 && t.stride(d) != t.stride(d + 1) * t.size(d + 1)) return -1;
  return t.stride(-2);
}

struct SiluMul : torch::autograd::Function<SiluMul> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& gate, const at::Tensor& up) {
    const int64_t cols = gate.size(-1), rows = gate.numel() / cols, stride = row_stride(gate);
    auto out = at::empty(gate.sizes(), gate.options());
    check(kernels::silu_mul(kernels::dtype_of(gate.scalar_type()), gate.data_ptr(), up.data_ptr(), stride,
                            out.data_ptr(), rows, cols, stream()),
          "silu_mul");
    ctx->save_for_backward({gate, up});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &gate = saved[0], &up = saved[1];
    const auto grad_out = grads[0].contiguous();
    const int64_t cols = gate.size(-1), rows = gate.numel() / cols;
    auto grad_gate = at::empty(gate.sizes(), gate.options()), grad_up = at::empty(up.sizes(), up.options());
    check(kernels::silu_mul_backward(kernels::dtype_of(gate.scalar_type()), gate.data_ptr(), up.data_ptr(),
                                     row_stride(gate), grad_out.data_ptr(), grad_gate.data_ptr(),
                                     grad_up.data_ptr(), rows, cols, stream()),
          "silu_mul_backward");
    return {grad_gate, grad_up};
  }
};

// x [B, T, H, D] (head dimension contiguous) rotated, or turned back, into a new [B, T, H, D].
at::Tensor rotary(const at::Tensor& x_in, const at::Tensor& cos, const at::Tensor& sin, bool inverse) {
  const auto x = x_in.stride(-1) == 1 ? x_in : x_in.contiguous();
  auto out = at::empty(x.sizes(), x.options());
  kernels::RotaryArgs a{};
  a.dtype = kernels::dtype_of(x.scalar_type());
  a.x = x.data_ptr();
  a.sb = x.stride(0), a.st = x.stride(1), a.sh = x.stride(2);
  a.cos = cos.data_ptr(), a.sin = sin.data_ptr();
  a.cb = cos.size(0) == 1 ? 0 : cos.stride(0), a.ct = cos.stride(2);
  a.out = out.data_ptr();
  a.batch = x.size(0), a.tokens = x.size(1);
  a.heads = int(x.size(2)), a.head_dim = int(x.size(3)), a.rotary_dim = int(cos.size(3));
  a.inverse = inverse;
  check(kernels::rotary(a, stream()), "rotary");
  return out;
}

struct RotateHeads : torch::autograd::Function<RotateHeads> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& cos,
                            const at::Tensor& sin) {
    ctx->save_for_backward({cos, sin});
    return rotary(x, cos, sin, /*inverse=*/false);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    return {rotary(grads[0], saved[0], saved[1], /*inverse=*/true), at::Tensor(), at::Tensor()};
  }
};

struct TargetLogprobs : torch::autograd::Function<TargetLogprobs> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& logits_in, const at::Tensor& targets_in) {
    const auto logits = logits_in.contiguous();
    const auto targets = targets_in.to(at::kLong).contiguous();
    const int64_t rows = logits.size(0), vocab = logits.size(1);
    auto out = at::empty({rows}, logits.options().dtype(at::kFloat)), lse = at::empty_like(out);
    check(kernels::target_logprobs(kernels::dtype_of(logits.scalar_type()), logits.data_ptr(),
                                   targets.data_ptr<int64_t>(), out.data_ptr<float>(), lse.data_ptr<float>(),
                                   rows, vocab, stream()),
          "target_logprobs");
    ctx->save_for_backward({logits, targets, lse});
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &logits = saved[0], &targets = saved[1], &lse = saved[2];
    const auto grad = grads[0].to(at::kFloat).contiguous();
    auto grad_logits = at::empty_like(logits);
    check(kernels::target_logprobs_backward(kernels::dtype_of(logits.scalar_type()), logits.data_ptr(),
                                            targets.data_ptr<int64_t>(), lse.data_ptr<float>(),
                                            grad.data_ptr<float>(), grad_logits.data_ptr(), logits.size(0),
                                            logits.size(1), stream()),
          "target_logprobs_backward");
    return {grad_logits, at::Tensor()};
  }
};

}  // namespace
#endif

at::Tensor target_logprobs(const at::Tensor& logits, const at::Tensor& targets) {
#ifdef ALIGNER_WITH_CUDA
  if (on_kernels({logits}) && logits.dim() == 2 && targets.dim() == 1 && targets.is_cuda() &&
      targets.size(0) == logits.size(0) && logits.size(1) > 0)
    return TargetLogprobs::apply(logits, targets);
#endif
  const auto logp = at::log_softmax(at_least_float(logits), -1);
  const auto picked = logp.gather(1, targets.clamp_min(0).unsqueeze(1)).squeeze(1);
  return picked * (targets >= 0).to(picked.scalar_type());
}

std::pair<at::Tensor, at::Tensor> add_norm(const ModelConfig& c, const at::Tensor& x, const at::Tensor& delta,
                                           const at::Tensor& weight, const at::Tensor& bias) {
#ifdef ALIGNER_WITH_CUDA
  const int64_t cols = x.size(-1);
  if (!c.layernorm1p && on_kernels({x, weight}) && (!delta.defined() || on_kernels({x, delta})) &&
      (!delta.defined() || x.sizes() == delta.sizes()) && weight.dim() == 1 && weight.size(0) == cols &&
      weight.is_contiguous() && cols % 8 == 0 && cols <= kernels::rms_norm_backward_max_cols) {
    const auto out = delta.defined() ? AddRmsNorm::apply(x, delta, weight, c.rms_norm_eps)
                                     : RmsNormPassing::apply(x, weight, c.rms_norm_eps);
    return {out[0], out[1]};
  }
#endif
  const auto sum = delta.defined() ? x + delta : x;
  return {sum, norm(c, sum, weight, bias)};
}

at::Tensor swiglu(const at::Tensor& gate, const at::Tensor& up) {
#ifdef ALIGNER_WITH_CUDA
  if (on_kernels({gate, up}) && gate.sizes() == up.sizes() && gate.numel() > 0 && row_stride(gate) > 0 &&
      row_stride(gate) == row_stride(up))
    return SiluMul::apply(gate, up);
#endif
  return at::silu(gate) * up;
}

at::Tensor rotate_heads(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
#ifdef ALIGNER_WITH_CUDA
  if (on_kernels({x, cos, sin}) && x.dim() == 4 && cos.dim() == 4 && cos.sizes() == sin.sizes() &&
      cos.strides() == sin.strides() && cos.stride(3) == 1 &&
      (cos.size(0) == x.size(0) || cos.size(0) == 1) && cos.size(1) == 1 && cos.size(2) == x.size(1) &&
      cos.size(3) <= x.size(3) && cos.size(3) % 2 == 0 && x.size(3) % 2 == 0)
    return RotateHeads::apply(x, cos, sin).transpose(1, 2);
#endif
  return apply_rope(x.transpose(1, 2), cos, sin);
}

}  // namespace aligner
