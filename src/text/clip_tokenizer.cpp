#include "text/clip_tokenizer.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <filesystem>
#include <sstream>

#include "core/error.h"
#include "core/json.h"
#include "text/bpe_tokenizer.h"
#include "text/regex.h"
#include "text/unicode.h"
#include "text/utf8.h"

namespace aligner {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

constexpr std::string_view kClipPattern =
    R"(<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+)";
// CLIPTokenizer reads merges.txt's lines [1, 49152 - 256 - 2 + 1): the vocabulary of the original
// CLIP less its 256 bytes and two special tokens.
constexpr size_t kMaxMergeLines = 49152 - 256 - 2 + 1;

// BasicTokenizer._is_chinese_char.
bool is_cjk(uint32_t cp) {
  return (cp >= 0x4E00 && cp <= 0x9FFF) || (cp >= 0x3400 && cp <= 0x4DBF) ||
         (cp >= 0x20000 && cp <= 0x2A6DF) || (cp >= 0x2A700 && cp <= 0x2B73F) ||
         (cp >= 0x2B740 && cp <= 0x2B81F) || (cp >= 0x2B820 && cp <= 0x2CEAF) ||
         (cp >= 0xF900 && cp <= 0xFAFF) || (cp >= 0x2F800 && cp <= 0x2FA1F);
}

// BasicTokenizer(strip_accents=False, do_split_on_punc=False).tokenize joined by spaces: what
// CLIPTokenizer._tokenize splits when ftfy is missing.
std::string basic_clean(std::string_view text) {
  std::string cleaned;
  cleaned.reserve(text.size());
  for (size_t i = 0; i < text.size();) {
    const size_t at = i;
    const uint32_t cp = utf8::next(text, i);
    const bool line_space = cp == '\t' || cp == '\n' || cp == '\r';
    if (cp == 0 || cp == 0xFFFD || (!line_space && unicode::is_other(cp))) continue;
    if (cp == ' ' || line_space || unicode::is_space_separator(cp)) {
      cleaned += ' ';
    } else if (is_cjk(cp)) {
      cleaned += ' ';
      cleaned.append(text.substr(at, i - at));
      cleaned += ' ';
    } else {
      cleaned.append(text.substr(at, i - at));
    }
  }
  const std::string normalized = unicode::nfc(cleaned);
  // Python's str.split(): runs of whitespace separate words; each word is lowercased.
  std::string out;
  std::string_view rest = normalized;
  size_t word_begin = std::string::npos;
  auto end_word = [&](size_t end) {
    if (word_begin == std::string::npos) return;
    if (!out.empty()) out += ' ';
    out += unicode::lowercase(rest.substr(word_begin, end - word_begin));
    word_begin = std::string::npos;
  };
  for (size_t i = 0; i < rest.size();) {
    const size_t at = i;
    if (unicode::is_python_space(utf8::next(rest, i))) {
      end_word(at);
    } else if (word_begin == std::string::npos) {
      word_begin = at;
    }
  }
  end_word(rest.size());
  // The second lower() of CLIPTokenizer is the identity on lowercased text but for final sigma.
  return out;
}

class ClipTokenizer final : public Tokenizer {
 public:
  ClipTokenizer(std::unique_ptr<Tokenizer> bpe, int32_t start_id, int32_t end_id)
      : bpe_(std::move(bpe)), regex_(kClipPattern, "CLIP tokenizer"), start_id_(start_id), end_id_(end_id) {
    special_.bos = start_id;
    special_.bos_text = "<|startoftext|>";
    special_.eos = special_.pad = special_.unk = end_id;
    special_.eos_text = special_.pad_text = special_.unk_text = "<|endoftext|>";
  }

  std::vector<int32_t> encode(std::string_view text, bool add_special) const override {
    std::string repaired;
    if (!utf8::is_valid(text)) {
      repaired = utf8::lossy(text);
      text = repaired;
    }
    const std::string cleaned = basic_clean(text);
    std::vector<std::pair<size_t, size_t>> pieces;
    regex_.find_all(cleaned, pieces);
    std::vector<int32_t> ids;
    if (add_special && special_.bos) ids.push_back(*special_.bos);
    for (auto [begin, end] : pieces) {
      const std::string_view piece(cleaned.data() + begin, end - begin);
      // CLIPTokenizer's BPE cache starts with the two special texts, which map to themselves.
      if (piece == "<|startoftext|>") {
        ids.push_back(start_id_);
      } else if (piece == "<|endoftext|>") {
        ids.push_back(end_id_);
      } else {
        const std::vector<int32_t> word = bpe_->encode(piece, false);
        ids.insert(ids.end(), word.begin(), word.end());
      }
    }
    if (add_special && special_.eos) ids.push_back(*special_.eos);
    return ids;
  }

  std::string decode(const std::vector<int32_t>& ids, bool skip_special) const override {
    if (!skip_special) return bpe_->decode(ids, false);
    std::vector<int32_t> kept;
    for (int32_t id : ids)
      if (id != special_.bos && id != special_.eos && id != special_.pad && id != special_.unk)
        kept.push_back(id);
    return bpe_->decode(kept, false);
  }

  int64_t vocab_size() const override { return bpe_->vocab_size(); }
  std::optional<int32_t> token_to_id(std::string_view token) const override {
    return bpe_->token_to_id(token);
  }
  std::string id_to_token(int32_t id) const override { return bpe_->id_to_token(id); }

 private:
  std::unique_ptr<Tokenizer> bpe_;
  Regex regex_;
  int32_t start_id_, end_id_;
};

}  // namespace

std::unique_ptr<Tokenizer> load_clip_tokenizer(const std::string& dir) {
  const fs::path vocab_path = fs::path(dir) / "vocab.json";
  const fs::path merges_path = fs::path(dir) / "merges.txt";
  json vocab = read_json_file(vocab_path.string());
  if (!vocab.is_object()) fail("{}: not an object of token -> id", vocab_path.string());
  for (const char* special : {"<|startoftext|>", "<|endoftext|>"})
    if (!vocab.contains(special) || !vocab[special].is_number_integer())
      fail("{}: no id for {} (not a CLIP vocabulary?)", vocab_path.string(), special);

  // As CLIPTokenizer: the file stripped, split at newlines, the first line (#version) dropped, each
  // line split at whitespace.
  const std::string text = read_text_file(merges_path.string());
  json merges = json::array();
  std::istringstream lines(text.substr(0, text.find_last_not_of(" \t\n\r\f\v") + 1));
  std::string line;
  for (size_t index = 0; std::getline(lines, line) && index < kMaxMergeLines; ++index) {
    if (index == 0) continue;
    std::istringstream words(line);
    std::vector<std::string> parts;
    for (std::string w; words >> w;) parts.push_back(w);
    if (parts.empty()) continue;
    if (parts.size() != 2)
      fail("{}: line {} is not two tokens: \"{}\"", merges_path.string(), index + 1, line);
    merges.push_back(json::array({parts[0], parts[1]}));
  }

  json tokenizer = {
      {"model",
       {{"type", "BPE"},
        {"vocab", std::move(vocab)},
        {"merges", std::move(merges)},
        {"end_of_word_suffix", "</w>"},
        {"unk_token", "<|endoftext|>"}}},
      // The regex split is done here (CLIP's, not GPT-2's); ByteLevel only maps bytes.
      {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}},
      {"decoder", {{"type", "ByteLevel"}}},
  };
  const int32_t start = tokenizer["model"]["vocab"]["<|startoftext|>"].get<int32_t>();
  const int32_t end = tokenizer["model"]["vocab"]["<|endoftext|>"].get<int32_t>();
  return std::make_unique<ClipTokenizer>(
      make_bpe_tokenizer(tokenizer, (fs::path(dir) / "{vocab.json, merges.txt}").string()), start, end);
}

std::vector<int32_t> encode_padded(const Tokenizer& tokenizer, std::string_view text, int64_t max_length) {
  const SpecialTokens& special = tokenizer.special();
  if (!special.bos || !special.eos || !special.pad)
    fail("the tokenizer lacks a bos, eos or pad token, which padded CLIP inputs need");
  if (max_length < 2) fail("max_length {} leaves no room for bos and eos", max_length);
  std::vector<int32_t> content = tokenizer.encode(text, false);
  if (static_cast<int64_t>(content.size()) > max_length - 2) content.resize(max_length - 2);
  std::vector<int32_t> ids;
  ids.reserve(max_length);
  ids.push_back(*special.bos);
  ids.insert(ids.end(), content.begin(), content.end());
  ids.push_back(*special.eos);
  ids.resize(max_length, *special.pad);
  return ids;
}

}  // namespace aligner
