// UTF-8 helpers shared by the tokenizers. Text reaching the regexes must be valid UTF-8 (PCRE2 is
// run without its own per-call check, which would rescan the whole subject on every match).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace aligner::utf8 {

// Length of the sequence that starts with this byte, assuming valid UTF-8.
inline size_t sequence_length(unsigned char lead) {
  if (lead < 0x80) return 1;
  if (lead < 0xE0) return 2;
  if (lead < 0xF0) return 3;
  return 4;
}

// Decodes the code point at s[i] and advances i past it; s must be valid UTF-8.
inline uint32_t next(std::string_view s, size_t& i) {
  auto byte = [&](size_t k) { return static_cast<uint32_t>(static_cast<unsigned char>(s[k])); };
  uint32_t c = byte(i);
  size_t n = sequence_length(static_cast<unsigned char>(c));
  if (n == 1) {
    i += 1;
    return c;
  }
  uint32_t cp = c & (0x7F >> n);
  for (size_t k = 1; k < n; ++k) cp = (cp << 6) | (byte(i + k) & 0x3F);
  i += n;
  return cp;
}

void append(std::string& out, uint32_t cp);

// Length of the longest valid prefix of s.
size_t valid_prefix(std::string_view s);
inline bool is_valid(std::string_view s) {
  return valid_prefix(s) == s.size();
}

// As Rust's String::from_utf8_lossy and Python's errors="replace": every maximal invalid
// subpart becomes one U+FFFD.
std::string lossy(std::string_view s);

// Rust's char::is_whitespace (the Unicode White_Space property), which HF uses for lstrip/rstrip.
bool is_whitespace(uint32_t cp);

}  // namespace aligner::utf8
