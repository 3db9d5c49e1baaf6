// Every JSON document aligner reads comes from files it does not control: model folders, data,
// a run's own outputs that a person may have edited. nlohmann's parser has no nesting limit, and a
// document nested deeply enough overflows the stack of whatever then walks it recursively
// (nlohmann's copy and dump, our own readers), so all of them are parsed here, with a bound.
#pragma once
#include <nlohmann/json.hpp>

#include <string>
#include <string_view>

namespace aligner {

// Far deeper than any config, tokenizer, index or data line nests (they stay under 10 levels), and
// shallow enough for any recursive walk on any thread's stack.
inline constexpr int kMaxJsonDepth = 256;

// `text` parsed. Invalid JSON, or arrays and objects nested more than kMaxJsonDepth levels, is a
// one-line aligner::Error that starts with `where` (a file, or "file:line" for a JSONL record).
nlohmann::json parse_json(std::string_view text, const std::string& where);
// The same, keeping object keys in file order (safetensors headers).
nlohmann::ordered_json parse_ordered_json(std::string_view text, const std::string& where);
// The whole file at `path`; a file that cannot be read is an error naming it.
std::string read_text_file(const std::string& path);
// The whole file at `path` parsed; a file that cannot be read is an error naming it too.
nlohmann::json read_json_file(const std::string& path);
// The same, keeping object keys in file order.
nlohmann::ordered_json read_ordered_json_file(const std::string& path);

}  // namespace aligner
