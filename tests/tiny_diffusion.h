// The tiny Stable-Diffusion-shaped model the diffusion tests run on: tests/fixtures/tiny-sd-configs
// (every block kind, [8, 16] channels) with random weights.
#pragma once
#include <filesystem>
#include <map>
#include <string>

#include "diffusion/pipeline.h"
#include "test_util.h"

namespace aligner::test {

inline const std::string kTinyDiffusionConfigs = kRoot + "/tests/fixtures/tiny-sd-configs";

// The model folder of weights drawn from `seed`, written once per test binary.
inline const std::filesystem::path& tiny_diffusion_model(uint64_t seed) {
  static std::map<uint64_t, std::filesystem::path> made;
  auto& dir = made[seed];
  if (dir.empty()) {
    dir = temp_dir("tiny_sd_" + std::to_string(seed)) / "model";
    save_pipeline(init_pipeline(kTinyDiffusionConfigs, seed), dir.string(), Replace::ours);
  }
  return dir;
}

}  // namespace aligner::test
