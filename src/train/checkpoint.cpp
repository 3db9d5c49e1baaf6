#include "train/checkpoint.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <regex>

#include "core/crc32c.h"
#include "core/error.h"
#include "core/json.h"
#include "core/log.h"
#include "io/hf_checkpoint.h"

namespace aligner {
namespace fs = std::filesystem;
namespace {

// Complete checkpoints, oldest first, by step number.
std::vector<std::pair<int64_t, fs::path>> list_checkpoints(const std::string& output_dir) {
  std::vector<std::pair<int64_t, fs::path>> out;
  const fs::path root = fs::path(output_dir) / "checkpoints";
  std::error_code ec;
  if (!fs::is_directory(root, ec)) return out;
  static const std::regex name("step_([0-9]+)");
  for (const auto& e : fs::directory_iterator(root)) {
    std::smatch m;
    const std::string file = e.path().filename().string();
    if (e.is_directory() && std::regex_match(file, m, name) && fs::exists(e.path() / "trainer_state.json"))
      out.emplace_back(std::stoll(m[1]), e.path());
  }
  std::sort(out.begin(), out.end());
  return out;
}

safetensors::NamedTensors read_file(const fs::path& path) {
  auto f = safetensors::File::open(path.string());
  safetensors::NamedTensors out;
  for (const auto& info : f.tensors()) out.emplace_back(info.name, f.get(info.name));
  return out;
}

}  // namespace

std::string checkpoint_tmp_dir(const std::string& output_dir, int64_t step) {
  return (fs::path(output_dir) / "checkpoints" / fmt::format("step_{}.tmp", step)).string();
}

std::string begin_checkpoint(const std::string& output_dir, int64_t step) {
  const fs::path tmp = checkpoint_tmp_dir(output_dir, step);
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  return tmp.string();
}

namespace {

void write_pieces(const fs::path& path, const safetensors::NamedTensors& tensors,
                  const std::map<std::string, int64_t>& offsets) {
  safetensors::save(path.string(), tensors, {{"format", "pt"}, {"offsets", nlohmann::json(offsets).dump()}});
}

std::string rank_file(const std::string& stem, int rank, int world) {
  return fmt::format("{}.rank-{:05d}-of-{:05d}.safetensors", stem, rank, world);
}

}  // namespace

void write_optimizer_shard(const std::string& tmp_dir, const std::string& module, int rank, int world,
                           const safetensors::NamedTensors& state,
                           const std::map<std::string, int64_t>& offsets) {
  write_pieces(fs::path(tmp_dir) / rank_file(module + ".optimizer", rank, world), state, offsets);
}

void write_weight_shard(const std::string& tmp_dir, const std::string& module, int rank, int world,
                        const safetensors::NamedTensors& pieces,
                        const std::map<std::string, int64_t>& offsets) {
  fs::create_directories(fs::path(tmp_dir) / module);
  write_pieces(fs::path(tmp_dir) / module / rank_file("trainable", rank, world), pieces, offsets);
}

void save_checkpoint(const std::string& output_dir, const std::vector<CheckpointModule>& modules,
                     const CheckpointState& state, int64_t keep_last) {
  const fs::path root = fs::path(output_dir) / "checkpoints";
  const fs::path final_dir = root / fmt::format("step_{}", state.step);
  const fs::path tmp = root / fmt::format("step_{}.tmp", state.step);
  if (!fs::is_directory(tmp)) fail("{} was not begun (begin_checkpoint)", tmp.string());
  for (const auto& m : modules) {
    if (m.sharded_params) {
      // Each rank has written its pieces into NAME/.
    } else if (m.whole_model) {
      save_transformer(*m.model, (tmp / m.name).string(), std::nullopt, 0, m.tokenizer_dir);
    } else {
      fs::create_directories(tmp / m.name);
      safetensors::save((tmp / m.name / "trainable.safetensors").string(), m.params);
    }
    if (!m.optimizer_state.empty())
      safetensors::save((tmp / (m.name + ".optimizer.safetensors")).string(), m.optimizer_state);
  }
  nlohmann::json files = nlohmann::json::object();
  for (const auto& e : fs::recursive_directory_iterator(tmp)) {
    if (!e.is_regular_file()) continue;
    const auto d = file_digest(e.path().string());
    files[fs::relative(e.path(), tmp).generic_string()] = {{"bytes", d.bytes}, {"crc32c", d.crc32c}};
  }
  {
    std::ofstream f(tmp / "trainer_state.json");
    f << nlohmann::json{{"step", state.step},
                        {"world_size", state.world_size},
                        {"modules", state.modules},
                        {"data", state.data},
                        {"files", files}}
             .dump(2)
      << "\n";
    if (!f) fail("cannot write {}", (tmp / "trainer_state.json").string());
  }
  fs::remove_all(final_dir);
  fs::rename(tmp, final_dir);
  if (keep_last > 0) {
    auto all = list_checkpoints(output_dir);
    for (size_t i = 0; i + keep_last < all.size(); ++i) fs::remove_all(all[i].second);
  }
}

namespace {

// A copy on the CPU that training cannot change (.to(kCPU) alone would alias CPU tensors); from a
// GPU into pinned memory, which copies at the bus's speed and which torch's host allocator keeps
// for the next checkpoint's copy.
at::Tensor host_copy(const at::Tensor& t) {
  auto out =
      at::empty(t.sizes(), t.options().device(at::kCPU).pinned_memory(t.is_cuda()).requires_grad(false));
  out.copy_(t.detach());
  return out;
}

safetensors::NamedTensors host_copy(const safetensors::NamedTensors& tensors) {
  safetensors::NamedTensors out;
  out.reserve(tensors.size());
  for (const auto& [name, t] : tensors) out.emplace_back(name, host_copy(t));
  return out;
}

Transformer host_copy(const Transformer& m) {
  const auto live = named_parameters(m);
  const auto& first = live.front().second;
  Transformer copy =
      allocate_like(m, at::TensorOptions().dtype(first.scalar_type()).pinned_memory(first.is_cuda()));
  const auto copied = named_parameters(copy);
  if (copied.size() != live.size())
    fail("checkpoint: a copy of the model has {} tensors, the model {}", copied.size(), live.size());
  for (size_t i = 0; i < live.size(); ++i) {
    const auto& from = live[i].second;
    auto to = copied[i].second;
    if (to.scalar_type() == from.scalar_type())
      to.copy_(from.detach());
    else  // a tensor kept in another dtype than the first (set_data reaches the model's own handle)
      to.set_data(host_copy(from));
  }
  return copy;
}

}  // namespace

CheckpointWriter::~CheckpointWriter() {
  try {
    wait();
  } catch (const std::exception& e) {
    log_warn("the last checkpoint was not written: {}", e.what());
  }
}

void CheckpointWriter::wait() {
  if (thread_.joinable()) thread_.join();
  if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
}

void CheckpointWriter::write(const std::string& output_dir, const std::vector<CheckpointModule>& modules,
                             const CheckpointState& state, int64_t keep_last) {
  wait();
  at::NoGradGuard no_grad;
  auto models = std::make_shared<std::vector<Transformer>>();
  models->reserve(modules.size());
  std::vector<CheckpointModule> snapshot;
  for (const auto& m : modules) {
    // What save_checkpoint writes of the module, nothing more: the model of a whole one, else its
    // trained tensors (or nothing, when each rank has written its pieces already).
    CheckpointModule c = m;
    c.params.clear();
    c.optimizer_state = host_copy(m.optimizer_state);
    if (m.whole_model && !m.sharded_params) {
      models->push_back(host_copy(*m.model));
      c.model = &models->back();
    } else if (!m.sharded_params) {
      c.params = host_copy(m.params);
    }
    snapshot.push_back(std::move(c));
  }
  thread_ = std::thread([this, output_dir, snapshot = std::move(snapshot), models, state, keep_last] {
    try {
      save_checkpoint(output_dir, snapshot, state, keep_last);
    } catch (...) {
      error_ = std::current_exception();
    }
  });
}

std::string checkpoint_problem(const std::string& dir) {
  const fs::path state = fs::path(dir) / "trainer_state.json";
  nlohmann::json files;
  try {
    files = read_json_file(state.string()).at("files");
    for (const auto& [name, expected] : files.items()) {
      const fs::path path = fs::path(dir) / name;
      std::error_code ec;
      const auto bytes = fs::file_size(path, ec);
      if (ec) return fmt::format("{} is missing", path.string());
      if (bytes != expected.at("bytes").get<uint64_t>())
        return fmt::format("{} has {} bytes, {} were written", path.string(), bytes,
                           expected.at("bytes").get<uint64_t>());
      if (file_digest(path.string()).crc32c != expected.at("crc32c").get<uint32_t>())
        return fmt::format("{} does not match the checksum written with it", path.string());
    }
  } catch (const nlohmann::json::exception& e) {
    return fmt::format("{} is damaged: {}", state.string(), e.what());
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

std::string latest_checkpoint(const std::string& output_dir) {
  auto all = list_checkpoints(output_dir);
  for (auto it = all.rbegin(); it != all.rend(); ++it) {
    const std::string dir = it->second.string();
    const std::string problem = checkpoint_problem(dir);
    if (problem.empty()) return dir;
    log_warn("skipping checkpoint {}: {}", dir, problem);
  }
  if (!all.empty())
    fail("every checkpoint in {} is damaged (see the warnings above); resume=false starts afresh",
         (fs::path(output_dir) / "checkpoints").string());
  return "";
}

CheckpointState read_checkpoint_state(const std::string& dir) {
  const std::string path = (fs::path(dir) / "trainer_state.json").string();
  const auto j = read_json_file(path);
  try {
    if (!j.contains("modules"))
      fail("{}: written by an older aligner without per-module state; resume=false starts afresh", path);
    CheckpointState s;
    s.step = j.at("step").get<int64_t>();
    s.world_size = j.at("world_size").get<int64_t>();
    s.modules = j.at("modules").get<std::vector<std::string>>();
    s.data = j.at("data").get<std::vector<nlohmann::json>>();
    if (int64_t(s.data.size()) != s.world_size)
      fail("{}: {} data positions for {} ranks", path, s.data.size(), s.world_size);
    return s;
  } catch (const nlohmann::json::exception& e) {
    fail("{}: corrupt trainer state: {}", path, e.what());
  }
}

namespace {

// A file of pieces of parameters' tensors, with each parameter's offset (a whole file: all 0).
struct Source {
  safetensors::File file;
  std::map<std::string, int64_t> offsets;
};

// `whole` if it exists (every tensor whole), else the files `stem`.rank-*.safetensors in `folder`.
std::vector<Source> piece_sources(const fs::path& whole, const fs::path& folder, const std::string& stem) {
  std::vector<Source> sources;
  if (!whole.empty() && fs::exists(whole)) {
    sources.push_back({safetensors::File::open(whole.string()), {}});
    return sources;
  }
  const std::string prefix = stem + ".rank-", suffix = ".safetensors";
  std::error_code ec;
  if (!fs::is_directory(folder, ec)) return sources;
  for (const auto& e : fs::directory_iterator(folder)) {
    const std::string name = e.path().filename().string();
    if (name.rfind(prefix, 0) != 0 || name.size() < prefix.size() + suffix.size() ||
        name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0)
      continue;
    auto f = safetensors::File::open(e.path().string());
    const auto it = f.metadata().find("offsets");
    if (it == f.metadata().end()) fail("{}: no \"offsets\" in its metadata", e.path().string());
    try {
      sources.push_back({f, nlohmann::json::parse(it->second).get<std::map<std::string, int64_t>>()});
    } catch (const nlohmann::json::exception& err) {
      fail("{}: bad \"offsets\" metadata: {}", e.path().string(), err.what());
    }
  }
  return sources;
}

// The tensors `expected` names, shaped as it has them: tensor `key` is the range [offset, offset +
// numel) of its parameter's (param_of(key), offsets by parameter; absent: 0), put together from
// the sources' pieces. One absent from every source is left out (the caller names it); one only
// partly covered is an error.
template <class ParamOf>
safetensors::NamedTensors assemble(const std::vector<Source>& sources,
                                   const safetensors::NamedTensors& expected,
                                   const std::map<std::string, int64_t>& offsets, ParamOf param_of,
                                   const std::string& what) {
  safetensors::NamedTensors out;
  for (const auto& [key, like] : expected) {
    const std::string param = param_of(key);
    const auto o = offsets.find(param);
    const int64_t begin = o == offsets.end() ? 0 : o->second, end = begin + like.numel();
    at::Tensor piece;
    int64_t covered = 0;
    for (const auto& src : sources) {
      if (!src.file.contains(key)) continue;
      const auto t = src.file.get(key).reshape({-1});
      const auto so = src.offsets.find(param);
      const int64_t from = so == src.offsets.end() ? 0 : so->second;
      const int64_t lo = std::max(begin, from), hi = std::min(end, from + t.numel());
      if (lo >= hi) continue;
      if (!piece.defined()) piece = at::empty({like.numel()}, t.options());
      if (t.scalar_type() != piece.scalar_type())
        fail("{}: '{}' is {}, other shards hold it as {}", src.file.path(), key, dtype_name(t.scalar_type()),
             dtype_name(piece.scalar_type()));
      piece.narrow(0, lo - begin, hi - lo).copy_(t.narrow(0, lo - from, hi - lo));
      covered += hi - lo;
    }
    if (!piece.defined()) continue;
    if (covered != like.numel())
      fail("{} '{}' covers {} of the {} elements this rank needs", what, key, covered, like.numel());
    out.emplace_back(key, piece.view(like.sizes()));
  }
  return out;
}

}  // namespace

safetensors::NamedTensors read_module_params(const std::string& dir, const std::string& module,
                                             const safetensors::NamedTensors& expected) {
  const fs::path folder = fs::path(dir) / module;
  if (fs::exists(folder / "trainable.safetensors")) return read_file(folder / "trainable.safetensors");
  // Pieces written by each rank of a sharded run: whole tensors put together from them.
  const auto pieces = piece_sources({}, folder, "trainable");
  if (!pieces.empty())
    return assemble(
        pieces, expected, {}, [](const std::string& key) { return key; },
        fmt::format("checkpoint {}: the weight of module '{}'", dir, module));
  // A Hugging Face folder: its tensors as the model names its parameters (experts stacked).
  return named_parameters(load_transformer(folder.string(), at::kCPU));
}

safetensors::NamedTensors read_module_optimizer(const std::string& dir, const std::string& module,
                                                const safetensors::NamedTensors& expected,
                                                const std::map<std::string, int64_t>& offsets) {
  const auto sources =
      piece_sources(fs::path(dir) / (module + ".optimizer.safetensors"), dir, module + ".optimizer");
  if (sources.empty()) fail("checkpoint {}: no optimizer state for module '{}'", dir, module);
  safetensors::NamedTensors out, moments;
  for (const auto& [key, like] : expected) {
    if (key != "step") {
      moments.emplace_back(key, like);
      continue;
    }
    if (!sources.front().file.contains(key)) fail("{}: no tensor 'step'", sources.front().file.path());
    out.emplace_back(key, sources.front().file.get(key));
  }
  // "exp_avg.<parameter>": the piece [offset, offset + numel) of the parameter's state.
  for (auto& t : assemble(
           sources, moments, offsets, [](const std::string& key) { return key.substr(key.find('.') + 1); },
           fmt::format("checkpoint {}: the optimizer state of module '{}',", dir, module)))
    out.push_back(std::move(t));
  return out;
}

}  // namespace aligner
