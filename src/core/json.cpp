#include "core/json.h"

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "core/error.h"

namespace aligner {
namespace {

// Counts [ and { outside strings. A parse never goes deeper than this count says: the parser reads
// strings as this scan does (up to an unescaped quote) and stops at the first thing it cannot
// read, so malformed text cannot make it nest where the scan saw none.
bool nested_too_deep(std::string_view text) {
  int depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\')
        ++i;
      else if (c == '"')
        in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > kMaxJsonDepth) return true;
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return false;
}

template <class Json>
Json parse(std::string_view text, const std::string& where) {
  if (nested_too_deep(text)) fail("{}: JSON nested deeper than {} levels", where, kMaxJsonDepth);
  try {
    return Json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    // Not only parse_error: a number too large for a double is an out_of_range.
    fail("{}: invalid JSON: {}", where, e.what());
  }
}

}  // namespace

nlohmann::json parse_json(std::string_view text, const std::string& where) {
  return parse<nlohmann::json>(text, where);
}

nlohmann::ordered_json parse_ordered_json(std::string_view text, const std::string& where) {
  return parse<nlohmann::ordered_json>(text, where);
}

std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("cannot open {}: {}", path, std::strerror(errno));
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) fail("{}: read failed: {}", path, std::strerror(errno));
  return text.str();
}

nlohmann::json read_json_file(const std::string& path) {
  return parse_json(read_text_file(path), path);
}

nlohmann::ordered_json read_ordered_json_file(const std::string& path) {
  return parse_ordered_json(read_text_file(path), path);
}

}  // namespace aligner
