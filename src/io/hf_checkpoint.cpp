#include "io/hf_checkpoint.h"

#include <ATen/CPUGeneratorImpl.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <set>

#include "core/error.h"
#include "core/log.h"
#include "io/safetensors.h"

namespace aligner {
namespace fs = std::filesystem;

at::ScalarType parse_dtype_name(const std::string& name, const std::string& what) {
  if (name == "float32" || name == "fp32") return at::kFloat;
  if (name == "bfloat16" || name == "bf16") return at::kBFloat16;
  if (name == "float16" || name == "fp16") return at::kHalf;
  fail("{}: unsupported dtype '{}' (supported: float32, bfloat16, float16)", what, name);
}

at::ScalarType parse_compute_dtype(const std::string& name, at::Device device, const std::string& what) {
  const at::ScalarType t = parse_dtype_name(name, what);
  if (t == at::kHalf && device.is_cpu())
    fail("{}: float16 does not run on the CPU (libtorch has no CPU float16 kernels); use bfloat16 or float32",
         what);
  return t;
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
// Tensors of the checkpoint that are neither used nor in `ignore` are errors. A tensor-parallel model
// reads its slice of each tensor alone from the memory-mapped file.
void read_weights(Transformer& m, const safetensors::Checkpoint& ckpt, const std::string& dir,
                  const std::set<std::string>& skip, const std::set<std::string>& ignore) {
  at::NoGradGuard no_grad;
  std::set<std::string> used;
  for (auto& [name, t] : checkpoint_tensors(m)) {
    if (skip.count(name)) continue;
    if (!ckpt.contains(name)) fail("{}: missing tensor '{}'", dir, name);
    const auto& info = ckpt.info(name);
    const SliceSpec slice = m.tp ? tensor_slice(*m.tp, name) : SliceSpec{};
    const auto expected = whole_sizes(t.sizes(), slice);
    if (at::IntArrayRef(info.shape) != at::IntArrayRef(expected))
      fail("{}: tensor '{}' has shape {} but config.json implies {}", dir, name, fmt::join(info.shape, "x"),
           fmt::join(expected, "x"));
    t.copy_(take_slice(ckpt.get(name), slice));
    used.insert(name);
  }
  for (const auto& name : ckpt.names()) {
    if (used.count(name) || ignore.count(name)) continue;
    // Old checkpoints store rotary tables: derived from the config, as transformers treats them.
    if (name.find("rotary_emb.inv_freq") == std::string::npos)
      fail("{}: unexpected tensor '{}' for model_type {}", dir, name, m.cfg.model_type);
  }
}

// The process's tensor-parallel split of a model of `cfg`, if any; errors name the folder.
std::shared_ptr<const TensorSplit> split_of(const ModelConfig& cfg, const std::string& dir,
                                            at::ScalarType dtype) {
  const TensorParallel* tp = process_tensor_parallel();
  if (!tp) return nullptr;
  // torch's Gloo sums no 16-bit floats.
  if (tp->group->device().is_cpu() && dtype != at::kFloat)
    fail("{}: tensor parallelism on CPU ranks runs in float32, not {}: set model.dtype=float32", dir,
         dtype_name(dtype));
  try {
    return make_tensor_split(cfg, *tp);
  } catch (const Error& e) {
    fail("{}: {}", dir, e.what());
  }
}

}  // namespace

Transformer load_transformer(const std::string& dir, at::Device device, std::optional<at::ScalarType> dtype) {
  if (!fs::is_directory(dir)) fail("model folder {} does not exist", dir);
  const std::string config_path = (fs::path(dir) / "config.json").string();
  const ModelConfig cfg = load_model_config(config_path);
  // Not an error: a model whose config names a stray end token still scores and trains.
  for (int64_t id : cfg.eos_token_ids)
    if (id < 0 || id >= cfg.vocab_size)
      log_warn("{}: eos_token_id {} is outside the vocabulary (vocab_size {}); generation never stops at it",
               config_path, id, cfg.vocab_size);
  auto ckpt = safetensors::Checkpoint::open_dir(dir);
  Transformer m =
      allocate_transformer(cfg, at::TensorOptions().dtype(dtype.value_or(cfg.dtype)).device(device),
                           split_of(cfg, dir, dtype.value_or(cfg.dtype)));
  // Some tied checkpoints still carry lm_head, derived from the embedding as transformers treats it.
  std::set<std::string> ignore;
  if (cfg.tie_word_embeddings && cfg.num_labels == 0) ignore.insert("lm_head.weight");
  read_weights(m, ckpt, dir, {}, ignore);
  return m;
}

Transformer load_reward_model(const std::string& dir, at::Device device, std::optional<at::ScalarType> dtype,
                              const std::vector<std::string>& labels, int64_t pad_token_id, uint64_t seed) {
  if (!fs::is_directory(dir)) fail("model folder {} does not exist", dir);
  const std::string config_path = (fs::path(dir) / "config.json").string();
  const ModelConfig lm = load_model_config(config_path);
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
      allocate_transformer(cfg, at::TensorOptions().dtype(dtype.value_or(cfg.dtype)).device(device),
                           split_of(cfg, dir, dtype.value_or(cfg.dtype)));
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

namespace {

// Written into every model folder save_transformer makes: what lets a later save replace the folder
// without --overwrite. A hidden file, so that listings and uploads of the folder stay as they were.
constexpr const char* kMarker = ".written-by-aligner";

// Tokenizer files copied from `tokenizer_from` (vocab.json and merges.txt: GPT-2-style and CLIP
// folders; preprocessor_config.json: how a CLIPModel folder's images are prepared).
constexpr const char* kTokenizerFiles[] = {
    "tokenizer.json",          "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "generation_config.json",  "chat_template.jinja",   "vocab.json",      "merges.txt",
    "preprocessor_config.json"};

}  // namespace

void write_text(const std::filesystem::path& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary);
  f << text;
  f.close();
  if (!f) fail("{}: write failed: {}", path.string(), std::strerror(errno));
}

void write_text_atomically(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) fail("{}: cannot create {}: {}", path, tmp, std::strerror(errno));
  bool ok = std::fwrite(text.data(), 1, text.size(), f) == text.size();
  ok = std::fclose(f) == 0 && ok;
  if (!ok || std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    std::remove(tmp.c_str());
    fail("{}: write failed: {}", path, std::strerror(err));
  }
}

namespace {

// Whether save_folder writes files (or a diffusion model's folders) of this name.
bool written_by_save(const std::string& name) {
  if (name == kMarker || name == "config.json" || name == "model.safetensors" ||
      name == "model.safetensors.index.json" || name == "adapter_config.json" ||
      name == "adapter_model.safetensors")
    return true;
  for (const char* diffusers : {"model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler",
                                "pytorch_lora_weights.safetensors"})
    if (name == diffusers) return true;
  if (name.rfind("model-", 0) == 0 && name.size() > 18 &&
      name.compare(name.size() - 12, 12, ".safetensors") == 0)
    return true;
  return std::find(std::begin(kTokenizerFiles), std::end(kTokenizerFiles), name) != std::end(kTokenizerFiles);
}

// `dir` as the path save_transformer replaces: absolute, through symlinks (so that a link to a
// folder elsewhere gets the new folder there), without a trailing "/" or ".", which name no folder
// entry that could be renamed.
fs::path target_path(const std::string& dir) {
  if (dir.empty()) fail("the output folder is an empty path");
  std::error_code ec;
  fs::path p = fs::weakly_canonical(fs::absolute(dir), ec);
  if (ec) fail("{}: cannot resolve the path: {}", dir, ec.message());
  if (!p.has_filename()) p = p.parent_path();
  if (!p.has_filename() || !p.has_parent_path() || p == p.root_path())
    fail("{}: cannot write a model folder over the root folder", dir);
  return p;
}

// Throws unless `replace` allows replacing what is at `target` now: nothing, an empty folder or a
// model folder of ours always; anything else only with Replace::anything. Never a folder that holds
// `source` (the model being converted), which replacing it would delete.
void check_target(const fs::path& target, const std::string& dir, Replace replace,
                  const std::string& source) {
  std::error_code ec;
  if (!source.empty()) {
    const fs::path from = fs::weakly_canonical(fs::absolute(source), ec);
    auto [t, f] = std::mismatch(target.begin(), target.end(), from.begin(), from.end());
    if (!ec && t == target.end() && f != from.end())
      fail("{}: holds {}, which is being read from; choose another output folder", dir, source);
  }
  const fs::file_status st = fs::symlink_status(target, ec);
  if (replace == Replace::anything || !fs::exists(st)) return;
  const char* hint = "pass --overwrite to replace it";
  if (!fs::is_directory(st)) fail("{}: exists and is not a folder; {}", dir, hint);
  bool marked = false, empty = true;
  for (const auto& entry : fs::directory_iterator(target, ec)) {
    const std::string name = entry.path().filename().string();
    if (!written_by_save(name))
      fail("{}: not a model folder written by aligner (it holds '{}'); {}", dir, name, hint);
    marked = marked || name == kMarker;
    empty = false;
  }
  if (ec) fail("{}: cannot list the folder: {}", dir, ec.message());
  if (!empty && !marked)
    fail("{}: not a model folder written by aligner (it has no {}); {}", dir, kMarker, hint);
}

// A new folder beside `target`, named after it and `kind`, that no one else has: mkdir fails rather
// than take a name that exists. (mkdtemp would make it 0700, and the model folder unreadable to others.)
fs::path scratch_folder(const fs::path& target, const char* kind) {
  std::random_device random;
  for (int attempt = 0; attempt < 100; ++attempt) {
    const fs::path p =
        target.parent_path() / fmt::format(".{}.{}-{:08x}", target.filename().string(), kind, random());
    if (::mkdir(p.c_str(), 0777) == 0) return p;
    if (errno != EEXIST) break;
  }
  fail("{}: cannot create a scratch folder beside it: {}", target.string(), std::strerror(errno));
}

// Puts the finished `tmp` at `target`, moving what was there aside first and deleting it after, so
// that a failure leaves the old contents under `target` and a crash leaves them beside it.
void move_into_place(const fs::path& tmp, const fs::path& target, const std::string& dir) {
  std::error_code ec;
  if (!fs::exists(fs::symlink_status(target, ec))) {
    fs::rename(tmp, target, ec);
    if (ec) fail("{}: cannot move the new folder into place: {}", dir, ec.message());
    return;
  }
  const fs::path old = scratch_folder(target, "old");
  fs::rename(target, old / target.filename(), ec);
  if (ec) {
    std::error_code ignored;
    fs::remove(old, ignored);
    fail("{}: cannot move the old contents aside: {}", dir, ec.message());
  }
  fs::rename(tmp, target, ec);
  if (ec) {
    std::error_code ignored;
    fs::rename(old / target.filename(), target, ignored);
    fs::remove(old, ignored);
    fail("{}: cannot move the new folder into place: {}", dir, ec.message());
  }
  fs::remove_all(old, ec);
  if (ec)
    fail("{}: written, but its old contents could not be deleted from {}: {}", dir, old.string(),
         ec.message());
}

void write_folder(const Transformer& m, const fs::path& tmp, at::ScalarType out_dtype,
                  int64_t max_shard_bytes) {
  safetensors::NamedTensors tensors;
  for (auto& [name, t] : checkpoint_tensors(m))
    tensors.emplace_back(name, t.detach().to(at::kCPU, out_dtype));
  safetensors::save_dir(tmp.string(), tensors, max_shard_bytes);

  nlohmann::json cfg = m.cfg.raw;
  // Keep whichever dtype key the input used, so 4.x and 5.x readers both see what they wrote.
  const char* key = cfg.contains("dtype") && !cfg.contains("torch_dtype") ? "dtype" : "torch_dtype";
  cfg[key] = dtype_name(out_dtype);
  write_text(tmp / "config.json", cfg.dump(2) + "\n");
}

void finish_folder(const fs::path& tmp, const std::string& tokenizer_from) {
  write_text(tmp / kMarker, "aligner wrote this model folder; a later save may replace it\n");
  if (!tokenizer_from.empty()) {
    for (const char* f : kTokenizerFiles) {
      const fs::path src = fs::path(tokenizer_from) / f;
      std::error_code ec;
      if (fs::exists(src)) fs::copy_file(src, tmp / f, fs::copy_options::overwrite_existing, ec);
      if (ec) fail("{}: cannot copy into the new model folder: {}", src.string(), ec.message());
    }
  }
}

}  // namespace

void check_model_folder_target(const std::string& dir, Replace replace, const std::string& source) {
  check_target(target_path(dir), dir, replace, source);
}

void save_transformer(const Transformer& m, const std::string& dir, std::optional<at::ScalarType> dtype,
                      int64_t max_shard_bytes, const std::string& tokenizer_from, Replace replace) {
  // Its config.json and shapes would be one rank's: the caller gathers it first (gather_transformer).
  if (m.tp) fail("cannot save one rank's slice of a tensor-parallel model as {}", dir);
  save_folder(dir, replace, tokenizer_from, [&](const std::string& tmp) {
    write_folder(m, tmp, dtype.value_or(m.cfg.dtype), max_shard_bytes);
  });
}

void save_folder(const std::string& dir, Replace replace, const std::string& tokenizer_from,
                 const std::function<void(const std::string& tmp)>& write) {
  const fs::path target = target_path(dir);
  check_target(target, dir, replace, tokenizer_from);
  std::error_code ec;
  fs::create_directories(target.parent_path(), ec);
  if (ec) fail("{}: cannot create the folder: {}", target.parent_path().string(), ec.message());
  const fs::path tmp = scratch_folder(target, "tmp");
  try {
    write(tmp.string());
    finish_folder(tmp, tokenizer_from);
    // Again: writing takes long enough for something to have appeared there.
    check_target(target, dir, replace, tokenizer_from);
    move_into_place(tmp, target, dir);
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }
}

}  // namespace aligner
