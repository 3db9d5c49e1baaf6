#include "model/lora.h"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "model/tensor_parallel.h"

namespace aligner {

const std::vector<std::string> kLoraTargets = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                               "gate_proj", "up_proj", "down_proj"};

double lora_scale(const LoraConfig& c) {
  return c.rslora ? c.alpha / std::sqrt(double(c.rank)) : c.alpha / double(c.rank);
}

namespace {

template <class M, class F>
void for_each_linear(M& m, F&& f) {
  for (size_t i = 0; i < m.layers.size(); ++i) {
    auto& b = m.layers[i];
    const std::string p = fmt::format("model.layers.{}.", i);
    f(p + "self_attn.q_proj", b.q);
    f(p + "self_attn.k_proj", b.k);
    f(p + "self_attn.v_proj", b.v);
    f(p + "self_attn.o_proj", b.o);
    f(p + "mlp.gate_proj", b.gate);
    f(p + "mlp.up_proj", b.up);
    f(p + "mlp.down_proj", b.down);
  }
}

std::string projection(const std::string& module) {
  return module.substr(module.rfind('.') + 1);
}

}  // namespace

std::vector<std::pair<std::string, Linear*>> layer_linears(Transformer& m) {
  std::vector<std::pair<std::string, Linear*>> out;
  for_each_linear(m, [&](const std::string& name, Linear& l) { out.emplace_back(name, &l); });
  return out;
}

std::vector<std::pair<std::string, const Linear*>> layer_linears(const Transformer& m) {
  std::vector<std::pair<std::string, const Linear*>> out;
  for_each_linear(m, [&](const std::string& name, const Linear& l) { out.emplace_back(name, &l); });
  return out;
}

void add_adapters(Transformer& m, const LoraConfig& c, uint64_t seed) {
  if (c.rank <= 0) fail("LoRA rank must be positive, got {}", c.rank);
  for (const auto& t : c.targets)
    if (std::find(kLoraTargets.begin(), kLoraTargets.end(), t) == kLoraTargets.end())
      fail("unknown LoRA target module '{}' (known: {}, or all-linear)", t, fmt::join(kLoraTargets, ", "));
  auto gen = at::detail::createCPUGenerator(seed);
  for (auto& [name, l] : layer_linears(m)) {
    if (!l->weight.defined() ||  // Nemotron has no gate_proj
        std::find(c.targets.begin(), c.targets.end(), projection(name)) == c.targets.end())
      continue;
    // Tensor parallel: A is drawn whole, as one rank draws it, and this rank's part of it kept (a
    // row-parallel projection's input columns), so that the generator's draws and A's values match.
    init_adapter(*l, c, gen, l->tp ? tensor_slice(*l->tp, name + ".lora_A.weight") : SliceSpec{});
  }
}

void init_adapter(Linear& l, const LoraConfig& c, at::Generator& gen, const SliceSpec& spec) {
  at::NoGradGuard no_grad;
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const int64_t out = l.weight.size(0), in = spec.dim == 1 ? spec.full_length : l.weight.size(1);
  // Kaiming-uniform with a = sqrt(5), nn.Linear's init that PEFT keeps: bound 1 / sqrt(in).
  auto a = c.gaussian_init ? at::normal(0.0, 1.0 / double(c.rank), {c.rank, in}, gen, f32)
                           : at::empty({c.rank, in}, f32)
                                 .uniform_(-1.0 / std::sqrt(double(in)), 1.0 / std::sqrt(double(in)), gen);
  l.lora.a = take_slice(a, spec).contiguous().to(l.weight.device());
  l.lora.b = at::zeros({out, c.rank}, f32.device(l.weight.device()));
  l.lora.scale = lora_scale(c);
  l.lora.dropout = c.dropout;
}

bool has_adapters(const Transformer& m) {
  bool any = false;
  for_each_linear(m, [&](const std::string&, const Linear& l) { any = any || l.lora.a.defined(); });
  return any;
}

LoraConfig adapter_config(const Transformer& m) {
  LoraConfig c;
  for_each_linear(m, [&](const std::string& name, const Linear& l) {
    if (!l.lora.a.defined()) return;
    c.rank = l.lora.a.size(0);
    c.alpha = l.lora.scale * double(c.rank);
    c.dropout = l.lora.dropout;
    const std::string p = projection(name);
    if (std::find(c.targets.begin(), c.targets.end(), p) == c.targets.end()) c.targets.push_back(p);
  });
  return c;
}

std::vector<std::pair<std::string, at::Tensor>> adapter_parameters(const Transformer& m) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for_each_linear(m, [&](const std::string& name, const Linear& l) {
    if (!l.lora.a.defined()) return;
    out.emplace_back(name + ".lora_A.weight", l.lora.a);
    out.emplace_back(name + ".lora_B.weight", l.lora.b);
  });
  return out;
}

std::vector<std::pair<std::string, at::Tensor*>> adapter_slots(Transformer& m) {
  std::vector<std::pair<std::string, at::Tensor*>> out;
  for_each_linear(m, [&](const std::string& name, Linear& l) {
    if (!l.lora.a.defined()) return;
    out.emplace_back(name + ".lora_A.weight", &l.lora.a);
    out.emplace_back(name + ".lora_B.weight", &l.lora.b);
  });
  return out;
}

Transformer without_adapters(const Transformer& m) {
  Transformer base = m;
  for_each_linear(base, [](const std::string&, Linear& l) { l.lora = Lora{}; });
  return base;
}

at::Tensor merged_weight(const Linear& l) {
  at::NoGradGuard no_grad;
  if (!l.lora.a.defined()) return l.weight;
  auto w = l.weight.to(at::kFloat) + at::mm(l.lora.b.to(at::kFloat), l.lora.a.to(at::kFloat)) * l.lora.scale;
  return w.to(l.weight.scalar_type());
}

Transformer merged_copy(const Transformer& m) {
  Transformer merged = m;
  for_each_linear(merged, [](const std::string&, Linear& l) {
    l.weight = merged_weight(l);
    l.lora = Lora{};
  });
  return merged;
}

}  // namespace aligner
