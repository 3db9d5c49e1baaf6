// Reading what an end-to-end training run wrote, and cutting data files into the splits it reads.
#pragma once
#include <nlohmann/json.hpp>

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

}  // namespace aligner::test
