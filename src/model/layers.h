// The pieces of a transformer layer that more than one forward pass needs: the training forward in
// transformer.cpp and the cached decoding forward of the generation engine.
#pragma once
#include <ATen/ATen.h>

#include <utility>

#include "model/transformer.h"

namespace aligner {

// Rotary inverse frequencies with the config's scaling (max_position: longest position in the
// batch, for dynamic scaling), and cos/sin for `positions` [B, T] as [B, 1, T, head_dim] in dtype.
at::Tensor rope_inv_freq(const ModelConfig& c, int64_t max_position, at::Device device);
std::pair<at::Tensor, at::Tensor> rope_cos_sin(const ModelConfig& c, const at::Tensor& positions,
                                               at::ScalarType dtype);
// x [B, H, T, D] rotated by cos/sin [B, 1, T, R]: its first R dims (all of them but with partial
// rotary embeddings), the rest passed through.
at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
// x [B, T, H, D] rotated as apply_rope rotates it, as [B, H, T, D]; on a GPU one kernel each way,
// whose output is token-major ([B, T, H, D] in memory, as flash attention reads it).
at::Tensor rotate_heads(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
// t in float32, or float64 for float64 tensors (finite-difference checks).
inline at::Tensor at_least_float(const at::Tensor& t) {
  return t.to(at::promote_types(t.scalar_type(), at::kFloat));
}
// The config's norm of x with a norm weight (and bias): RMSNorm, or Nemotron's LayerNorm with scale
// 1 + weight.
at::Tensor norm(const ModelConfig& c, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias);
// The residual add and the norm after it: (x + delta, norm(x + delta)); RMSNorm on a GPU as one
// kernel each way. Without delta, (x, norm(x)): the x returned is the residual stream to use from
// then on, whose gradient the norm's backward kernel adds in (on a GPU) rather than autograd.
std::pair<at::Tensor, at::Tensor> add_norm(const ModelConfig& c, const at::Tensor& x, const at::Tensor& delta,
                                           const at::Tensor& weight, const at::Tensor& bias);
// Qwen3's RMSNorm of each head of q or k [..., heads x head_dim] (qk_norm), as [..., heads, head_dim].
at::Tensor head_norm(const ModelConfig& c, const at::Tensor& x, int64_t heads, const at::Tensor& weight);
// q, k, v projections [B, T, heads x head_dim] as attention reads them: [B, heads, T, head_dim],
// q and k normed per head (qk_norm) and rotated.
struct Qkv {
  at::Tensor q, k, v;
};
Qkv attention_heads(const ModelConfig& c, const Block& b, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, const at::Tensor& cos, const at::Tensor& sin);
// The input of a projection: entered into the tensor-parallel group (tp_copy) when the projection is
// column-parallel, as is.
at::Tensor split_input(const Linear& l, const at::Tensor& x);
// silu(gate) * up; on a GPU one kernel each way, which keeps no silu(gate) for the backward pass.
at::Tensor swiglu(const at::Tensor& gate, const at::Tensor& up);
// log_softmax(logits)[targets] per row of logits [N, V] (float32 at least; 0 where a target is
// negative: not scored); on a GPU one kernel each way, which keeps the logits in their own type for
// the backward pass where ATen keeps their float32 log-softmax.
at::Tensor target_logprobs(const at::Tensor& logits, const at::Tensor& targets);
// The feed-forward of a block: gated SiLU, or squared ReLU without a gate.
at::Tensor mlp(const ModelConfig& c, const Block& b, const at::Tensor& h);

}  // namespace aligner
