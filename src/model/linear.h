// Every projection in the model goes through this one type, so that adapters (LoRA) and tensor
// parallelism have a single place to hook in.
#pragma once
#include <ATen/ATen.h>

#include <initializer_list>

namespace aligner {

struct Linear {
  at::Tensor weight;  // [out, in], as nn.Linear stores it
  at::Tensor bias;    // [out] or undefined
};

inline at::Tensor apply(const Linear& l, const at::Tensor& x) {
  return at::linear(x, l.weight, l.bias.defined() ? c10::optional<at::Tensor>(l.bias) : c10::nullopt);
}

// Projections of one input as a single Linear whose output rows are theirs in order, when their
// weights (and biases) lie back to back in memory, as allocate_transformer lays them out; nullopt
// otherwise (weights replaced or loaded elsewhere). A view, not a copy: for inference only, as
// gradients through it would not reach the parts.
inline c10::optional<Linear> joined_linear(std::initializer_list<const Linear*> parts) {
  const Linear& first = **parts.begin();
  const bool bias = first.bias.defined();
  const auto next_to = [](const at::Tensor& a, const at::Tensor& b) {
    return a.is_contiguous() && b.is_contiguous() && a.scalar_type() == b.scalar_type() &&
           a.device() == b.device() && static_cast<const char*>(a.data_ptr()) + a.nbytes() == b.data_ptr();
  };
  int64_t rows = first.weight.size(0);
  const Linear* prev = &first;
  for (auto it = parts.begin() + 1; it != parts.end(); ++it) {
    const Linear& p = **it;
    if (p.weight.dim() != 2 || p.weight.size(1) != first.weight.size(1) || p.bias.defined() != bias ||
        !next_to(prev->weight, p.weight) || (bias && !next_to(prev->bias, p.bias)))
      return c10::nullopt;
    rows += p.weight.size(0);
    prev = &p;
  }
  const int64_t in = first.weight.size(1);
  return Linear{first.weight.as_strided({rows, in}, {in, 1}),
                bias ? first.bias.as_strided({rows}, {1}) : at::Tensor()};
}

}  // namespace aligner
