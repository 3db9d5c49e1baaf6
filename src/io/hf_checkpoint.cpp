#include "io/hf_checkpoint.h"

#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
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

at::Device parse_device_name(const std::string& name, const std::string& what) {
  if (name == "cpu") return at::kCPU;
  if (name != "auto" && name != "cuda") fail("{}: expected auto, cpu or cuda, got '{}'", what, name);
  if (at::hasCUDA()) return at::kCUDA;
  if (name == "cuda") fail("{} is cuda, but this build of aligner has no CUDA or no GPU is visible", what);
  return at::kCPU;
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

namespace {

// Copies every weight of `m` from the checkpoint but those in `skip`, checking names and shapes.
// Tensors of the checkpoint that are neither used nor in `ignore` are errors.
void read_weights(Transformer& m, const safetensors::Checkpoint& ckpt, const std::string& dir,
                  const std::set<std::string>& skip, const std::set<std::string>& ignore) {
  at::NoGradGuard no_grad;
  std::set<std::string> used;
  for (auto& [name, t] : named_parameters(m)) {
    if (skip.count(name)) continue;
    if (!ckpt.contains(name)) fail("{}: missing tensor '{}'", dir, name);
    const auto& info = ckpt.info(name);
    if (at::IntArrayRef(info.shape) != t.sizes())
      fail("{}: tensor '{}' has shape {} but config.json implies {}", dir, name, fmt::join(info.shape, "x"),
           fmt::join(t.sizes(), "x"));
    t.copy_(ckpt.get(name));
    used.insert(name);
  }
  for (const auto& name : ckpt.names()) {
    if (used.count(name) || ignore.count(name)) continue;
    // Old checkpoints store rotary tables: derived from the config, as transformers treats them.
    if (name.find("rotary_emb.inv_freq") == std::string::npos)
      fail("{}: unexpected tensor '{}' for model_type {}", dir, name, m.cfg.model_type);
  }
}

}  // namespace

Transformer load_transformer(const std::string& dir, at::Device device, std::optional<at::ScalarType> dtype) {
  if (!fs::is_directory(dir)) fail("model folder {} does not exist", dir);
  const ModelConfig cfg = load_model_config((fs::path(dir) / "config.json").string());
  auto ckpt = safetensors::Checkpoint::open_dir(dir);
  Transformer m =
      allocate_transformer(cfg, at::TensorOptions().dtype(dtype.value_or(cfg.dtype)).device(device));
  // Some tied checkpoints still carry lm_head, derived from the embedding as transformers treats it.
  std::set<std::string> ignore;
  if (cfg.tie_word_embeddings && cfg.num_labels == 0) ignore.insert("lm_head.weight");
  read_weights(m, ckpt, dir, {}, ignore);
  return m;
}

Transformer load_reward_model(const std::string& dir, at::Device device, std::optional<at::ScalarType> dtype,
                              const std::vector<std::string>& labels, int64_t pad_token_id, uint64_t seed) {
  if (!fs::is_directory(dir)) fail("model folder {} does not exist", dir);
  const ModelConfig lm = load_model_config((fs::path(dir) / "config.json").string());
  if (lm.num_labels > 0) {
    if (lm.num_labels != int64_t(labels.size()))
      fail("{} is a reward model with {} outputs ({}), but {} are asked for ({})", dir, lm.num_labels,
           fmt::join(lm.labels, ", "), labels.size(), fmt::join(labels, ", "));
    Transformer m = load_transformer(dir, device, dtype);
    // The outputs keep their weights and take the names they are trained on now.
    m.cfg = sequence_classifier_config(m.cfg, labels, pad_token_id);
    return m;
  }
  const ModelConfig cfg = sequence_classifier_config(lm, labels, pad_token_id);
  Transformer m =
      allocate_transformer(cfg, at::TensorOptions().dtype(dtype.value_or(cfg.dtype)).device(device));
  read_weights(m, safetensors::Checkpoint::open_dir(dir), dir, {"score.weight"}, {"lm_head.weight"});
  // std 1/sqrt(hidden + 1), as Ziegler et al. (lm-human-preferences) start their reward head: each
  // output starts with about unit variance for unit-RMS hidden states (the final RMSNorm's), so the
  // first pairwise losses are informative, yet no output dominates. Drawn in float32 on the CPU
  // from `seed`, like init_transformer.
  auto gen = at::detail::createCPUGenerator(seed);
  at::NoGradGuard no_grad;
  m.score.weight.copy_(at::normal(0.0, 1.0 / std::sqrt(double(cfg.hidden_size) + 1), m.score.weight.sizes(),
                                  gen, at::TensorOptions().dtype(at::kFloat)));
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
