// The one place where differences between libtorch versions live: Debian's 1.13 on CPU and the
// 2.x inside PyTorch on the GPU machine.
#pragma once
#include <ATen/ATen.h>
#include <torch/version.h>

#include <cmath>
#include <optional>

#define ALIGNER_TORCH_2 (TORCH_VERSION_MAJOR >= 2)

namespace aligner::compat {

// Scaled dot-product attention over [B, H, T, D] tensors. `mask` is boolean (true = may attend)
// and broadcastable to [B, H, Tq, Tk]. Key/value may have fewer heads than the query (grouped
// query attention): query head h reads key/value head h / (H / Hkv), as transformers' repeat_kv.
// On torch 2.x this reaches the fused kernels (flash when there is no mask); 1.13 has no public
// fused op, so the math is written out, in the same order as PyTorch's reference implementation.
inline at::Tensor repeat_kv(const at::Tensor& x, int64_t groups) {
  if (groups == 1) return x;
  const auto B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3);
  return x.unsqueeze(2).expand({B, H, groups, T, D}).reshape({B, H * groups, T, D});
}

inline at::Tensor sdpa(const at::Tensor& q, const at::Tensor& k_in, const at::Tensor& v_in,
                       const std::optional<at::Tensor>& mask, bool is_causal, double scale) {
  const int64_t groups = q.size(1) / k_in.size(1);
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 5)
  return at::scaled_dot_product_attention(q, k_in, v_in, mask, 0.0, is_causal, scale, /*enable_gqa=*/groups > 1);
#elif ALIGNER_TORCH_2
  return at::scaled_dot_product_attention(q, repeat_kv(k_in, groups), repeat_kv(v_in, groups), mask, 0.0,
                                          is_causal, scale);
#else
  auto k = repeat_kv(k_in, groups), v = repeat_kv(v_in, groups);
  auto scores = at::matmul(q, k.transpose(-2, -1)) * scale;
  if (is_causal) {
    auto causal = at::ones({q.size(-2), k.size(-2)}, q.options().dtype(at::kBool)).tril();
    scores = scores.masked_fill(causal.logical_not(), -INFINITY);
  }
  if (mask) scores = scores.masked_fill(mask->logical_not(), -INFINITY);
  return at::matmul(at::softmax(scores, -1), v);
#endif
}

inline constexpr bool kTorch2 = ALIGNER_TORCH_2;

}  // namespace aligner::compat
