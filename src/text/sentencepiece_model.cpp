#include "text/sentencepiece_model.h"

#include <algorithm>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string_view>
#include <unordered_map>

#include "core/error.h"
#include "text/utf8.h"

namespace aligner {
namespace {

// Protobuf wire format: just enough to walk ModelProto's fields.
struct Field {
  uint32_t number = 0;
  uint32_t wire = 0;
  uint64_t varint = 0;
  std::string_view bytes;  // length-delimited payload
  float fixed32 = 0;
};

class Reader {
 public:
  Reader(std::string_view data, const std::string& path) : data_(data), path_(path) {}
  bool next(Field& f) {
    if (pos_ >= data_.size()) return false;
    const uint64_t key = varint();
    f.number = uint32_t(key >> 3);
    f.wire = uint32_t(key & 7);
    switch (f.wire) {
      case 0:
        f.varint = varint();
        break;
      case 1:
        skip(8);
        break;
      case 2: {
        const uint64_t n = varint();
        skip(n);
        f.bytes = data_.substr(pos_ - n, n);
        break;
      }
      case 5:
        skip(4);
        std::memcpy(&f.fixed32, data_.data() + pos_ - 4, 4);
        break;
      default:
        fail("{}: not a SentencePiece model (bad protobuf wire type {})", path_, f.wire);
    }
    return true;
  }

 private:
  uint64_t varint() {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (pos_ >= data_.size()) break;
      const uint8_t c = uint8_t(data_[pos_++]);
      v |= uint64_t(c & 0x7f) << shift;
      if (c < 0x80) return v;
    }
    fail("{}: not a SentencePiece model (truncated protobuf)", path_);
  }
  void skip(uint64_t n) {
    if (n > data_.size() - pos_) fail("{}: not a SentencePiece model (truncated protobuf)", path_);
    pos_ += n;
  }
  std::string_view data_;
  const std::string& path_;
  size_t pos_ = 0;
};

enum PieceType { kNormal = 1, kUnknown = 2, kControl = 3, kUserDefined = 4, kUnused = 5, kByte = 6 };

struct Piece {
  std::string text;
  float score = 0;
  int type = kNormal;
};

}  // namespace

SentencePieceModel read_sentencepiece_model(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail("cannot open {}", path);
  const std::string data((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());

  std::vector<Piece> pieces;
  int model_type = 1;  // proto default: UNIGRAM
  bool byte_fallback = false, add_dummy_prefix = true, remove_extra_ws = true;
  int64_t unk_id = 0, bos_id = 1, eos_id = 2;
  std::string normalizer = "nmt_nfkc";
  Reader top(data, path);
  for (Field fl; top.next(fl);) {
    if (fl.wire != 2) continue;
    Reader sub(fl.bytes, path);
    Field g;
    if (fl.number == 1) {  // SentencePiece
      Piece p;
      while (sub.next(g)) {
        if (g.number == 1)
          p.text = std::string(g.bytes);
        else if (g.number == 2)
          p.score = g.fixed32;
        else if (g.number == 3)
          p.type = int(g.varint);
      }
      // The tokenizer walks pieces by character, trusting their UTF-8; SentencePiece and transformers
      // read them as text too.
      if (!utf8::is_valid(p.text))
        fail("{}: not a SentencePiece model (piece {} is not valid UTF-8)", path, pieces.size());
      pieces.push_back(std::move(p));
    } else if (fl.number == 2) {  // TrainerSpec
      while (sub.next(g)) {
        if (g.number == 3)
          model_type = int(g.varint);
        else if (g.number == 35)
          byte_fallback = g.varint != 0;
        else if (g.number == 40)
          unk_id = int64_t(int32_t(g.varint));
        else if (g.number == 41)
          bos_id = int64_t(int32_t(g.varint));
        else if (g.number == 42)
          eos_id = int64_t(int32_t(g.varint));
      }
    } else if (fl.number == 3) {  // NormalizerSpec
      while (sub.next(g)) {
        if (g.number == 1)
          normalizer = std::string(g.bytes);
        else if (g.number == 3)
          add_dummy_prefix = g.varint != 0;
        else if (g.number == 4)
          remove_extra_ws = g.varint != 0;
      }
    }
  }
  if (pieces.empty()) fail("{}: not a SentencePiece model (no pieces)", path);
  if (model_type != 2)
    fail("{}: SentencePiece model type {} is not supported (supported: BPE)", path, model_type);
  if (normalizer != "identity" || remove_extra_ws)
    fail("{}: SentencePiece normalization '{}'{} is not supported (supported: identity, keeping whitespace)",
         path, normalizer, remove_extra_ws ? " with remove_extra_whitespaces" : "");

  const int64_t n = pieces.size();
  auto in_range = [&](int64_t id) { return id >= 0 && id < n; };
  nlohmann::json vocab = nlohmann::json::object();
  std::unordered_map<std::string, int64_t> mergeable;  // pieces BPE may form or merge from
  for (int64_t i = 0; i < n; ++i) {
    vocab[pieces[i].text] = i;
    if (pieces[i].type == kNormal || pieces[i].type == kUserDefined) mergeable.emplace(pieces[i].text, i);
  }

  // Merges as transformers' SentencePieceExtractor orders them: every split of a piece into two
  // pieces, by the merged piece's score (highest first), ties in vocabulary order.
  struct Merge {
    int64_t left, right;
    float score;
  };
  std::vector<Merge> merges;
  for (int64_t i = 0; i < n; ++i) {
    if (pieces[i].type != kNormal) continue;
    const std::string& s = pieces[i].text;
    std::vector<Merge> local;
    for (size_t cut = utf8::sequence_length(s[0]); cut < s.size(); cut += utf8::sequence_length(s[cut])) {
      auto l = mergeable.find(s.substr(0, cut)), r = mergeable.find(s.substr(cut));
      if (l != mergeable.end() && r != mergeable.end())
        local.push_back({l->second, r->second, pieces[i].score});
    }
    std::sort(local.begin(), local.end(), [](const Merge& a, const Merge& b) {
      return std::tie(a.left, a.right) < std::tie(b.left, b.right);
    });
    merges.insert(merges.end(), local.begin(), local.end());
  }
  std::stable_sort(merges.begin(), merges.end(),
                   [](const Merge& a, const Merge& b) { return a.score > b.score; });
  nlohmann::json merge_list = nlohmann::json::array();
  for (const auto& m : merges) merge_list.push_back({pieces[m.left].text, pieces[m.right].text});

  nlohmann::json added = nlohmann::json::array();
  for (int64_t i = 0; i < n; ++i)
    if (pieces[i].type == kUserDefined)
      added.push_back({{"id", i},
                       {"content", pieces[i].text},
                       {"single_word", false},
                       {"lstrip", false},
                       {"rstrip", false},
                       {"normalized", false},
                       {"special", false}});

  nlohmann::json normalizers = nlohmann::json::array();
  if (add_dummy_prefix) normalizers.push_back({{"type", "Prepend"}, {"prepend", "\u2581"}});
  normalizers.push_back({{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", "\u2581"}});
  nlohmann::json decoders =
      nlohmann::json::array({{{"type", "Replace"}, {"pattern", {{"String", "\u2581"}}}, {"content", " "}},
                             {{"type", "ByteFallback"}},
                             {{"type", "Fuse"}}});
  if (add_dummy_prefix) decoders.push_back({{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}});

  nlohmann::json post = nullptr;
  if (in_range(bos_id)) {
    const std::string bos = pieces[bos_id].text;
    post = {
        {"type", "TemplateProcessing"},
        {"single",
         {{{"SpecialToken", {{"id", bos}, {"type_id", 0}}}}, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
        {"pair", nlohmann::json::array()},
        {"special_tokens", {{bos, {{"id", bos}, {"ids", {bos_id}}, {"tokens", {bos}}}}}}};
  }
  nlohmann::json model = {
      {"type", "BPE"},
      {"dropout", nullptr},
      {"unk_token", in_range(unk_id) ? nlohmann::json(pieces[unk_id].text) : nlohmann::json()},
      {"continuing_subword_prefix", nullptr},
      {"end_of_word_suffix", nullptr},
      {"fuse_unk", true},
      {"byte_fallback", byte_fallback},
      {"ignore_merges", false},
      {"vocab", vocab},
      {"merges", merge_list}};
  SentencePieceModel out;
  for (int64_t i = 0; i < n; ++i)
    if (pieces[i].type == kControl || pieces[i].type == kUnknown) out.control_ids.push_back(int32_t(i));
  if (in_range(bos_id)) out.bos = int32_t(bos_id);
  if (in_range(eos_id)) out.eos = int32_t(eos_id);
  if (in_range(unk_id)) out.unk = int32_t(unk_id);
  out.tokenizer_json = {{"version", "1.0"},
                        {"added_tokens", added},
                        {"normalizer", {{"type", "Sequence"}, {"normalizers", normalizers}}},
                        {"pre_tokenizer", nullptr},
                        {"post_processor", post},
                        {"decoder", {{"type", "Sequence"}, {"decoders", decoders}}},
                        {"model", model}};
  return out;
}

}  // namespace aligner
