#include "train/checkpoint.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <regex>

#include "core/error.h"
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

}  // namespace

void save_checkpoint(const std::string& output_dir, const Transformer& model,
                     const safetensors::NamedTensors& optimizer_state, const CheckpointState& state,
                     int64_t keep_last, const std::string& tokenizer_dir) {
  const fs::path root = fs::path(output_dir) / "checkpoints";
  const fs::path final_dir = root / fmt::format("step_{}", state.step);
  const fs::path tmp = root / fmt::format("step_{}.tmp", state.step);
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  save_transformer(model, (tmp / "model").string(), std::nullopt, 0, tokenizer_dir);
  safetensors::save((tmp / "optimizer.safetensors").string(), optimizer_state);
  {
    std::ofstream f(tmp / "trainer_state.json");
    f << nlohmann::json{{"step", state.step}, {"trainer", state.trainer}}.dump(2) << "\n";
    if (!f) fail("cannot write {}", (tmp / "trainer_state.json").string());
  }
  fs::remove_all(final_dir);
  fs::rename(tmp, final_dir);
  if (keep_last > 0) {
    auto all = list_checkpoints(output_dir);
    for (size_t i = 0; i + keep_last < all.size(); ++i) fs::remove_all(all[i].second);
  }
}

std::string latest_checkpoint(const std::string& output_dir) {
  auto all = list_checkpoints(output_dir);
  return all.empty() ? "" : all.back().second.string();
}

CheckpointState read_checkpoint_state(const std::string& dir) {
  const std::string path = (fs::path(dir) / "trainer_state.json").string();
  std::ifstream f(path);
  if (!f) fail("cannot open {}", path);
  try {
    auto j = nlohmann::json::parse(f);
    return {j.at("step").get<int64_t>(), j.at("trainer")};
  } catch (const nlohmann::json::exception& e) {
    fail("{}: corrupt trainer state: {}", path, e.what());
  }
}

}  // namespace aligner
