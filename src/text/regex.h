// Unicode regexes for tokenizer.json patterns, through PCRE2 (UTF + UCP, JIT compiled).
#pragma once
#include <cstddef>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace aligner {

class Regex {
 public:
  // pattern as written in a tokenizer.json (Oniguruma syntax as HF uses it). \s is rewritten to
  // Oniguruma's meaning (the Unicode White_Space set, which has U+0085 that PCRE2's \s lacks).
  // Errors name `where` and the pattern.
  Regex(std::string_view pattern, std::string_view where);
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Appends the [begin, end) byte ranges of all non-overlapping matches, left to right, as Rust's
  // find_iter does: after an empty match the search goes on one character later. text must be
  // valid UTF-8. Thread-safe.
  void find_all(std::string_view text, std::vector<std::pair<size_t, size_t>>& out) const;

 private:
  void* code_;  // pcre2_code_8*, kept out of this header
};

}  // namespace aligner
