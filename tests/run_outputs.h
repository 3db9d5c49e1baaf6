// Reading what an end-to-end training run wrote, and cutting data files into the splits it reads.
#pragma once
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "io/hf_checkpoint.h"
#include "io/safetensors.h"
#include "model/transformer.h"
#include "test_util.h"

#include <csignal>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace aligner::test {

// The rows of OUT/metrics.jsonl of one split ("train" or "validation").
inline std::vector<nlohmann::json> metrics(const std::filesystem::path& out,
                                           const std::string& split = "train") {
  std::ifstream f(out / "metrics.jsonl");
  std::vector<nlohmann::json> rows;
  for (std::string line; std::getline(f, line);) {
    auto j = nlohmann::json::parse(line);
    if (j["split"] == split) rows.push_back(j);
  }
  return rows;
}

// Lines [first, last) of a JSONL file, written to `to`.
inline void copy_lines(const std::string& from, const std::filesystem::path& to, int first, int last) {
  std::ifstream in(from);
  std::ofstream out(to);
  int i = 0;
  for (std::string line; std::getline(in, line); ++i)
    if (i >= first && i < last) out << line << "\n";
}

// The JSON lines of a command's output (its log lines are not JSON objects).
inline std::vector<nlohmann::json> json_lines(const std::string& output) {
  std::vector<nlohmann::json> rows;
  std::istringstream in(output);
  for (std::string line; std::getline(in, line);)
    if (!line.empty() && line[0] == '{') rows.push_back(nlohmann::json::parse(line));
  return rows;
}

// A training command run whole into `whole`, and into `killed` stopped by SIGKILL after step
// `kill_at` (ALIGNER_KILL_AT_STEP) and run again, which must resume from a checkpoint: the caller
// then compares the two outputs.
template <class Args>
void run_whole_and_killed(Args&& args, const std::filesystem::path& whole,
                          const std::filesystem::path& killed, int kill_at) {
  const auto w = run_aligner(args(whole));
  ASSERT_EQ(w.status, 0) << w.output;
  const auto k = run_aligner(args(killed), "ALIGNER_KILL_AT_STEP=" + std::to_string(kill_at));
  ASSERT_EQ(k.status, 128 + SIGKILL) << k.output;
  const auto r = run_aligner(args(killed));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("resuming from"), std::string::npos) << r.output;
}

// The tensors of two model folders, each compared: equal to the bit (tolerance 0) or within it.
inline void expect_same_weights(const std::filesystem::path& a, const std::filesystem::path& b,
                                double tolerance = 0) {
  auto wa = load_transformer(a.string(), at::kCPU), wb = load_transformer(b.string(), at::kCPU);
  const auto pa = named_parameters(wa), pb = named_parameters(wb);
  ASSERT_EQ(pa.size(), pb.size()) << a << " " << b;
  for (size_t i = 0; i < pa.size(); ++i) {
    if (tolerance == 0)
      EXPECT_TRUE(pa[i].second.equal(pb[i].second)) << a << ": " << pa[i].first;
    else
      EXPECT_LE((pa[i].second - pb[i].second).abs().max().item<double>(), tolerance)
          << a << ": " << pa[i].first;
  }
}

// The tensors of two PEFT adapter folders, equal to the bit (tolerance 0) or within it.
inline void expect_same_adapters(const std::filesystem::path& a, const std::filesystem::path& b,
                                 double tolerance = 0) {
  const auto fa = safetensors::File::open((a / "adapter_model.safetensors").string()),
             fb = safetensors::File::open((b / "adapter_model.safetensors").string());
  ASSERT_EQ(fa.tensors().size(), fb.tensors().size());
  for (const auto& t : fa.tensors()) {
    if (tolerance == 0)
      EXPECT_TRUE(fa.get(t.name).equal(fb.get(t.name))) << a << ": " << t.name;
    else
      EXPECT_LE((fa.get(t.name) - fb.get(t.name)).abs().max().item<double>(), tolerance)
          << a << ": " << t.name;
  }
}

}  // namespace aligner::test
