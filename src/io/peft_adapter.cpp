#include "io/peft_adapter.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <map>

#include "core/error.h"
#include "core/json.h"
#include "io/safetensors.h"
#include "model/tensor_parallel.h"

namespace aligner {
namespace fs = std::filesystem;

namespace {

constexpr const char* kPrefix = "base_model.model.";

// The adapter's settings from adapter_config.json, refusing what would not load as PEFT loads it.
LoraConfig read_adapter_config(const std::string& path) {
  const auto j = read_json_file(path);
  if (!j.is_object()) fail("{}: expected a JSON object", path);
  auto number = [&](const char* key, double fallback) {
    if (!j.contains(key) || j[key].is_null()) return fallback;
    if (!j[key].is_number()) fail("{}: key '{}' must be a number", path, key);
    return j[key].get<double>();
  };
  auto flag = [&](const char* key) {
    if (!j.contains(key) || j[key].is_null()) return false;
    if (!j[key].is_boolean()) fail("{}: key '{}' must be true or false", path, key);
    return j[key].get<bool>();
  };
  auto refuse_set = [&](const char* key, const char* why) {
    if (j.contains(key) && !j[key].is_null() && !j[key].empty())
      fail("{}: key '{}' is set; aligner does not load {}", path, key, why);
  };
  if (j.contains("peft_type") && j["peft_type"] != "LORA")
    fail("{}: peft_type is {}, aligner loads LORA adapters only", path, j["peft_type"].dump());
  if (flag("use_dora")) fail("{}: key 'use_dora' is true; aligner does not load DoRA adapters", path);
  if (flag("fan_in_fan_out"))
    fail("{}: key 'fan_in_fan_out' is true (GPT-2 Conv1D layers), which aligner has not", path);
  if (j.contains("bias") && j["bias"] != "none")
    fail("{}: key 'bias' is {}; aligner loads adapters that train no biases (\"none\")", path,
         j["bias"].dump());
  refuse_set("rank_pattern", "per-module ranks");
  refuse_set("alpha_pattern", "per-module alphas");
  refuse_set("layers_to_transform", "adapters on some layers only");
  refuse_set("exclude_modules", "adapters that exclude modules");
  refuse_set("layer_replication", "replicated layers");
  refuse_set("trainable_token_indices", "trained token embeddings");
  if (flag("lora_bias")) fail("{}: key 'lora_bias' is true; aligner's adapters have no bias", path);
  if (flag("use_qalora")) fail("{}: key 'use_qalora' is true; aligner does not load QA-LoRA adapters", path);

  LoraConfig c;
  const double r = number("r", 8);
  if (r < 1 || r != double(int64_t(r))) fail("{}: key 'r' must be a positive integer, got {}", path, r);
  c.rank = int64_t(r);
  c.alpha = number("lora_alpha", 8);
  c.dropout = number("lora_dropout", 0);
  c.rslora = flag("use_rslora");
  c.gaussian_init = j.contains("init_lora_weights") && j["init_lora_weights"] == "gaussian";
  if (!j.contains("target_modules") || j["target_modules"].is_null())
    fail("{}: key 'target_modules' is missing", path);
  const auto& t = j["target_modules"];
  if (t.is_string()) {
    if (t != "all-linear")
      fail(
          "{}: key 'target_modules' is the pattern {}; aligner reads a list of module names or "
          "\"all-linear\"",
          path, t.dump());
    c.targets = kLoraTargets;
  } else if (t.is_array()) {
    for (const auto& e : t) {
      if (!e.is_string()) fail("{}: key 'target_modules' must list module names", path);
      // PEFT matches an entry against the end of each module's name: "self_attn.q_proj" is q_proj.
      const std::string name = e.get<std::string>(), last = name.substr(name.rfind('.') + 1);
      if (std::find(kLoraTargets.begin(), kLoraTargets.end(), last) == kLoraTargets.end())
        fail("{}: target module '{}' is not one of this model's projections ({})", path, name,
             fmt::join(kLoraTargets, ", "));
      if (std::find(c.targets.begin(), c.targets.end(), last) == c.targets.end()) c.targets.push_back(last);
    }
  } else {
    fail("{}: key 'target_modules' must be a list of module names or \"all-linear\"", path);
  }
  if (c.targets.empty()) fail("{}: key 'target_modules' is empty", path);
  return c;
}

}  // namespace

LoraConfig load_peft_adapter(Transformer& m, const std::string& dir) {
  const fs::path d(dir);
  if (!fs::exists(d / "adapter_config.json"))
    fail("{}: not a PEFT adapter folder (it has no adapter_config.json)", dir);
  const std::string weights = (d / "adapter_model.safetensors").string();
  if (!fs::exists(weights)) {
    if (fs::exists(d / "adapter_model.bin"))
      fail(
          "{}: the adapter is a pickle (adapter_model.bin), which aligner does not read; save it with "
          "safe_serialization=True",
          dir);
    fail("{}: no adapter_model.safetensors", dir);
  }
  if (has_adapters(m)) fail("{}: the model has adapters already", dir);
  const LoraConfig c = read_adapter_config((d / "adapter_config.json").string());
  const auto file = safetensors::File::open(weights);

  Transformer with = m;
  add_adapters(with, c, 0);
  std::map<std::string, at::Tensor> expected;
  for (auto& [name, t] : adapter_parameters(with)) expected.emplace(kPrefix + name, t);
  if (m.score.weight.defined()) expected.emplace(std::string(kPrefix) + "score.weight", m.score.weight);
  at::NoGradGuard no_grad;
  for (const auto& info : file.tensors()) {
    auto it = expected.find(info.name);
    if (it == expected.end())
      fail(
          "{}: tensor '{}' matches nothing in the base model (an adapter for another model, or of modules "
          "aligner does not adapt?)",
          weights, info.name);
    // A tensor-parallel model takes its slice of each whole tensor.
    const SliceSpec slice = m.tp ? tensor_slice(*m.tp, info.name.substr(std::strlen(kPrefix))) : SliceSpec{};
    const auto whole = whole_sizes(it->second.sizes(), slice);
    if (!at::IntArrayRef(whole).equals(info.shape))
      fail("{}: tensor '{}' is [{}], the base model needs [{}] (an adapter for another model?)", weights,
           info.name, fmt::join(info.shape, ", "), fmt::join(whole, ", "));
    it->second.copy_(take_slice(file.get(info.name), slice));
    expected.erase(it);
  }
  for (const auto& [name, t] : expected)
    if (name.find(".lora_") != std::string::npos)
      fail("{}: tensor '{}' is missing, though adapter_config.json targets its module", weights, name);
  m = std::move(with);
  return c;
}

Transformer load_adapted_model(const std::string& dir, const std::string& adapter_dir, at::Device device,
                               std::optional<at::ScalarType> dtype) {
  Transformer m = load_transformer(dir, device, dtype);
  if (!adapter_dir.empty()) load_peft_adapter(m, adapter_dir);
  return m;
}

void save_peft_adapter(const Transformer& m, const LoraConfig& c, const std::string& dir,
                       const std::string& base_model, const std::string& tokenizer_from, Replace replace) {
  if (m.tp) fail("cannot save one rank's slice of a tensor-parallel model's adapters as {}", dir);
  safetensors::NamedTensors tensors;
  for (const auto& [name, t] : adapter_parameters(m))
    tensors.emplace_back(kPrefix + name, t.detach().to(at::kCPU, at::kFloat));
  const bool classifier = m.score.weight.defined();
  if (classifier)
    tensors.emplace_back(std::string(kPrefix) + "score.weight", m.score.weight.detach().to(at::kCPU));
  nlohmann::json j = {
      {"peft_type", "LORA"},
      {"task_type", classifier ? "SEQ_CLS" : "CAUSAL_LM"},
      {"base_model_name_or_path", base_model},
      {"r", c.rank},
      {"lora_alpha", c.alpha},
      {"lora_dropout", c.dropout},
      {"target_modules", c.targets},
      {"bias", "none"},
      {"fan_in_fan_out", false},
      {"use_rslora", c.rslora},
      {"use_dora", false},
      {"init_lora_weights", c.gaussian_init ? nlohmann::json("gaussian") : nlohmann::json(true)},
      {"modules_to_save", classifier ? nlohmann::json::array({"score"}) : nlohmann::json(nullptr)},
      {"inference_mode", true},
  };
  save_folder(dir, replace, tokenizer_from, [&](const std::string& tmp) {
    safetensors::save((fs::path(tmp) / "adapter_model.safetensors").string(), tensors);
    write_text(fs::path(tmp) / "adapter_config.json", j.dump(2) + "\n");
  });
}

}  // namespace aligner
