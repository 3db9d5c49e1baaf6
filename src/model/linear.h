// Every projection in the model goes through this one type, so that adapters (LoRA) and tensor
// parallelism have a single place to hook in.
#pragma once
#include <ATen/ATen.h>

#include <initializer_list>
#include <memory>

namespace aligner {

struct TensorSplit;  // model/tensor_parallel.h

// A low-rank adapter (LoRA) beside a frozen weight: y = W x + scale * B (A dropout(x)). A and B are
// float32 master weights; they run in the activations' dtype.
struct Lora {
  at::Tensor a;  // [rank, in]
  at::Tensor b;  // [out, rank]
  double scale = 1;
  double dropout = 0;  // applied while gradients are recorded (training), as PEFT in train mode
};

// Adapter dropout applies in the training forward: while gradients are recorded, and in the first
// run of a checkpointed layer, which records none but must draw the masks its recomputation draws.
inline thread_local bool adapter_dropout_forced = false;
struct ForceAdapterDropout {
  bool before = adapter_dropout_forced;
  ForceAdapterDropout() { adapter_dropout_forced = true; }
  ~ForceAdapterDropout() { adapter_dropout_forced = before; }
};

// Tensor parallelism (model/tensor_parallel.h): a column-parallel projection holds some of the output rows
// (its input replicated, entered through tp_copy by the caller), a row-parallel one some of the input
// columns (its partial outputs summed over the group, the bias added once after).
enum class Split : uint8_t { kNone, kColumn, kRow };

struct Linear {
  at::Tensor weight;  // [out, in], as nn.Linear stores it
  at::Tensor bias;    // [out] or undefined
  Lora lora;          // undefined tensors: no adapter
  Split split = Split::kNone;
  bool shared = false;  // column-parallel rows that other ranks hold too (a replicated key/value head)
  std::shared_ptr<const TensorSplit> tp;
};

at::Tensor tensor_parallel_apply(const Linear& l, const at::Tensor& x);  // model/tensor_parallel.cpp

// Whether the adapter's dropout acts in this pass.
inline bool adapter_dropout_on(const Lora& lora) {
  return lora.dropout > 0 && (at::GradMode::is_enabled() || adapter_dropout_forced);
}

// y + scale B (A xd), xd the (dropped-out) input. The scale rides on the small A, and B's product adds
// into y inside one GEMM (addmm): no extra passes over the [tokens, out] activations.
inline at::Tensor add_adapter(const at::Tensor& y, const at::Tensor& xd, const at::Tensor& a,
                              const at::Tensor& b, double scale) {
  const auto t = xd.scalar_type();
  const auto xa = at::linear(xd, (a * scale).to(t));
  const int64_t out = y.size(-1);
  return at::addmm(y.reshape({-1, out}), xa.reshape({-1, xa.size(-1)}), b.to(t).t()).view(y.sizes());
}

inline at::Tensor apply(const Linear& l, const at::Tensor& x) {
  if (l.split != Split::kNone) return tensor_parallel_apply(l, x);
  auto y = at::linear(x, l.weight, l.bias.defined() ? c10::optional<at::Tensor>(l.bias) : c10::nullopt);
  if (!l.lora.a.defined()) return y;
  const auto xd = adapter_dropout_on(l.lora) ? at::dropout(x, l.lora.dropout, true) : x;
  return add_adapter(y, xd, l.lora.a, l.lora.b, l.lora.scale);
}

// Projections of one input as a single Linear whose output rows are theirs in order, when their
// weights (and biases) lie back to back in memory, as allocate_transformer lays them out; nullopt
// otherwise (weights replaced or loaded elsewhere, or a part has an adapter, which the joined weight
// would leave out). A view, not a copy: for inference only, as gradients through it would not reach
// the parts.
inline c10::optional<Linear> joined_linear(std::initializer_list<const Linear*> parts) {
  const Linear& first = **parts.begin();
  if (first.lora.a.defined()) return c10::nullopt;
  const bool bias = first.bias.defined();
  const auto next_to = [](const at::Tensor& a, const at::Tensor& b) {
    return a.is_contiguous() && b.is_contiguous() && a.scalar_type() == b.scalar_type() &&
           a.device() == b.device() && static_cast<const char*>(a.data_ptr()) + a.nbytes() == b.data_ptr();
  };
  int64_t rows = first.weight.size(0);
  const Linear* prev = &first;
  for (auto it = parts.begin() + 1; it != parts.end(); ++it) {
    const Linear& p = **it;
    if (p.lora.a.defined()) return c10::nullopt;
    if (p.weight.dim() != 2 || p.weight.size(1) != first.weight.size(1) || p.bias.defined() != bias ||
        !next_to(prev->weight, p.weight) || (bias && !next_to(prev->bias, p.bias)))
      return c10::nullopt;
    rows += p.weight.size(0);
    prev = &p;
  }
  const int64_t in = first.weight.size(1);
  // Joined rows are column-parallel alike (inference only: the shared rows' gradients do not matter).
  return Linear{first.weight.as_strided({rows, in}, {in, 1}),
                bias ? first.bias.as_strided({rows}, {1}) : at::Tensor(),
                Lora{},
                first.split,
                false,
                first.tp};
}

}  // namespace aligner
