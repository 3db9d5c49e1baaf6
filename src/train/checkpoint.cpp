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

void save_checkpoint(const std::string& output_dir, const std::vector<CheckpointModule>& modules,
                     const CheckpointState& state, int64_t keep_last) {
  const fs::path root = fs::path(output_dir) / "checkpoints";
  const fs::path final_dir = root / fmt::format("step_{}", state.step);
  const fs::path tmp = root / fmt::format("step_{}.tmp", state.step);
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  for (const auto& m : modules) {
    if (m.whole_model) {
      save_transformer(*m.model, (tmp / m.name).string(), std::nullopt, 0, m.tokenizer_dir);
    } else {
      fs::create_directories(tmp / m.name);
      safetensors::save((tmp / m.name / "trainable.safetensors").string(), m.params);
    }
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

safetensors::NamedTensors read_module_params(const std::string& dir, const std::string& module) {
  const fs::path folder = fs::path(dir) / module;
  if (fs::exists(folder / "trainable.safetensors")) return read_file(folder / "trainable.safetensors");
  // A Hugging Face folder: its tensors as the model names its parameters (experts stacked).
  return named_parameters(load_transformer(folder.string(), at::kCPU));
}

safetensors::NamedTensors read_module_optimizer(const std::string& dir, const std::string& module) {
  return read_file(fs::path(dir) / (module + ".optimizer.safetensors"));
}

}  // namespace aligner
