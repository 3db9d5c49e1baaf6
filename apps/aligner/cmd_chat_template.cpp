// aligner chat-template: the text the tokenizer's own chat template renders for each JSONL line's
// messages, as transformers' apply_chat_template(messages, tokenize=False) gives it; the line's
// other fields (tools, documents, ...) are passed to the template too, as keyword arguments are.
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <cstdio>
#include <fstream>
#include <memory>
#include <string>

#include "commands.h"
#include "core/error.h"
#include "core/json.h"
#include "text/chat_template.h"
#include "text/tokenizer.h"

namespace aligner::cli {
namespace {

struct ChatTemplateOptions {
  std::string tokenizer;
  std::string data;
  bool add_generation_prompt = false;
};

void run_chat_template(const ChatTemplateOptions& options) {
  auto tokenizer = load_tokenizer(options.tokenizer);
  const ChatTemplate tmpl = resolve_chat_template("jinja", *tokenizer);
  std::ifstream in(options.data, std::ios::binary);
  if (!in) fail("cannot open {}", options.data);
  std::string line, out;
  size_t line_number = 0, index = 0;
  while (std::getline(in, line)) {
    ++line_number;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = fmt::format("{}:{}", options.data, line_number);
    // Key order kept: a template's tojson writes tools and arguments in the order the line has them.
    const nlohmann::ordered_json record = parse_ordered_json(line, where);
    if (!record.is_object() || !record.contains("messages") || !record["messages"].is_array()) {
      fail("{}: expected an object with a list \"messages\"", where);
    }
    std::string text;
    try {
      text = apply_chat_template(tmpl, record, options.add_generation_prompt);
    } catch (const Error& e) {
      fail("{}: {}", where, e.what());
    }
    out.clear();
    fmt::format_to(std::back_inserter(out), "{{\"index\": {}, \"text\": {}}}\n", index++,
                   nlohmann::json(text).dump());
    std::fwrite(out.data(), 1, out.size(), stdout);
  }
  std::fflush(stdout);
}

}  // namespace

void add_chat_template(CLI::App& app) {
  auto options = std::make_shared<ChatTemplateOptions>();
  CLI::App* cmd = app.add_subcommand(
      "chat-template", "Print the text the tokenizer's chat template renders for each JSONL line's messages");
  cmd->add_option("--tokenizer", options->tokenizer, "Model folder, tokenizer.json or tokenizer.model")
      ->required();
  cmd->add_option(
         "--data", options->data,
         "JSONL file, one {\"messages\": [...]} per line; other fields (tools, ...) go to the template too")
      ->required();
  cmd->add_flag("--add-generation-prompt", options->add_generation_prompt,
                "End with the header of an assistant turn, as for generation");
  cmd->callback([options] { run_chat_template(*options); });
}

}  // namespace aligner::cli
