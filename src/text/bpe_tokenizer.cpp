#include "text/bpe_tokenizer.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <deque>
#include <limits>
#include <mutex>
#include <shared_mutex>
#include <unordered_set>

#include "core/error.h"
#include "core/json.h"
#include "text/flat_map.h"
#include "text/regex.h"
#include "text/unicode.h"
#include "text/utf8.h"

namespace aligner {
namespace {

using json = nlohmann::json;

// The split ByteLevel does itself when use_regex is set (HF's byte_level.rs).
constexpr std::string_view kByteLevelPattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// HF caches words shorter than this (bpe/model.rs MAX_LENGTH); longer ones rarely repeat.
constexpr size_t kMaxCachedWordBytes = 256;
// When full the cache starts over: cheaper than tracking recency, and words repeat quickly.
constexpr size_t kCacheCapacity = 1 << 16;

constexpr const char* kSupported =
    "supported: normalizer null/Prepend/Replace/NFC/Lowercase/Sequence; pre_tokenizer null/Split/"
    "Metaspace/ByteLevel (last)/Sequence; model BPE; post_processor null/TemplateProcessing/"
    "RobertaProcessing/ByteLevel/Sequence; decoder null/ByteLevel/Metaspace/Replace/ByteFallback/Fuse/"
    "Strip/Sequence";

// GPT-2's bytes_to_unicode: each byte stands for a printable character so that BPE never sees
// spaces or control bytes.
struct ByteLevelTable {
  std::array<std::string, 256> byte_to_char;
  std::array<int16_t, 324> char_to_byte;  // the mapped characters are all below U+0144
};

const ByteLevelTable& byte_level_table() {
  static const ByteLevelTable table = [] {
    ByteLevelTable t;
    t.char_to_byte.fill(-1);
    int extra = 0;
    for (int b = 0; b < 256; ++b) {
      bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      uint32_t c = printable ? b : 256 + extra++;
      utf8::append(t.byte_to_char[b], c);
      t.char_to_byte[c] = static_cast<int16_t>(b);
    }
    return t;
  }();
  return table;
}

enum class Behavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };
enum class Prepend { kAlways, kFirst, kNever };

// A literal or regex pattern, as Split, Replace and the Metaspace split use them.
struct Pattern {
  std::string literal;
  std::unique_ptr<Regex> regex;

  void find_all(std::string_view text, std::vector<std::pair<size_t, size_t>>& out) const {
    if (regex) {
      regex->find_all(text, out);
      return;
    }
    if (literal.empty()) return;
    for (size_t pos = text.find(literal); pos != std::string_view::npos;
         pos = text.find(literal, pos + literal.size())) {
      out.emplace_back(pos, pos + literal.size());
    }
  }
};

struct NormalizerStep {
  enum class Kind { kPrepend, kReplace, kNfc, kLowercase };
  Kind kind;
  std::string text;  // Prepend: what; Replace: the replacement
  Pattern pattern;   // Replace
};

struct PreTokenizerStep {
  enum class Kind { kSplit, kMetaspace, kPrefixSpace };
  explicit PreTokenizerStep(Kind k) : kind(k) {}
  Kind kind;
  Pattern pattern;  // kSplit; kMetaspace with split: the replacement
  Behavior behavior = Behavior::kIsolated;
  bool invert = false;
  std::string replacement;  // kMetaspace
  Prepend prepend = Prepend::kAlways;
  bool metaspace_split = false;
};

struct DecoderStep {
  enum class Kind { kByteLevel, kMetaspace, kReplace, kByteFallback, kFuse, kStrip };
  explicit DecoderStep(Kind k) : kind(k) {}
  Kind kind;
  Pattern pattern;          // kReplace
  std::string content;      // kReplace: replacement; kMetaspace: the replacement character
  bool strip_first = true;  // kMetaspace: prepend_scheme is not never
  uint32_t strip_char = ' ';
  size_t start = 0, stop = 0;  // kStrip
};

// A post-processor template: special ids around the sequence ($A).
struct TemplateItem {
  bool is_sequence = false;
  std::vector<int32_t> ids;
};

struct AddedToken {
  std::string content;
  int32_t id = 0;
  bool special = false, single_word = false, lstrip = false, rstrip = false, normalized = false;
};

// Finds added tokens leftmost-longest, as HF's Aho-Corasick (MatchKind::LeftmostLongest) does.
// A byte trie walked from each position whose byte can start a token: added tokens are few and
// their first bytes ('<', '[') are rare in text.
class AddedMatcher {
 public:
  void add(std::string_view pattern, int32_t token) {
    if (pattern.empty()) return;
    int32_t node = 0;
    for (unsigned char c : pattern) {
      auto& next = nodes_[node].next;
      auto it = std::find_if(next.begin(), next.end(), [&](const auto& e) { return e.first == c; });
      if (it != next.end()) {
        node = it->second;
        continue;
      }
      next.emplace_back(c, static_cast<int32_t>(nodes_.size()));
      node = static_cast<int32_t>(nodes_.size());
      nodes_.emplace_back();
    }
    nodes_[node].token = token;
    first_[static_cast<unsigned char>(pattern[0])] = true;
  }

  bool empty() const { return nodes_.size() == 1; }

  // The first match at or after `from`: {start, length, token}; token -1 when none.
  struct Match {
    size_t start = 0, length = 0;
    int32_t token = -1;
  };
  Match next_match(std::string_view text, size_t from) const {
    for (size_t i = from; i < text.size(); ++i) {
      if (!first_[static_cast<unsigned char>(text[i])]) continue;
      Match best;
      int32_t node = 0;
      for (size_t k = i; k < text.size(); ++k) {
        const auto& next = nodes_[node].next;
        auto c = static_cast<unsigned char>(text[k]);
        auto it = std::find_if(next.begin(), next.end(), [&](const auto& e) { return e.first == c; });
        if (it == next.end()) break;
        node = it->second;
        if (nodes_[node].token >= 0) best = Match{i, k + 1 - i, nodes_[node].token};
      }
      if (best.token >= 0) return best;
    }
    return Match{};
  }

 private:
  struct Node {
    std::vector<std::pair<unsigned char, int32_t>> next;
    int32_t token = -1;
  };
  std::vector<Node> nodes_ = std::vector<Node>(1);
  std::array<bool, 256> first_{};
};

struct Piece {
  std::string_view text;
  bool at_origin;  // starts at offset 0 of the input (Metaspace's prepend_scheme "first")
};

struct Segment {
  size_t begin, end;
  bool is_match;
};

struct Symbol {
  int32_t id;
  int32_t prev, next;
  bool alive;
};

void push_symbol(std::vector<Symbol>& symbols, int32_t id) {
  auto n = static_cast<int32_t>(symbols.size());
  symbols.push_back(Symbol{id, n - 1, n + 1, true});
}

struct MergeCandidate {
  uint32_t rank;
  int32_t pos;
  int32_t new_id;
};

// Heap order of HF's Merge: lowest rank first, then leftmost.
struct LaterMerge {
  bool operator()(const MergeCandidate& a, const MergeCandidate& b) const {
    return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos;
  }
};

struct MergeTarget {
  uint32_t rank;
  int32_t new_id;
};

// Per-thread buffers reused across encode calls.
struct Scratch {
  std::vector<Piece> pieces, next_pieces;
  std::deque<std::string> storage;  // text made by pre-tokenizers; a deque keeps views valid
  std::vector<std::pair<size_t, size_t>> matches;
  std::vector<Segment> segments;
  std::vector<std::pair<size_t, size_t>> ranges;
  std::vector<Symbol> symbols;
  std::vector<MergeCandidate> heap;
  std::string mapped;
};

// Word -> ids for words already seen. Shared by all threads using the tokenizer.
class WordCache {
 public:
  bool append_to(std::string_view word, std::vector<int32_t>& out) const {
    std::shared_lock lock(mutex_);
    const Span* span = map_.find(word);
    if (span == nullptr) return false;
    out.insert(out.end(), ids_.begin() + span->offset, ids_.begin() + span->offset + span->length);
    return true;
  }

  void insert(std::string_view word, const int32_t* ids, size_t n) {
    std::unique_lock lock(mutex_);
    if (map_.size() >= kCacheCapacity) {
      map_.clear();
      ids_.clear();
    }
    map_.set(word, Span{static_cast<uint32_t>(ids_.size()), static_cast<uint32_t>(n)});
    ids_.insert(ids_.end(), ids, ids + n);
  }

 private:
  struct Span {
    uint32_t offset = 0, length = 0;
  };
  mutable std::shared_mutex mutex_;
  StringMap<Span> map_;
  std::vector<int32_t> ids_;
};

// Reads the parts of a tokenizer.json; every error names the file.
struct JsonReader {
  std::string path;

  [[noreturn]] void unsupported(std::string_view what, const json& value) const {
    fail("{}: {} {} is not supported ({})", path, what, value.dump(), kSupported);
  }

  // nlohmann converts a float such as 1e300 to an integer with undefined behaviour, so integers are
  // checked before they are read.
  int64_t integer(const json& value, std::string_view what, int64_t max) const {
    const bool in_range =
        value.is_number_unsigned()
            ? value.get<uint64_t>() <= uint64_t(max)
            : value.is_number_integer() && value.get<int64_t>() >= 0 && value.get<int64_t>() <= max;
    if (!in_range) fail("{}: {} {} is not an integer in [0, {}]", path, what, value.dump(), max);
    return value.get<int64_t>();
  }

  std::string type_of(const json& node, std::string_view what) const {
    if (!node.is_object() || !node.contains("type") || !node["type"].is_string()) {
      fail("{}: {} has no \"type\"", path, what);
    }
    return node["type"].get<std::string>();
  }

  Pattern pattern(const json& node, std::string_view what) const {
    Pattern p;
    if (node.is_object() && node.contains("String") && node["String"].is_string()) {
      p.literal = node["String"].get<std::string>();
    } else if (node.is_object() && node.contains("Regex") && node["Regex"].is_string()) {
      p.regex = std::make_unique<Regex>(node["Regex"].get<std::string>(), path + ": " + std::string(what));
    } else {
      unsupported(std::string(what) + " pattern", node);
    }
    return p;
  }

  static Prepend prepend_scheme(const json& node) {
    // Files written before prepend_scheme existed say add_prefix_space instead.
    if (node.contains("prepend_scheme") && node["prepend_scheme"].is_string()) {
      std::string s = node["prepend_scheme"];
      if (s == "first") return Prepend::kFirst;
      if (s == "never") return Prepend::kNever;
      return Prepend::kAlways;
    }
    return node.value("add_prefix_space", true) ? Prepend::kAlways : Prepend::kNever;
  }

  std::string single_char(const json& node, const char* key, std::string_view what) const {
    std::string s = node.value(key, std::string());
    bool one_char = !s.empty() && utf8::is_valid(s) && utf8::sequence_length(s[0]) == s.size();
    if (!one_char) fail("{}: {} {} must be one character", path, what, key);
    return s;
  }

  void normalizers(const json& node, std::vector<NormalizerStep>& out) const {
    if (node.is_null()) return;
    std::string type = type_of(node, "normalizer");
    if (type == "Sequence") {
      for (const json& child : node.at("normalizers")) normalizers(child, out);
    } else if (type == "Prepend") {
      out.push_back(
          NormalizerStep{NormalizerStep::Kind::kPrepend, node.at("prepend").get<std::string>(), {}});
    } else if (type == "Replace") {
      out.push_back(NormalizerStep{NormalizerStep::Kind::kReplace, node.at("content").get<std::string>(),
                                   pattern(node.at("pattern"), "Replace normalizer")});
    } else if (type == "NFC") {
      out.push_back(NormalizerStep{NormalizerStep::Kind::kNfc, {}, {}});
    } else if (type == "Lowercase") {
      out.push_back(NormalizerStep{NormalizerStep::Kind::kLowercase, {}, {}});
    } else {
      unsupported("normalizer", node);
    }
  }

  Behavior behavior(const json& node) const {
    std::string b = node.value("behavior", std::string("Isolated"));
    if (b == "Isolated") return Behavior::kIsolated;
    if (b == "Removed") return Behavior::kRemoved;
    if (b == "MergedWithPrevious") return Behavior::kMergedWithPrevious;
    if (b == "MergedWithNext") return Behavior::kMergedWithNext;
    if (b == "Contiguous") return Behavior::kContiguous;
    unsupported("Split behavior", node);
  }

  // Returns true when the chain ends with ByteLevel (the model then sees bytes).
  bool pre_tokenizers(const json& node, std::vector<PreTokenizerStep>& out) const {
    if (node.is_null()) return false;
    std::string type = type_of(node, "pre_tokenizer");
    if (type == "Sequence") {
      const json& children = node.at("pretokenizers");
      bool byte_level = false;
      for (size_t i = 0; i < children.size(); ++i) {
        byte_level = pre_tokenizers(children[i], out);
        if (byte_level && i + 1 != children.size()) {
          unsupported("pre_tokenizer (ByteLevel before others)", node);
        }
      }
      return byte_level;
    }
    if (type == "Split") {
      PreTokenizerStep step(PreTokenizerStep::Kind::kSplit);
      step.pattern = pattern(node.at("pattern"), "Split");
      step.behavior = behavior(node);
      step.invert = node.value("invert", false);
      out.push_back(std::move(step));
      return false;
    }
    if (type == "Metaspace") {
      PreTokenizerStep step(PreTokenizerStep::Kind::kMetaspace);
      step.replacement = single_char(node, "replacement", "Metaspace");
      step.prepend = prepend_scheme(node);
      step.metaspace_split = node.value("split", true);
      step.pattern.literal = step.replacement;
      out.push_back(std::move(step));
      return false;
    }
    if (type == "ByteLevel") {
      if (node.value("add_prefix_space", false)) out.emplace_back(PreTokenizerStep::Kind::kPrefixSpace);
      if (node.value("use_regex", true)) {
        PreTokenizerStep step(PreTokenizerStep::Kind::kSplit);
        step.pattern.regex = std::make_unique<Regex>(kByteLevelPattern, path + ": ByteLevel");
        out.push_back(std::move(step));
      }
      return true;
    }
    unsupported("pre_tokenizer", node);
  }

  void decoders(const json& node, std::vector<DecoderStep>& out) const {
    if (node.is_null()) return;
    std::string type = type_of(node, "decoder");
    if (type == "Sequence") {
      for (const json& child : node.at("decoders")) decoders(child, out);
    } else if (type == "ByteLevel") {
      out.emplace_back(DecoderStep::Kind::kByteLevel);
    } else if (type == "Metaspace") {
      DecoderStep step(DecoderStep::Kind::kMetaspace);
      step.content = single_char(node, "replacement", "Metaspace decoder");
      step.strip_first = prepend_scheme(node) != Prepend::kNever;
      out.push_back(std::move(step));
    } else if (type == "Replace") {
      DecoderStep step(DecoderStep::Kind::kReplace);
      step.pattern = pattern(node.at("pattern"), "Replace decoder");
      step.content = node.at("content").get<std::string>();
      out.push_back(std::move(step));
    } else if (type == "ByteFallback") {
      out.emplace_back(DecoderStep::Kind::kByteFallback);
    } else if (type == "Fuse") {
      out.emplace_back(DecoderStep::Kind::kFuse);
    } else if (type == "Strip") {
      DecoderStep step(DecoderStep::Kind::kStrip);
      std::string c = single_char(node, "content", "Strip decoder");
      size_t i = 0;
      step.strip_char = utf8::next(c, i);
      constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
      step.start = node.contains("start") ? integer(node["start"], "Strip decoder start", kMax) : 0;
      step.stop = node.contains("stop") ? integer(node["stop"], "Strip decoder stop", kMax) : 0;
      out.push_back(std::move(step));
    } else {
      unsupported("decoder", node);
    }
  }

  void post_processors(const json& node, std::vector<std::vector<TemplateItem>>& templates) const {
    if (node.is_null()) return;
    std::string type = type_of(node, "post_processor");
    if (type == "Sequence") {
      for (const json& child : node.at("processors")) post_processors(child, templates);
    } else if (type == "ByteLevel") {
      // Only adjusts offsets.
    } else if (type == "RobertaProcessing") {
      // CLIP's converter uses it as a template that also suits ByteLevel: cls $A sep (offsets aside).
      const auto special_id = [&](const char* key) {
        const json& pair = node.at(key);
        if (!pair.is_array() || pair.size() != 2)
          fail("{}: RobertaProcessing {} {} is not [token, id]", path, key, pair.dump());
        return static_cast<int32_t>(
            integer(pair[1], "RobertaProcessing special token id", std::numeric_limits<int32_t>::max()));
      };
      templates.push_back({TemplateItem{false, {special_id("cls")}}, TemplateItem{true, {}},
                           TemplateItem{false, {special_id("sep")}}});
    } else if (type == "TemplateProcessing") {
      const json& specials = node.at("special_tokens");
      std::vector<TemplateItem> items;
      for (const json& piece : node.at("single")) {
        if (piece.contains("Sequence")) {
          if (piece["Sequence"].value("id", std::string("A")) != "A") unsupported("template", node);
          items.push_back({true, {}});
        } else if (piece.contains("SpecialToken")) {
          std::string name = piece["SpecialToken"].at("id").get<std::string>();
          if (!specials.contains(name)) fail("{}: template names unknown special token '{}'", path, name);
          const json& ids = specials[name].at("ids");
          if (!ids.is_array())
            fail("{}: special token '{}' has \"ids\" {}, not a list", path, name, ids.dump());
          TemplateItem item;
          for (const json& id : ids)
            item.ids.push_back(static_cast<int32_t>(
                integer(id, "post_processor special token id", std::numeric_limits<int32_t>::max())));
          items.push_back(std::move(item));
        } else {
          unsupported("template piece", piece);
        }
      }
      templates.push_back(std::move(items));
    } else {
      unsupported("post_processor", node);
    }
  }
};

class BpeTokenizer final : public Tokenizer {
 public:
  BpeTokenizer(const json& root, const std::string& path);

  std::vector<int32_t> encode(std::string_view text, bool add_special) const override;
  std::string decode(const std::vector<int32_t>& ids, bool skip_special) const override;
  int64_t vocab_size() const override { return static_cast<int64_t>(id_to_token_.size()); }
  std::optional<int32_t> token_to_id(std::string_view token) const override;
  std::string id_to_token(int32_t id) const override;

 private:
  void load_model(const json& model, const JsonReader& reader, size_t added_tokens);
  void load_added_tokens(const json& tokens);
  void set_default_specials(const json& model);

  template <class OnText>
  void split_added(std::string_view text, const AddedMatcher& matcher, std::vector<int32_t>& ids,
                   OnText&& on_text) const;
  std::string normalize(std::string_view text) const;
  void pre_tokenize_and_encode(std::string_view text, bool at_origin, std::vector<int32_t>& ids,
                               Scratch& scratch) const;
  void split_piece(const Piece& piece, const Pattern& pattern, Behavior behavior, bool invert,
                   Scratch& scratch) const;
  void encode_word(std::string_view word, std::vector<int32_t>& ids, Scratch& scratch) const;
  void merge_and_cache(std::string_view piece, std::vector<int32_t>& ids, Scratch& scratch) const;
  void merge_word(std::string_view word, std::vector<int32_t>& ids, Scratch& scratch) const;
  void add_unit(std::string_view unit, int32_t id, std::optional<int32_t>& pending_unk,
                Scratch& scratch) const;

  std::string path_;
  std::vector<NormalizerStep> normalizers_;
  std::vector<PreTokenizerStep> pre_tokenizers_;
  bool byte_level_ = false;
  std::vector<std::vector<TemplateItem>> templates_;
  std::vector<DecoderStep> decoders_;

  // Model.
  StringMap<int32_t> vocab_;
  IntMap<MergeTarget> merges_;                // (left id << 32 | right id) -> merge
  IntMap<int32_t> char_ids_;                  // code point -> id of that one-character token
  IntMap<bool> joinable_;                     // (code point << 32 | code point) some merge joins
  std::array<int32_t, 256> byte_ids_{};       // byte-level: byte -> id of its character
  std::array<int32_t, 256> last_byte_ids_{};  // the same with suffix_: a word's last byte
  std::string suffix_;                        // end_of_word_suffix, on a word's last unit (CLIP's "</w>")
  std::array<int32_t, 256> byte_fallback_{};  // byte -> id of <0xNN>
  std::optional<int32_t> unk_id_;
  bool fuse_unk_ = false, byte_fallback_enabled_ = false, ignore_merges_ = false;

  // Added tokens.
  std::vector<AddedToken> added_;
  StringMap<int32_t> added_ids_;
  AddedMatcher raw_matcher_, normalized_matcher_;  // values index added_

  std::vector<std::string> id_to_token_;
  std::vector<uint8_t> is_special_;  // per id: an added token marked special

  mutable WordCache cache_;
};

BpeTokenizer::BpeTokenizer(const json& root, const std::string& path) : path_(path) {
  JsonReader reader{path};
  try {
    if (!root.is_object() || !root.contains("model")) fail("{}: no \"model\" (not a tokenizer.json?)", path);
    const json& added = root.value("added_tokens", json::array());
    load_model(root.at("model"), reader, added.is_array() ? added.size() : 0);
    reader.normalizers(root.value("normalizer", json()), normalizers_);
    byte_level_ = reader.pre_tokenizers(root.value("pre_tokenizer", json()), pre_tokenizers_);
    reader.post_processors(root.value("post_processor", json()), templates_);
    reader.decoders(root.value("decoder", json()), decoders_);
    load_added_tokens(root.value("added_tokens", json::array()));
    for (const auto& items : templates_)
      for (const TemplateItem& item : items)
        for (int32_t id : item.ids)
          if (id < 0 || static_cast<size_t>(id) >= id_to_token_.size())
            fail("{}: post_processor special token id {} is outside the vocabulary ({} ids)", path, id,
                 id_to_token_.size());
  } catch (const json::exception& e) {
    fail("{}: unexpected structure: {}", path, e.what());
  }
  set_default_specials(root.at("model"));
}

void BpeTokenizer::load_model(const json& model, const JsonReader& reader, size_t added_tokens) {
  std::string type = model.value("type", std::string());
  if (type != "BPE") reader.unsupported("model type", model.value("type", json()));
  if (!model.value("dropout", json()).is_null()) reader.unsupported("BPE dropout", model["dropout"]);
  const json prefix = model.value("continuing_subword_prefix", json());
  if (!prefix.is_null() && prefix != "") reader.unsupported("BPE continuing_subword_prefix", prefix);
  const json suffix = model.value("end_of_word_suffix", json());
  if (suffix.is_string()) {
    suffix_ = suffix.get<std::string>();
  } else if (!suffix.is_null()) {
    reader.unsupported("BPE end_of_word_suffix", suffix);
  }

  const json& vocab = model.at("vocab");
  // The table below has one slot per id up to the largest, so an id is bounded by what the file
  // itself holds: the ids may leave gaps, but only as many as added tokens can fill.
  const size_t ids = vocab.size() + added_tokens;
  int32_t max_id = -1;
  for (const auto& [token, id] : vocab.items()) {
    if (!id.is_number_integer())
      fail("{}: vocab token \"{}\" has id {}, not an integer", path_, token, id.dump());
    if (id.get<int64_t>() < 0) fail("{}: vocab token \"{}\" has a negative id", path_, token);
    if (id.get<uint64_t>() >= ids)
      fail(
          "{}: vocab token \"{}\" has id {}, beyond the {} ids that its {} vocab entries and {} added tokens "
          "can take",
          path_, token, id.dump(), ids, vocab.size(), added_tokens);
    max_id = std::max(max_id, id.get<int32_t>());
  }
  id_to_token_.assign(max_id + 1, std::string());
  for (const auto& [token, id_json] : vocab.items()) {
    auto id = id_json.get<int32_t>();
    vocab_.set(token, id);
    id_to_token_[id] = token;
  }

  uint32_t rank = 0;
  for (const json& merge : model.at("merges")) {
    std::string left, right;
    if (merge.is_string()) {
      const std::string& line = merge.get_ref<const std::string&>();
      if (line.rfind("#version", 0) == 0) continue;
      size_t space = line.find(' ');
      if (space == std::string::npos || line.find(' ', space + 1) != std::string::npos) {
        fail("{}: merge {} is not two tokens: \"{}\"", path_, rank + 1, line);
      }
      left = line.substr(0, space);
      right = line.substr(space + 1);
    } else {
      left = merge.at(0).get<std::string>();
      right = merge.at(1).get<std::string>();
    }
    // Each side's last and first character are read below.
    if (left.empty() || right.empty())
      fail("{}: merge {} \"{} {}\" has an empty token", path_, rank + 1, left, right);
    const int32_t* a = vocab_.find(left);
    const int32_t* b = vocab_.find(right);
    const int32_t* merged = vocab_.find(left + right);
    if (a == nullptr || b == nullptr || merged == nullptr) {
      fail("{}: merge {} \"{} {}\" uses a token not in the vocab", path_, rank + 1, left, right);
    }
    merges_.set(static_cast<uint64_t>(*a) << 32 | static_cast<uint32_t>(*b), MergeTarget{rank, *merged});
    size_t last = left.size() - 1, first = 0;
    while (last > 0 && (static_cast<unsigned char>(left[last]) & 0xC0) == 0x80) --last;
    joinable_.set(static_cast<uint64_t>(utf8::next(left, last)) << 32 | utf8::next(right, first), true);
    ++rank;
  }

  if (model.value("unk_token", json()).is_string()) {
    const int32_t* unk = vocab_.find(model["unk_token"].get<std::string>());
    if (unk == nullptr) fail("{}: unk_token {} is not in the vocab", path_, model["unk_token"].dump());
    unk_id_ = *unk;
  }
  fuse_unk_ = model.value("fuse_unk", false);
  byte_fallback_enabled_ = model.value("byte_fallback", false);
  ignore_merges_ = model.value("ignore_merges", false);

  const ByteLevelTable& table = byte_level_table();
  for (int b = 0; b < 256; ++b) {
    const int32_t* id = vocab_.find(table.byte_to_char[b]);
    byte_ids_[b] = id ? *id : -1;
    const int32_t* last = vocab_.find(table.byte_to_char[b] + suffix_);
    last_byte_ids_[b] = last ? *last : -1;
    const int32_t* fallback = vocab_.find(fmt::format("<0x{:02X}>", b));
    byte_fallback_[b] = fallback ? *fallback : -1;
  }
  for (size_t id = 0; id < id_to_token_.size(); ++id) {
    const std::string& token = id_to_token_[id];
    size_t i = 0;
    if (token.empty()) continue;
    uint32_t cp = utf8::next(token, i);
    if (i == token.size()) char_ids_.set(cp, static_cast<int32_t>(id));
  }
}

void BpeTokenizer::load_added_tokens(const json& tokens) {
  // As HF's AddedVocabulary::add_tokens: a token already known keeps its id and a new one takes
  // the next id after the model's vocab; the file's "id" is only a record of that.
  auto next_id = static_cast<int32_t>(vocab_.size());
  for (const json& t : tokens) {
    AddedToken token;
    token.content = t.at("content").get<std::string>();
    if (token.content.empty()) continue;
    const int32_t* known = added_ids_.find(token.content);
    if (known == nullptr) known = vocab_.find(token.content);
    token.id = known ? *known : next_id++;
    token.special = t.value("special", false);
    token.single_word = t.value("single_word", false);
    token.lstrip = t.value("lstrip", false);
    token.rstrip = t.value("rstrip", false);
    token.normalized = t.value("normalized", !token.special);
    added_ids_.set(token.content, token.id);
    added_.push_back(std::move(token));
  }
  std::unordered_set<std::string> special_contents;
  for (size_t i = 0; i < added_.size(); ++i) {
    const AddedToken& token = added_[i];
    if (static_cast<size_t>(token.id) >= id_to_token_.size()) id_to_token_.resize(token.id + 1);
    if (token.special) special_contents.insert(token.content);
    if (token.normalized) {
      // Matched in normalized text, and decoded in its normalized form too (HF's normalized_cache)
      // so that the decoder undoes the normalizer.
      std::string normalized = normalize(token.content);
      normalized_matcher_.add(normalized, static_cast<int32_t>(i));
      id_to_token_[token.id] = std::move(normalized);
    } else {
      raw_matcher_.add(token.content, static_cast<int32_t>(i));
      id_to_token_[token.id] = token.content;
    }
  }
  // HF skips a token when decoding if its decoded form is a special token's content.
  is_special_.assign(id_to_token_.size(), 0);
  for (size_t id = 0; id < id_to_token_.size(); ++id) {
    is_special_[id] = special_contents.count(id_to_token_[id]) > 0;
  }
}

void BpeTokenizer::set_default_specials(const json& model) {
  if (!templates_.empty()) {
    const std::vector<TemplateItem>& items = templates_.back();
    if (!items.empty() && !items.front().is_sequence && !items.front().ids.empty()) {
      special_.bos = items.front().ids.front();
      special_.bos_text = id_to_token(*special_.bos);
    }
    if (items.size() > 1 && !items.back().is_sequence && !items.back().ids.empty()) {
      special_.eos = items.back().ids.front();
      special_.eos_text = id_to_token(*special_.eos);
    }
  }
  if (unk_id_) {
    special_.unk = unk_id_;
    special_.unk_text = model.at("unk_token").get<std::string>();
  }
}

std::optional<int32_t> BpeTokenizer::token_to_id(std::string_view token) const {
  if (const int32_t* id = added_ids_.find(token)) return *id;
  if (const int32_t* id = vocab_.find(token)) return *id;
  return std::nullopt;
}

std::string BpeTokenizer::id_to_token(int32_t id) const {
  if (id < 0 || static_cast<size_t>(id) >= id_to_token_.size()) {
    fail("{}: token id {} is out of range [0, {})", path_, id, id_to_token_.size());
  }
  return id_to_token_[id];
}

size_t previous_char(std::string_view text, size_t pos) {
  size_t prev = pos - 1;
  while (prev > 0 && (static_cast<unsigned char>(text[prev]) & 0xC0) == 0x80) --prev;
  return prev;
}

// regex_syntax's is_word_character (Unicode \w), which single_word tokens test their neighbours with.
bool is_word_char(std::string_view text, size_t pos) {
  static const Regex word(R"([\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\x{200C}\x{200D}])", "single_word");
  size_t end = pos;
  utf8::next(text, end);
  thread_local std::vector<std::pair<size_t, size_t>> match;
  match.clear();
  word.find_all(text.substr(pos, end - pos), match);
  return !match.empty();
}

// HF's AddedVocabulary::find_matches: the text between added tokens goes to on_text(piece,
// offset); the tokens' ids go straight to ids.
template <class OnText>
void BpeTokenizer::split_added(std::string_view text, const AddedMatcher& matcher, std::vector<int32_t>& ids,
                               OnText&& on_text) const {
  if (matcher.empty()) {
    if (!text.empty()) on_text(text, 0);
    return;
  }
  size_t start_offset = 0;
  size_t search = 0;
  while (true) {
    AddedMatcher::Match m = matcher.next_match(text, search);
    if (m.token < 0) break;
    search = m.start + m.length;
    const AddedToken& token = added_[m.token];
    size_t start = m.start, stop = m.start + m.length;
    if (token.single_word) {
      bool start_ok = start == 0 || !is_word_char(text, previous_char(text, start));
      bool stop_ok = stop == text.size() || !is_word_char(text, stop);
      if (!start_ok || !stop_ok) continue;
    }
    if (token.lstrip) {
      size_t new_start = start;
      while (new_start > 0) {
        size_t prev = previous_char(text, new_start);
        size_t i = prev;
        if (!utf8::is_whitespace(utf8::next(text, i))) break;
        new_start = prev;
      }
      start = std::max(new_start, start_offset);
    }
    if (token.rstrip) {
      while (stop < text.size()) {
        size_t i = stop;
        if (!utf8::is_whitespace(utf8::next(text, i))) break;
        stop = i;
      }
    }
    if (start_offset < start) on_text(text.substr(start_offset, start - start_offset), start_offset);
    ids.push_back(token.id);
    start_offset = stop;
  }
  if (start_offset < text.size()) on_text(text.substr(start_offset), start_offset);
}

std::string BpeTokenizer::normalize(std::string_view text) const {
  std::string out(text);
  std::vector<std::pair<size_t, size_t>> matches;
  for (const NormalizerStep& step : normalizers_) {
    if (step.kind == NormalizerStep::Kind::kPrepend) {
      if (!out.empty()) out.insert(0, step.text);
      continue;
    }
    if (step.kind == NormalizerStep::Kind::kNfc) {
      out = unicode::nfc(out);
      continue;
    }
    if (step.kind == NormalizerStep::Kind::kLowercase) {
      out = unicode::lowercase(out);
      continue;
    }
    matches.clear();
    step.pattern.find_all(out, matches);
    if (matches.empty()) continue;
    std::string replaced;
    size_t prev = 0;
    for (auto [begin, end] : matches) {
      replaced.append(out, prev, begin - prev);
      replaced += step.text;
      prev = end;
    }
    replaced.append(out, prev, std::string::npos);
    out = std::move(replaced);
  }
  return out;
}

// HF's NormalizedString::split: the pattern's matches and the text between them, joined or
// dropped as the behaviour says; empty pieces vanish.
void BpeTokenizer::split_piece(const Piece& piece, const Pattern& pattern, Behavior behavior, bool invert,
                               Scratch& scratch) const {
  std::string_view text = piece.text;
  scratch.matches.clear();
  pattern.find_all(text, scratch.matches);

  auto& segments = scratch.segments;
  segments.clear();
  size_t prev = 0;
  for (auto [begin, end] : scratch.matches) {
    if (prev != begin) segments.push_back({prev, begin, invert});
    segments.push_back({begin, end, !invert});
    prev = end;
  }
  if (prev != text.size()) segments.push_back({prev, text.size(), invert});

  auto& ranges = scratch.ranges;
  ranges.clear();
  switch (behavior) {
    case Behavior::kIsolated:
      for (const Segment& s : segments) ranges.emplace_back(s.begin, s.end);
      break;
    case Behavior::kRemoved:
      for (const Segment& s : segments) {
        if (!s.is_match) ranges.emplace_back(s.begin, s.end);
      }
      break;
    case Behavior::kContiguous: {
      bool previous_match = false;
      for (const Segment& s : segments) {
        if (s.is_match == previous_match && !ranges.empty()) {
          ranges.back().second = s.end;
        } else {
          ranges.emplace_back(s.begin, s.end);
        }
        previous_match = s.is_match;
      }
      break;
    }
    case Behavior::kMergedWithPrevious: {
      bool previous_match = false;
      for (const Segment& s : segments) {
        if (s.is_match && !previous_match && !ranges.empty()) {
          ranges.back().second = s.end;
        } else {
          ranges.emplace_back(s.begin, s.end);
        }
        previous_match = s.is_match;
      }
      break;
    }
    case Behavior::kMergedWithNext: {
      bool previous_match = false;
      for (auto it = segments.rbegin(); it != segments.rend(); ++it) {
        if (it->is_match && !previous_match && !ranges.empty()) {
          ranges.back().first = it->begin;
        } else {
          ranges.emplace_back(it->begin, it->end);
        }
        previous_match = it->is_match;
      }
      std::reverse(ranges.begin(), ranges.end());
      break;
    }
  }
  for (auto [begin, end] : ranges) {
    if (begin == end) continue;
    scratch.next_pieces.push_back(Piece{text.substr(begin, end - begin), piece.at_origin && begin == 0});
  }
}

void BpeTokenizer::pre_tokenize_and_encode(std::string_view text, bool at_origin, std::vector<int32_t>& ids,
                                           Scratch& scratch) const {
  scratch.pieces.clear();
  scratch.storage.clear();
  scratch.pieces.push_back(Piece{text, at_origin});
  for (const PreTokenizerStep& step : pre_tokenizers_) {
    scratch.next_pieces.clear();
    for (const Piece& piece : scratch.pieces) {
      switch (step.kind) {
        case PreTokenizerStep::Kind::kSplit:
          split_piece(piece, step.pattern, step.behavior, step.invert, scratch);
          break;
        case PreTokenizerStep::Kind::kPrefixSpace:
          if (piece.text.front() == ' ') {
            scratch.next_pieces.push_back(piece);
          } else {
            std::string& s = scratch.storage.emplace_back(" ");
            s += piece.text;
            scratch.next_pieces.push_back(Piece{s, piece.at_origin});
          }
          break;
        case PreTokenizerStep::Kind::kMetaspace: {
          std::string& s = scratch.storage.emplace_back();
          bool starts_with_replacement =
              piece.text.front() == ' ' || piece.text.substr(0, step.replacement.size()) == step.replacement;
          if (!starts_with_replacement &&
              (step.prepend == Prepend::kAlways || (step.prepend == Prepend::kFirst && piece.at_origin))) {
            s += step.replacement;
          }
          for (char c : piece.text) {
            if (c == ' ') {
              s += step.replacement;
            } else {
              s += c;
            }
          }
          Piece replaced{s, piece.at_origin};
          if (step.metaspace_split) {
            split_piece(replaced, step.pattern, Behavior::kMergedWithNext, false, scratch);
          } else {
            scratch.next_pieces.push_back(replaced);
          }
          break;
        }
      }
    }
    std::swap(scratch.pieces, scratch.next_pieces);
  }
  for (const Piece& piece : scratch.pieces) encode_word(piece.text, ids, scratch);
}

void BpeTokenizer::encode_word(std::string_view word, std::vector<int32_t>& ids, Scratch& scratch) const {
  if (cache_.append_to(word, ids)) return;
  // Without a splitting pre-tokenizer (Metaspace with split false) a word is a whole line, which
  // never repeats. It is cut where no merge can ever join the characters on either side, so the
  // pieces merge alone exactly as within the line, and they repeat. Characters without a token of
  // their own (byte fallback, unk) are never cut around. With ignore_merges a piece that is a
  // token would come out whole, which the line would not.
  if (!byte_level_ && !ignore_merges_ && suffix_.empty()) {
    auto encode_piece = [&](std::string_view piece) {
      if (!cache_.append_to(piece, ids)) merge_and_cache(piece, ids, scratch);
    };
    size_t begin = 0;
    uint32_t previous = 0;
    bool previous_known = false;
    for (size_t i = 0; i < word.size();) {
      size_t at = i;
      uint32_t cp = utf8::next(word, i);
      bool known = char_ids_.find(cp) != nullptr;
      if (previous_known && known && joinable_.find(static_cast<uint64_t>(previous) << 32 | cp) == nullptr) {
        encode_piece(word.substr(begin, at - begin));
        begin = at;
      }
      previous = cp;
      previous_known = known;
    }
    if (begin > 0) {
      encode_piece(word.substr(begin));
      return;
    }
  }
  merge_and_cache(word, ids, scratch);
}

void BpeTokenizer::merge_and_cache(std::string_view piece, std::vector<int32_t>& ids,
                                   Scratch& scratch) const {
  size_t before = ids.size();
  merge_word(piece, ids, scratch);
  if (piece.size() < kMaxCachedWordBytes) cache_.insert(piece, ids.data() + before, ids.size() - before);
}

// One unit of the word (a byte in byte-level mode, else a character) as HF's BPE::merge_word
// handles it: its token, else its bytes' <0xNN> tokens, else unk (fused if asked), else nothing.
void BpeTokenizer::add_unit(std::string_view unit, int32_t id, std::optional<int32_t>& pending_unk,
                            Scratch& scratch) const {
  auto& symbols = scratch.symbols;
  if (id >= 0) {
    if (pending_unk) push_symbol(symbols, *std::exchange(pending_unk, std::nullopt));
    push_symbol(symbols, id);
    return;
  }
  // As HF, byte fallback does not flush a pending unk first.
  if (byte_fallback_enabled_ && std::all_of(unit.begin(), unit.end(), [&](char c) {
        return byte_fallback_[static_cast<unsigned char>(c)] >= 0;
      })) {
    for (char c : unit) push_symbol(symbols, byte_fallback_[static_cast<unsigned char>(c)]);
    return;
  }
  if (!unk_id_) return;
  if (pending_unk && !fuse_unk_) push_symbol(symbols, *pending_unk);
  pending_unk = unk_id_;
}

void BpeTokenizer::merge_word(std::string_view word, std::vector<int32_t>& ids, Scratch& scratch) const {
  const ByteLevelTable& table = byte_level_table();
  if (ignore_merges_) {
    std::string_view key = word;
    if (byte_level_) {
      scratch.mapped.clear();
      for (char c : word) scratch.mapped += table.byte_to_char[static_cast<unsigned char>(c)];
      key = scratch.mapped;
    }
    if (const int32_t* id = vocab_.find(key)) {
      ids.push_back(*id);
      return;
    }
  }

  auto& symbols = scratch.symbols;
  symbols.clear();
  std::optional<int32_t> pending_unk;
  if (byte_level_) {
    for (size_t i = 0; i < word.size(); ++i) {
      auto b = static_cast<unsigned char>(word[i]);
      const bool last = i + 1 == word.size() && !suffix_.empty();
      add_unit(table.byte_to_char[b], last ? last_byte_ids_[b] : byte_ids_[b], pending_unk, scratch);
    }
  } else {
    for (size_t i = 0; i < word.size();) {
      size_t begin = i;
      uint32_t cp = utf8::next(word, i);
      const int32_t* id = nullptr;
      if (i == word.size() && !suffix_.empty()) {
        id = vocab_.find(std::string(word.substr(begin, i - begin)) + suffix_);
      } else {
        id = char_ids_.find(cp);
      }
      add_unit(word.substr(begin, i - begin), id ? *id : -1, pending_unk, scratch);
    }
  }
  if (pending_unk) push_symbol(symbols, *pending_unk);
  if (symbols.empty()) return;
  symbols.back().next = -1;

  auto& heap = scratch.heap;
  heap.clear();
  auto merge_of = [&](int32_t left, int32_t right) {
    return merges_.find(static_cast<uint64_t>(left) << 32 | static_cast<uint32_t>(right));
  };
  for (size_t i = 0; i + 1 < symbols.size(); ++i) {
    if (const MergeTarget* m = merge_of(symbols[i].id, symbols[i + 1].id)) {
      heap.push_back({m->rank, static_cast<int32_t>(i), m->new_id});
    }
  }
  std::make_heap(heap.begin(), heap.end(), LaterMerge{});
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), LaterMerge{});
    MergeCandidate top = heap.back();
    heap.pop_back();
    Symbol& left = symbols[top.pos];
    if (!left.alive || left.next < 0) continue;
    Symbol& right = symbols[left.next];
    // Skip entries made stale by an earlier merge of either side.
    const MergeTarget* m = merge_of(left.id, right.id);
    if (m == nullptr || m->new_id != top.new_id) continue;
    left.id = top.new_id;
    right.alive = false;
    left.next = right.next;
    if (left.next >= 0) symbols[left.next].prev = top.pos;
    if (left.prev >= 0) {
      if (const MergeTarget* p = merge_of(symbols[left.prev].id, left.id)) {
        heap.push_back({p->rank, left.prev, p->new_id});
        std::push_heap(heap.begin(), heap.end(), LaterMerge{});
      }
    }
    if (left.next >= 0) {
      if (const MergeTarget* n = merge_of(left.id, symbols[left.next].id)) {
        heap.push_back({n->rank, top.pos, n->new_id});
        std::push_heap(heap.begin(), heap.end(), LaterMerge{});
      }
    }
  }
  for (const Symbol& s : symbols) {
    if (s.alive) ids.push_back(s.id);
  }
}

std::vector<int32_t> BpeTokenizer::encode(std::string_view text, bool add_special) const {
  // HF only ever sees valid text (Python str); invalid bytes become U+FFFD as Python's decoding
  // with errors="replace" would make them.
  std::string repaired;
  if (!utf8::is_valid(text)) {
    repaired = utf8::lossy(text);
    text = repaired;
  }
  thread_local Scratch scratch;
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 4);
  split_added(text, raw_matcher_, ids, [&](std::string_view piece, size_t offset) {
    if (normalizers_.empty()) {
      split_added(piece, normalized_matcher_, ids, [&](std::string_view sub, size_t sub_offset) {
        pre_tokenize_and_encode(sub, offset + sub_offset == 0, ids, scratch);
      });
      return;
    }
    std::string normalized = normalize(piece);
    split_added(normalized, normalized_matcher_, ids, [&](std::string_view sub, size_t sub_offset) {
      pre_tokenize_and_encode(sub, offset == 0 && sub_offset == 0, ids, scratch);
    });
  });
  if (add_special) {
    for (const std::vector<TemplateItem>& items : templates_) {
      std::vector<int32_t> out;
      out.reserve(ids.size() + 4);
      for (const TemplateItem& item : items) {
        if (item.is_sequence) {
          out.insert(out.end(), ids.begin(), ids.end());
        } else {
          out.insert(out.end(), item.ids.begin(), item.ids.end());
        }
      }
      ids = std::move(out);
    }
  }
  return ids;
}

// HF's decoders, each mapping the list of token strings to a new list (decode_chain).
void apply_decoder(const DecoderStep& step, std::vector<std::string>& tokens) {
  switch (step.kind) {
    case DecoderStep::Kind::kByteLevel: {
      const ByteLevelTable& table = byte_level_table();
      std::string bytes;
      for (const std::string& token : tokens) {
        size_t start = bytes.size();
        bool mapped = true;
        for (size_t i = 0; i < token.size() && mapped;) {
          uint32_t cp = utf8::next(token, i);
          int16_t b = cp < table.char_to_byte.size() ? table.char_to_byte[cp] : int16_t{-1};
          if (b < 0) {
            mapped = false;
          } else {
            bytes += static_cast<char>(b);
          }
        }
        // A token with a character outside the map (an added token, say) passes as it is.
        if (!mapped) bytes.replace(start, std::string::npos, token);
      }
      tokens.assign(1, utf8::lossy(bytes));
      break;
    }
    case DecoderStep::Kind::kMetaspace:
      for (size_t t = 0; t < tokens.size(); ++t) {
        std::string out;
        const std::string& token = tokens[t];
        for (size_t pos = 0; pos < token.size();) {
          if (token.compare(pos, step.content.size(), step.content) == 0) {
            if (t != 0 || !step.strip_first) out += ' ';
            pos += step.content.size();
          } else {
            out += token[pos++];
          }
        }
        tokens[t] = std::move(out);
      }
      break;
    case DecoderStep::Kind::kReplace: {
      std::vector<std::pair<size_t, size_t>> matches;
      for (std::string& token : tokens) {
        matches.clear();
        step.pattern.find_all(token, matches);
        if (matches.empty()) continue;
        std::string out;
        size_t prev = 0;
        for (auto [begin, end] : matches) {
          out.append(token, prev, begin - prev);
          out += step.content;
          prev = end;
        }
        out.append(token, prev, std::string::npos);
        token = std::move(out);
      }
      break;
    }
    case DecoderStep::Kind::kByteFallback: {
      std::vector<std::string> out;
      std::string pending;
      auto flush = [&] {
        if (pending.empty()) return;
        if (utf8::is_valid(pending)) {
          out.push_back(pending);
        } else {
          // HF gives one U+FFFD per byte here, not per invalid sequence.
          for (size_t i = 0; i < pending.size(); ++i) out.emplace_back("\xEF\xBF\xBD");
        }
        pending.clear();
      };
      auto hex = [](char c) {
        if (c >= '0' && c <= '9') return c - '0';
        if (c >= 'a' && c <= 'f') return c - 'a' + 10;
        if (c >= 'A' && c <= 'F') return c - 'A' + 10;
        return -1;
      };
      for (std::string& token : tokens) {
        if (token.size() == 6 && token.compare(0, 3, "<0x") == 0 && token[5] == '>' && hex(token[3]) >= 0 &&
            hex(token[4]) >= 0) {
          pending += static_cast<char>(hex(token[3]) * 16 + hex(token[4]));
        } else {
          flush();
          out.push_back(std::move(token));
        }
      }
      flush();
      tokens = std::move(out);
      break;
    }
    case DecoderStep::Kind::kFuse: {
      std::string joined;
      for (const std::string& token : tokens) joined += token;
      tokens.assign(1, std::move(joined));
      break;
    }
    case DecoderStep::Kind::kStrip:
      for (std::string& token : tokens) {
        std::vector<std::pair<size_t, uint32_t>> chars;  // byte offset, code point
        for (size_t i = 0; i < token.size();) {
          size_t at = i;
          chars.emplace_back(at, utf8::next(token, i));
        }
        size_t first = 0, last = chars.size();
        while (first < step.start && first < last && chars[first].second == step.strip_char) ++first;
        for (size_t k = 0; k < step.stop && last > first && chars[last - 1].second == step.strip_char; ++k)
          --last;
        size_t begin = first < chars.size() ? chars[first].first : token.size();
        size_t end = last < chars.size() ? chars[last].first : token.size();
        token = token.substr(begin, end - begin);
      }
      break;
  }
}

std::string BpeTokenizer::decode(const std::vector<int32_t>& ids, bool skip_special) const {
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (int32_t id : ids) {
    // Unknown ids are dropped, as HF does.
    if (id < 0 || static_cast<size_t>(id) >= id_to_token_.size() || id_to_token_[id].empty()) continue;
    if (skip_special && is_special_[id]) continue;
    tokens.push_back(id_to_token_[id]);
  }
  if (decoders_.empty()) {
    std::string joined;
    for (size_t i = 0; i < tokens.size(); ++i) {
      if (i > 0) joined += ' ';
      joined += tokens[i];
    }
    return joined;
  }
  for (const DecoderStep& step : decoders_) apply_decoder(step, tokens);
  std::string joined;
  for (const std::string& token : tokens) joined += token;
  if (suffix_.empty()) return joined;
  // What transformers' CLIPTokenizerFast wraps HF's decode with: the suffix ends a word, so it
  // becomes a space, and the text is stripped.
  std::string spaced;
  size_t prev = 0;
  for (size_t pos = joined.find(suffix_); pos != std::string::npos; pos = joined.find(suffix_, prev)) {
    spaced.append(joined, prev, pos - prev);
    spaced += ' ';
    prev = pos + suffix_.size();
  }
  spaced.append(joined, prev, std::string::npos);
  const size_t first = spaced.find_first_not_of(" \t\n\r\f\v");
  if (first == std::string::npos) return {};
  return spaced.substr(first, spaced.find_last_not_of(" \t\n\r\f\v") + 1 - first);
}

}  // namespace

std::unique_ptr<Tokenizer> load_bpe_tokenizer(const std::string& json_path) {
  return make_bpe_tokenizer(read_json_file(json_path), json_path);
}

std::unique_ptr<Tokenizer> make_bpe_tokenizer(const nlohmann::json& tokenizer_json,
                                              const std::string& origin) {
  return std::make_unique<BpeTokenizer>(tokenizer_json, origin);
}

}  // namespace aligner
