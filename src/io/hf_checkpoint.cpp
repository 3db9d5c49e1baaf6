#include "io/hf_checkpoint.h"

#include <filesystem>
#include <fstream>
#include <set>

#include "core/error.h"
#include "io/safetensors.h"

namespace aligner {
namespace fs = std::filesystem;

at::ScalarType parse_dtype_name(const std::string& name, const std::string& what) {
  if (name == "float32" || name == "fp32") return at::kFloat;
  if (name == "bfloat16" || name == "bf16") return at::kBFloat16;
  if (name == "float16" || name == "fp16") return at::kHalf;
  fail("{}: unsupported dtype '{}' (supported: float32, bfloat16, float16)", what, name);
}

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return "float32";
    case at::kBFloat16:
      return "bfloat16";
    case at::kHalf:
      return "float16";
    default:
      fail("unsupported model dtype {}", c10::toString(t));
  }
}

Transformer load_transformer(const std::string& dir, at::Device device, std::optional<at::ScalarType> dtype) {
  if (!fs::is_directory(dir)) fail("model folder {} does not exist", dir);
  const ModelConfig cfg = load_model_config((fs::path(dir) / "config.json").string());
  auto ckpt = safetensors::Checkpoint::open_dir(dir);
  Transformer m =
      allocate_transformer(cfg, at::TensorOptions().dtype(dtype.value_or(cfg.dtype)).device(device));

  at::NoGradGuard no_grad;
  std::set<std::string> used;
  for (auto& [name, t] : named_parameters(m)) {
    if (!ckpt.contains(name)) fail("{}: missing tensor '{}'", dir, name);
    const auto& info = ckpt.info(name);
    if (at::IntArrayRef(info.shape) != t.sizes())
      fail("{}: tensor '{}' has shape {} but config.json implies {}", dir, name, fmt::join(info.shape, "x"),
           fmt::join(t.sizes(), "x"));
    t.copy_(ckpt.get(name));
    used.insert(name);
  }
  for (const auto& name : ckpt.names()) {
    if (used.count(name)) continue;
    // Old checkpoints store rotary tables, and some tied ones still carry lm_head: both are
    // derived from other weights, as transformers treats them.
    const bool derived = name.find("rotary_emb.inv_freq") != std::string::npos ||
                         (cfg.tie_word_embeddings && name == "lm_head.weight");
    if (!derived) fail("{}: unexpected tensor '{}' for model_type {}", dir, name, cfg.model_type);
  }
  return m;
}

void save_transformer(const Transformer& m, const std::string& dir, std::optional<at::ScalarType> dtype,
                      int64_t max_shard_bytes, const std::string& tokenizer_from) {
  const at::ScalarType out_dtype = dtype.value_or(m.cfg.dtype);
  const fs::path final_dir(dir);
  const fs::path tmp = final_dir.string() + ".tmp";
  fs::remove_all(tmp);
  fs::create_directories(tmp);

  safetensors::NamedTensors tensors;
  for (auto& [name, t] : named_parameters(m)) tensors.emplace_back(name, t.detach().to(at::kCPU, out_dtype));
  safetensors::save_dir(tmp.string(), tensors, max_shard_bytes);

  nlohmann::json cfg = m.cfg.raw;
  // Keep whichever dtype key the input used, so 4.x and 5.x readers both see what they wrote.
  const char* key = cfg.contains("dtype") && !cfg.contains("torch_dtype") ? "dtype" : "torch_dtype";
  cfg[key] = dtype_name(out_dtype);
  std::ofstream(tmp / "config.json") << cfg.dump(2) << "\n";

  if (!tokenizer_from.empty()) {
    for (const char* f : {"tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                          "special_tokens_map.json", "generation_config.json"}) {
      const fs::path src = fs::path(tokenizer_from) / f;
      if (fs::exists(src)) fs::copy_file(src, tmp / f, fs::copy_options::overwrite_existing);
    }
  }
  const fs::path old = final_dir.string() + ".old";
  fs::remove_all(old);
  if (fs::exists(final_dir)) fs::rename(final_dir, old);
  fs::rename(tmp, final_dir);
  fs::remove_all(old);
}

}  // namespace aligner
