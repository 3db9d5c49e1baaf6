// A chat template of arbitrary text parsed and rendered by the Jinja engine with the variables
// transformers passes to apply_chat_template.
#include "text/jinja.h"

#include "core/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const nlohmann::ordered_json kVariables = nlohmann::ordered_json::parse(R"({
    "messages": [
      {"role": "system", "content": "You are helpful."},
      {"role": "user", "content": "Hi <b>there</b>\n"},
      {"role": "assistant", "content": "Hello! \u00e9\u65e5", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": {"x": 1, "y": [true, null, 2.5]}}}]},
      {"role": "tool", "content": "{\"ok\": 1}"},
      {"role": "user", "content": ""}
    ],
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    "bos_token": "<s>",
    "eos_token": "</s>",
    "add_generation_prompt": true
  })");
  aligner::jinja::RenderOptions options;
  options.now = std::tm{};
  try {
    auto tmpl = aligner::jinja::parse(std::string_view(reinterpret_cast<const char*>(data), size), "fuzz");
    aligner::jinja::uses_generation(*tmpl);
    aligner::jinja::render(*tmpl, kVariables, options);
  } catch (const aligner::Error&) {
  }
  return 0;
}
