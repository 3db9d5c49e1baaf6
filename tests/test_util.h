// What the end-to-end tests share: a scratch folder, a small model with the project's real
// tokenizer, and running the aligner binary.
#pragma once
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <map>
#include <string>

#include "io/hf_checkpoint.h"
#include "model/config.h"
#include "model/transformer.h"

namespace aligner::test {

inline const std::string kRoot = ALIGNER_SOURCE_DIR;

// An empty folder of its own under the system's temp folder.
inline std::filesystem::path temp_dir(const std::string& name) {
  auto d = std::filesystem::temp_directory_path() / ("aligner_" + name + "_" + std::to_string(::getpid()));
  std::filesystem::remove_all(d);
  std::filesystem::create_directories(d);
  return d;
}

// A small random Llama with the 6k BPE tokenizer (which has Llama 3's chat tokens), made once per
// test binary for each context length.
inline const std::string& tiny_model(int64_t max_position_embeddings = 512) {
  static std::map<int64_t, std::string> made;
  auto& dir = made[max_position_embeddings];
  if (dir.empty()) {
    const auto d = temp_dir("model_" + std::to_string(max_position_embeddings)) / "m";
    nlohmann::json j = {{"model_type", "llama"},       {"vocab_size", 6000},
                        {"hidden_size", 64},           {"intermediate_size", 128},
                        {"num_hidden_layers", 2},      {"num_attention_heads", 4},
                        {"num_key_value_heads", 2},    {"max_position_embeddings", max_position_embeddings},
                        {"tie_word_embeddings", true}, {"torch_dtype", "float32"}};
    auto m = init_transformer(parse_model_config(j, "tiny"), at::kCPU, 42);
    save_transformer(m, d.string(), std::nullopt, 0, kRoot + "/tests/fixtures/tokenizers/llama3-style-bpe6k");
    dir = d.string();
  }
  return dir;
}

struct Run {
  int status = -1;  // exit code, or 128 + signal
  std::string output;
};

// The aligner binary with `args` (and environment assignments `env`), single-threaded so that
// numbers are reproducible; stdout and stderr together.
inline Run run_aligner(const std::string& args, const std::string& env = "") {
  const std::string cmd =
      "OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 " + env + " " + ALIGNER_BINARY + " " + args + " 2>&1";
  Run r;
  FILE* p = ::popen(cmd.c_str(), "r");
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) r.output.append(buf, n);
  const int st = ::pclose(p);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  return r;
}

}  // namespace aligner::test
