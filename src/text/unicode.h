// Unicode text transforms the CLIP tokenizers need (tokenizer.json's NFC and Lowercase normalizers,
// CLIPTokenizer's Python-side cleanup), from tables of Unicode 14.0 (Python 3.11's unicodedata, which
// generated them; HF's Rust crates differ only on characters added since). Text must be valid UTF-8.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>

namespace aligner::unicode {

// Canonical composition (NFC), as unicodedata.normalize("NFC") and HF's NFC normalizer.
std::string nfc(std::string_view text);

// Each character's full lowercase mapping, as Rust's char::to_lowercase (HF's Lowercase normalizer).
// Python's str.lower() also maps a word-final capital sigma to U+03C2 (Final_Sigma); this does not.
std::string lowercase(std::string_view text);

// General category C (Cc, Cf, Cs, Co, Cn), which BERT's cleanup drops.
bool is_other(uint32_t cp);
// General category Zs.
bool is_space_separator(uint32_t cp);
// Python's str.isspace(), which str.split() and str.strip() use.
bool is_python_space(uint32_t cp);

}  // namespace aligner::unicode
