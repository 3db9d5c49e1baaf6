// Low-rank adapters (LoRA, Hu et al. 2021) on a frozen transformer, as PEFT defines them: each
// targeted projection W gets y = W x + (alpha / rank) B A dropout(x), A [rank, in] and B [out, rank]
// float32 master weights beside the base in its own dtype. The adapters live in the Linear structs
// (model/linear.h), so training, the cached forward and the CUDA decoder all run them.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "model/transformer.h"

namespace aligner {

struct LoraConfig {
  int64_t rank = 0;  // 0: no adapters
  double alpha = 16;
  double dropout = 0;
  std::vector<std::string> targets;  // projection names, from kLoraTargets
  // PEFT's init_lora_weights: true (A Kaiming-uniform, B zeros) or "gaussian" (A normal with std
  // 1 / rank, B zeros).
  bool gaussian_init = false;
  bool rslora = false;  // PEFT's use_rslora: scale alpha / sqrt(rank)
};

// The projections an adapter can target, by their Hugging Face module names.
extern const std::vector<std::string> kLoraTargets;

double lora_scale(const LoraConfig& c);

// Adds zero-effect adapters (B = 0) to every targeted projection, A drawn in float32 on the CPU
// from `seed` so that every rank and device starts alike, on the model's device. A tensor-parallel
// model's adapters are this rank's slices of the whole model's (model/tensor_parallel.h).
void add_adapters(Transformer& m, const LoraConfig& c, uint64_t seed);
// One projection's adapter as add_adapters makes it, A drawn from `gen` (float32, CPU): whole, then
// `spec`'s slice of it kept (a tensor-parallel rank's).
void init_adapter(Linear& l, const LoraConfig& c, at::Generator& gen, const SliceSpec& spec = {});
bool has_adapters(const Transformer& m);
// The settings of m's adapters as they are (rank, alpha = scale x rank, dropout, targets).
LoraConfig adapter_config(const Transformer& m);

// The adapters' tensors under PEFT's module names without its prefix:
// "model.layers.0.self_attn.q_proj.lora_A.weight", "...lora_B.weight"; in layer order.
std::vector<std::pair<std::string, at::Tensor>> adapter_parameters(const Transformer& m);
// The same, as the fields that hold them.
std::vector<std::pair<std::string, at::Tensor*>> adapter_slots(Transformer& m);
// The projections of `m` as (module name, Linear), e.g. ("model.layers.0.mlp.up_proj", up), in
// layer order; the name's last part is the projection's kLoraTargets entry.
std::vector<std::pair<std::string, Linear*>> layer_linears(Transformer& m);
std::vector<std::pair<std::string, const Linear*>> layer_linears(const Transformer& m);

// The same model without its adapters: the frozen base, sharing its tensors. What DPO, PPO,
// REINFORCE and SPIN use as the reference when training adapters: no second copy in memory.
Transformer without_adapters(const Transformer& m);
// The base weight with its adapter folded in, W + scale B A (in float32, then the weight's dtype).
at::Tensor merged_weight(const Linear& l);
// The model with every adapter folded into new weight tensors (those without adapters shared).
Transformer merged_copy(const Transformer& m);

}  // namespace aligner
