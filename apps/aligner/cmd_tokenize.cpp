// aligner tokenize: the ids of one string field of each JSONL line, one JSON object per line, as
// Hugging Face's tokenizer.encode(text) gives them (special tokens added).
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <cstdio>
#include <fstream>
#include <memory>
#include <string>

#include "commands.h"
#include "core/error.h"
#include "core/json.h"
#include "text/tokenizer.h"

namespace aligner::cli {
namespace {

struct TokenizeOptions {
  std::string tokenizer;
  std::string data;
  std::string field = "text";
};

void run_tokenize(const TokenizeOptions& options) {
  auto tokenizer = load_tokenizer(options.tokenizer);
  std::ifstream in(options.data, std::ios::binary);
  if (!in) fail("cannot open {}", options.data);
  std::string line;
  std::string out;
  size_t line_number = 0;
  size_t index = 0;
  while (std::getline(in, line)) {
    ++line_number;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const nlohmann::json record = parse_json(line, fmt::format("{}:{}", options.data, line_number));
    if (!record.is_object() || !record.contains(options.field) || !record[options.field].is_string()) {
      fail("{}:{}: no string field \"{}\"", options.data, line_number, options.field);
    }
    std::vector<int32_t> ids = tokenizer->encode(record[options.field].get_ref<const std::string&>());
    out.clear();
    fmt::format_to(std::back_inserter(out), "{{\"index\": {}, \"ids\": [{}]}}\n", index++,
                   fmt::join(ids, ", "));
    std::fwrite(out.data(), 1, out.size(), stdout);
  }
  std::fflush(stdout);
}

}  // namespace

void add_tokenize(CLI::App& app) {
  auto options = std::make_shared<TokenizeOptions>();
  CLI::App* cmd = app.add_subcommand("tokenize", "Print the token ids of a string field of each JSONL line");
  cmd->add_option("--tokenizer", options->tokenizer, "Model folder, tokenizer.json or tokenizer.model")
      ->required();
  cmd->add_option("--data", options->data, "JSONL file, one JSON object per line")->required();
  cmd->add_option("--field", options->field, "Field holding the text")->capture_default_str();
  cmd->callback([options] { run_tokenize(*options); });
}

}  // namespace aligner::cli
