// Times our tokenizers single-threaded on the text bench/tokenizer_bench.py times Hugging Face on;
// both print MB/s and the total token count (which must agree). Run from the repository root:
//   tokenizer_bench [--repeat N] [--data FILE.jsonl] [TOKENIZER ...]
// TOKENIZER defaults to the fixture tokenizers under tests/fixtures/tokenizers.
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "text/tokenizer.h"

namespace {

std::vector<std::string> read_texts(const std::string& path) {
  std::ifstream in(path);
  if (!in) aligner::fail("cannot open {} (run from the repository root)", path);
  std::vector<std::string> texts;
  std::string line;
  while (std::getline(in, line)) {
    if (!line.empty()) texts.push_back(nlohmann::json::parse(line).at("text").get<std::string>());
  }
  return texts;
}

int run(int argc, char** argv) {
  int repeat = 3;
  std::string data = "bench/data/tokenizer_bench.jsonl";
  std::vector<std::string> paths;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--repeat" && i + 1 < argc) {
      repeat = std::max(1, std::stoi(argv[++i]));
    } else if (arg == "--data" && i + 1 < argc) {
      data = argv[++i];
    } else if (!arg.empty() && arg[0] == '-') {
      aligner::fail("usage: tokenizer_bench [--repeat N] [--data FILE.jsonl] [TOKENIZER ...]");
    } else {
      paths.push_back(arg);
    }
  }
  if (paths.empty()) {
    for (const char* p : {"gpt2/tokenizer.json", "mistral-v0.3/tokenizer.json",
                          "llama3-style-bpe6k/tokenizer.json", "llama2/tokenizer.model"}) {
      paths.push_back(std::string("tests/fixtures/tokenizers/") + p);
    }
  }

  std::vector<std::string> texts = read_texts(data);
  double mb = 0;
  for (const std::string& t : texts) mb += static_cast<double>(t.size()) / 1e6;
  std::printf("text: %s, %zu lines, %.2f MB; one thread\n", data.c_str(), texts.size(), mb);
  for (const std::string& path : paths) {
    auto load_start = std::chrono::steady_clock::now();
    auto tokenizer = aligner::load_tokenizer(path);
    double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - load_start).count();
    double first = 0, best = 1e30;
    size_t tokens = 0;
    for (int r = 0; r < repeat; ++r) {
      auto start = std::chrono::steady_clock::now();
      tokens = 0;
      for (const std::string& t : texts) tokens += tokenizer->encode(t).size();
      double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (r == 0) first = s;
      best = std::min(best, s);
    }
    std::printf("ours %-48s loop  %8.2f MB/s  (first pass %6.2f MB/s, %zu tokens, load %.2f s)\n",
                path.c_str(), mb / best, mb / first, tokens, load_s);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
