#define PCRE2_CODE_UNIT_WIDTH 8
#include "text/regex.h"

#include <pcre2.h>

#include "core/error.h"
#include "text/utf8.h"

namespace aligner {
namespace {

// Oniguruma's \s in UTF-8 mode: the White_Space property.
constexpr std::string_view kSpaceSet =
    "\\t\\n\\x0B\\f\\r \\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}"
    "\\x{3000}";

pcre2_code* as_code(void* p) {
  return static_cast<pcre2_code*>(p);
}

std::string pcre2_message(int code) {
  PCRE2_UCHAR buffer[256];
  pcre2_get_error_message(code, buffer, sizeof(buffer));
  return reinterpret_cast<const char*>(buffer);
}

// One match block per thread: a block holds the state of one match at a time. Only the whole
// match is read, so one ovector pair is enough (PCRE2 then returns 0 for patterns with groups).
struct MatchData {
  pcre2_match_data* data = pcre2_match_data_create(1, nullptr);
  ~MatchData() { pcre2_match_data_free(data); }
};

// The pattern with \s (and \S outside classes) spelled out as Oniguruma reads them.
std::string onig_to_pcre2(std::string_view pattern) {
  std::string out;
  out.reserve(pattern.size() + 64);
  bool in_class = false;
  for (size_t i = 0; i < pattern.size(); ++i) {
    char c = pattern[i];
    if (c == '\\' && i + 1 < pattern.size()) {
      char e = pattern[++i];
      if (e == 's') {
        if (in_class) {
          out += kSpaceSet;
        } else {
          out += '[';
          out += kSpaceSet;
          out += ']';
        }
      } else if (e == 'S' && !in_class) {
        // Inside a class \S keeps PCRE2's meaning: a class cannot hold a negated class.
        out += "[^";
        out += kSpaceSet;
        out += ']';
      } else {
        out += c;
        out += e;
      }
      continue;
    }
    if (!in_class && c == '[') {
      in_class = true;
      out += c;
      // A ']' right after '[' or '[^' is a literal, not the end of the class.
      if (i + 1 < pattern.size() && pattern[i + 1] == '^') out += pattern[++i];
      if (i + 1 < pattern.size() && pattern[i + 1] == ']') out += pattern[++i];
      continue;
    }
    if (in_class && c == ']') in_class = false;
    out += c;
  }
  return out;
}

}  // namespace

Regex::Regex(std::string_view pattern, std::string_view where) : code_(nullptr) {
  std::string rewritten = onig_to_pcre2(pattern);
  int error = 0;
  PCRE2_SIZE offset = 0;
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(rewritten.data()), rewritten.size(),
                                   PCRE2_UTF | PCRE2_UCP, &error, &offset, nullptr);
  if (code == nullptr) {
    fail("{}: bad regex \"{}\" at offset {}: {}", where, std::string(pattern), offset, pcre2_message(error));
  }
  // Without JIT (not built in) PCRE2 interprets the pattern: slower, same matches.
  pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);
  code_ = code;
}

Regex::~Regex() {
  pcre2_code_free(as_code(code_));
}

void Regex::find_all(std::string_view text, std::vector<std::pair<size_t, size_t>>& out) const {
  thread_local MatchData match;
  auto subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  size_t pos = 0;
  while (pos <= text.size()) {
    int rc = pcre2_match(as_code(code_), subject, text.size(), pos, PCRE2_NO_UTF_CHECK, match.data, nullptr);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) fail("regex match failed: {}", pcre2_message(rc));
    const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(match.data);
    out.emplace_back(ovector[0], ovector[1]);
    if (ovector[1] > ovector[0]) {
      pos = ovector[1];
    } else if (ovector[1] < text.size()) {
      pos = ovector[1] + utf8::sequence_length(static_cast<unsigned char>(text[ovector[1]]));
    } else {
      break;
    }
  }
}

}  // namespace aligner
