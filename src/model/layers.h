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
// x [B, H, T, D] rotated by cos/sin [B, 1, T, D].
at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
// The gated SiLU feed-forward of a block.
at::Tensor mlp(const Block& b, const at::Tensor& h);

}  // namespace aligner
