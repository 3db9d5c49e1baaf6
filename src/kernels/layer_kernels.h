// CUDA kernels of a transformer layer's elementwise pieces (and of the head's log-probabilities),
// forward and backward: the decoder (gen/cuda_decoder.cpp) and the training forward
// (model/fused_layers.cpp) both run them, on raw device pointers. Their reference is the ATen code
// of model/layers.h, which tests compare them with.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/decode_kernels.h"

namespace aligner::kernels {

// sum = x + delta (when delta is given; rows of delta at delta_stride elements; sum may be x
// itself), then out = rms_norm(sum) * weight as transformers' LlamaRMSNorm computes it (the
// normalised value rounded to the element type before the weight multiplies it), and, when rstd is
// given, each row's 1 / sqrt(mean(sum^2) + eps) in float32. x, sum and out are [rows, cols],
// contiguous. cols and delta_stride must be multiples of 8 and the pointers aligned to 8 elements.
cudaError_t add_rms_norm(DType dtype, const void* x, const void* delta, int64_t delta_stride,
                         const void* weight, float eps, void* sum, void* out, float* rstd, int64_t rows,
                         int64_t cols, cudaStream_t stream);

// The backward pass of add_rms_norm: grad_in = grad_sum (when given) + the norm's input gradient
// for grad_out, from the saved sum and rstd; grad_weight = sum over rows of grad_out x the rounded
// normalised value, accumulated in float32 in `workspace` (rms_norm_backward_workspace floats).
// All [rows, cols] contiguous, cols a multiple of 8 and at most rms_norm_backward_max_cols.
constexpr int64_t rms_norm_backward_max_cols = 8192;
int64_t rms_norm_backward_workspace(int64_t rows, int64_t cols);
cudaError_t rms_norm_backward(DType dtype, const void* grad_out, const void* grad_sum, const void* sum,
                              const void* weight, const float* rstd, void* grad_in, void* grad_weight,
                              float* workspace, int64_t rows, int64_t cols, cudaStream_t stream);

// out [rows, cols] (contiguous) = silu(gate) * up, computed in float32, for gate and up of
// [rows, cols] with rows at in_stride elements (two halves of one projection's output, or two).
cudaError_t silu_mul(DType dtype, const void* gate, const void* up, int64_t in_stride, void* out,
                     int64_t rows, int64_t cols, cudaStream_t stream);
// Its backward pass: grad_gate = grad_out x up x silu'(gate), grad_up = grad_out x silu(gate), all
// [rows, cols] contiguous but gate and up (rows at in_stride).
cudaError_t silu_mul_backward(DType dtype, const void* gate, const void* up, int64_t in_stride,
                              const void* grad_out, void* grad_gate, void* grad_up, int64_t rows,
                              int64_t cols, cudaStream_t stream);

// The rotate-half rotary embedding of Llama-family models over x [batch, tokens, heads, head_dim]
// (element strides sb, st, sh; head_dim contiguous): each head's first rotary_dim dimensions turned
// by the angles whose cos and sin are [batch, tokens, rotary_dim] (strides cb, ct; both halves of
// the last dimension equal, as rope_cos_sin builds them), the rest passed through, into out
// [batch, tokens, heads, head_dim] contiguous. inverse: turn the other way (the backward pass).
struct RotaryArgs {
  DType dtype;
  const void* x;
  int64_t sb, st, sh;
  const void *cos, *sin;
  int64_t cb, ct;
  void* out;
  int64_t batch, tokens;
  int heads, head_dim, rotary_dim;
  bool inverse;
};
cudaError_t rotary(const RotaryArgs& a, cudaStream_t stream);

// out[r] = log_softmax(logits[r])[targets[r]] in float32 (0 where the target is negative: not scored)
// and lse[r] = logsumexp(logits[r]), for logits [rows, vocab] contiguous.
cudaError_t target_logprobs(DType dtype, const void* logits, const int64_t* targets, float* out, float* lse,
                            int64_t rows, int64_t vocab, cudaStream_t stream);
// Its backward pass: grad_logits [rows, vocab] = grad[r] (onehot(targets[r]) - exp(logits - lse[r])),
// zero for rows whose target is negative.
cudaError_t target_logprobs_backward(DType dtype, const void* logits, const int64_t* targets,
                                     const float* lse, const float* grad, void* grad_logits, int64_t rows,
                                     int64_t vocab, cudaStream_t stream);

}  // namespace aligner::kernels
