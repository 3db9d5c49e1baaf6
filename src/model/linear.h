// Every projection in the model goes through this one type, so that adapters (LoRA) and tensor
// parallelism have a single place to hook in.
#pragma once
#include <ATen/ATen.h>

namespace aligner {

struct Linear {
  at::Tensor weight;  // [out, in], as nn.Linear stores it
  at::Tensor bias;    // [out] or undefined
};

inline at::Tensor apply(const Linear& l, const at::Tensor& x) {
  return at::linear(x, l.weight, l.bias.defined() ? c10::optional<at::Tensor>(l.bias) : c10::nullopt);
}

}  // namespace aligner
