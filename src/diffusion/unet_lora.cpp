#include "diffusion/unet_lora.h"

#include <ATen/CPUGeneratorImpl.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>
#include <optional>

#include "core/error.h"
#include "io/safetensors.h"

namespace aligner {

const std::vector<std::string> kUNetLoraTargets = {"to_q", "to_k", "to_v", "to_out.0"};

namespace {

constexpr const char* kLoraFile = "pytorch_lora_weights.safetensors";

template <class T2D, class F>
void for_each_attention(T2D& attentions, const std::string& prefix, F&& f) {
  for (size_t j = 0; j < attentions.size(); ++j)
    for (size_t k = 0; k < attentions[j].transformer_blocks.size(); ++k) {
      auto& b = attentions[j].transformer_blocks[k];
      const std::string p = fmt::format("{}attentions.{}.transformer_blocks.{}.", prefix, j, k);
      for (const auto& [attn, name] : {std::pair{&b.attn1, "attn1"}, std::pair{&b.attn2, "attn2"}}) {
        f(p + name + ".to_q", attn->to_q);
        f(p + name + ".to_k", attn->to_k);
        f(p + name + ".to_v", attn->to_v);
        f(p + name + ".to_out.0", attn->to_out);
      }
    }
}

template <class U, class F>
void for_each_linear(U& u, F&& f) {
  for (size_t i = 0; i < u.down_blocks.size(); ++i)
    for_each_attention(u.down_blocks[i].attentions, fmt::format("down_blocks.{}.", i), f);
  for_each_attention(u.mid_block.attentions, "mid_block.", f);
  for (size_t i = 0; i < u.up_blocks.size(); ++i)
    for_each_attention(u.up_blocks[i].attentions, fmt::format("up_blocks.{}.", i), f);
}

// The target a module name ends with: "to_q", ..., "to_out.0".
std::string target_of(const std::string& module) {
  const auto ends = [&](const std::string& t) {
    return module.size() > t.size() &&
           module.compare(module.size() - t.size() - 1, t.size() + 1, "." + t) == 0;
  };
  for (const auto& t : kUNetLoraTargets)
    if (ends(t)) return t;
  return "";
}

bool strip_suffix(std::string& s, const std::string& suffix) {
  if (s.size() <= suffix.size() || s.compare(s.size() - suffix.size(), suffix.size(), suffix) != 0)
    return false;
  s.resize(s.size() - suffix.size());
  return true;
}

}  // namespace

std::vector<std::pair<std::string, Linear*>> unet_attention_linears(UNet& u) {
  std::vector<std::pair<std::string, Linear*>> out;
  for_each_linear(u, [&](const std::string& name, Linear& l) { out.emplace_back(name, &l); });
  return out;
}

std::vector<std::pair<std::string, const Linear*>> unet_attention_linears(const UNet& u) {
  std::vector<std::pair<std::string, const Linear*>> out;
  for_each_linear(u, [&](const std::string& name, const Linear& l) { out.emplace_back(name, &l); });
  return out;
}

void add_unet_adapters(UNet& u, const LoraConfig& c, uint64_t seed) {
  if (c.rank <= 0) fail("LoRA rank must be positive, got {}", c.rank);
  for (const auto& t : c.targets)
    if (std::find(kUNetLoraTargets.begin(), kUNetLoraTargets.end(), t) == kUNetLoraTargets.end())
      fail("unknown LoRA target module '{}' for a UNet (known: {})", t, fmt::join(kUNetLoraTargets, ", "));
  auto gen = at::detail::createCPUGenerator(seed);
  for (auto& [name, l] : unet_attention_linears(u))
    if (std::find(c.targets.begin(), c.targets.end(), target_of(name)) != c.targets.end())
      init_adapter(*l, c, gen);
}

std::vector<std::pair<std::string, at::Tensor>> unet_adapter_parameters(const UNet& u) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& [name, l] : unet_attention_linears(u)) {
    if (!l->lora.a.defined()) continue;
    out.emplace_back(name + ".lora_A.weight", l->lora.a);
    out.emplace_back(name + ".lora_B.weight", l->lora.b);
  }
  return out;
}

UNet unet_without_adapters(const UNet& u) {
  UNet base = u;
  for (auto& [name, l] : unet_attention_linears(base)) l->lora = Lora{};
  return base;
}

void save_unet_adapter(const UNet& u, const std::string& dir) {
  at::NoGradGuard no_grad;
  safetensors::NamedTensors tensors;
  for (const auto& [name, l] : unet_attention_linears(u)) {
    if (!l->lora.a.defined()) continue;
    tensors.emplace_back("unet." + name + ".lora.down.weight", l->lora.a.to(at::kFloat).contiguous());
    tensors.emplace_back("unet." + name + ".lora.up.weight",
                         (l->lora.b.to(at::kFloat) * l->lora.scale).contiguous());
  }
  if (tensors.empty()) fail("{}: the UNet has no adapters to save", dir);
  std::filesystem::create_directories(dir);
  safetensors::save((std::filesystem::path(dir) / kLoraFile).string(), tensors);
}

void load_unet_adapter(UNet& u, const std::string& dir) {
  const std::string path = (std::filesystem::path(dir) / kLoraFile).string();
  const auto file = safetensors::File::open(path);
  // Newer diffusers store PEFT's LoraConfig in the header ("unet.lora_alpha", or unprefixed from
  // save_lora_adapter) rather than an .alpha tensor per module: the scale is alpha / r from there.
  std::optional<double> config_scale;
  if (const auto it = file.metadata().find("lora_adapter_metadata"); it != file.metadata().end()) {
    const auto meta = nlohmann::json::parse(it->second, nullptr, /*allow_exceptions=*/false);
    if (!meta.is_object()) fail("{}: lora_adapter_metadata is not a JSON object", path);
    const auto value = [&](const std::string& key) -> const nlohmann::json* {
      for (const std::string& k : {"unet." + key, key})
        if (meta.contains(k) && !meta[k].is_null()) return &meta[k];
      return nullptr;
    };
    for (const char* pattern : {"rank_pattern", "alpha_pattern"})
      if (const auto* v = value(pattern); v && !(v->is_object() && v->empty()))
        fail("{}: lora_adapter_metadata sets {}, per-module ranks or alphas, which aligner does not read",
             path, pattern);
    const auto* alpha = value("lora_alpha");
    const auto* r = value("r");
    if (alpha && r) {
      if (!alpha->is_number() || !r->is_number_integer() || r->get<int64_t>() <= 0)
        fail("{}: lora_adapter_metadata's lora_alpha {} and r {} are not a number and a positive integer",
             path, alpha->dump(), r->dump());
      const auto* rs = value("use_rslora");
      const double rank = double(r->get<int64_t>());
      config_scale =
          alpha->get<double>() / (rs && rs->is_boolean() && rs->get<bool>() ? std::sqrt(rank) : rank);
    }
  }
  struct Parts {
    at::Tensor a, b, alpha;
  };
  std::map<std::string, Parts> modules;
  for (const auto& info : file.tensors()) {
    std::string name = info.name;
    if (name.rfind("text_encoder", 0) == 0)
      fail("{}: tensor '{}' adapts the text encoder, which aligner does not run adapted", path, info.name);
    if (name.rfind("unet.", 0) == 0) name = name.substr(5);
    at::Tensor* slot = nullptr;
    if (strip_suffix(name, ".lora.down.weight") || strip_suffix(name, ".lora_A.weight"))
      slot = &modules[name].a;
    else if (strip_suffix(name, ".lora.up.weight") || strip_suffix(name, ".lora_B.weight"))
      slot = &modules[name].b;
    else if (strip_suffix(name, ".alpha"))
      slot = &modules[name].alpha;
    else
      fail("{}: tensor '{}' is not a LoRA down, up or alpha tensor", path, info.name);
    if (slot->defined()) fail("{}: module '{}' has two tensors of one kind ('{}')", path, name, info.name);
    if (!at::isFloatingType(info.dtype))
      fail("{}: tensor '{}' is {}, not a floating-point type", path, info.name,
           safetensors::dtype_to_string(info.dtype));
    *slot = file.get(info.name);
  }
  std::map<std::string, Linear*> linears;
  for (auto& [name, l] : unet_attention_linears(u)) linears.emplace(name, l);
  for (const auto& [name, p] : modules) {
    const auto it = linears.find(name);
    if (it == linears.end()) fail("{}: the UNet has no attention projection '{}'", path, name);
    Linear& l = *it->second;
    if (!p.a.defined() || !p.b.defined())
      fail("{}: module '{}' lacks its {} tensor", path, name, p.a.defined() ? "up" : "down");
    const int64_t out = l.weight.size(0), in = l.weight.size(1);
    if (p.a.dim() != 2 || p.b.dim() != 2 || p.a.size(1) != in || p.b.size(0) != out ||
        p.a.size(0) != p.b.size(1) || p.a.size(0) == 0)
      fail("{}: module '{}' has down [{}] and up [{}], which do not fit its [{}, {}] weight", path, name,
           fmt::join(p.a.sizes(), ", "), fmt::join(p.b.sizes(), ", "), out, in);
    const int64_t rank = p.a.size(0);
    double scale = config_scale.value_or(1.0);
    if (p.alpha.defined()) {
      if (p.alpha.numel() != 1) fail("{}: '{}.alpha' must hold one number", path, name);
      scale = p.alpha.to(at::kDouble).item<double>() / double(rank);
      if (!std::isfinite(scale)) fail("{}: '{}.alpha' is not a finite number", path, name);
    }
    const auto f32 = at::TensorOptions().dtype(at::kFloat).device(l.weight.device());
    l.lora.a = p.a.to(f32).clone();
    l.lora.b = p.b.to(f32).clone();
    l.lora.scale = scale;
    l.lora.dropout = 0;
  }
}

}  // namespace aligner
