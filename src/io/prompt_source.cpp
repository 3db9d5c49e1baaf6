#include "io/prompt_source.h"

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <string_view>

#include "core/error.h"
#include "core/strings.h"
#include "io/jsonl.h"
#include "io/tar.h"
#include "text/utf8.h"

namespace aligner {

namespace fs = std::filesystem;

namespace {

// More shards than any data set has: a typo such as {0..99999999} fails at once instead of
// filling memory with names.
constexpr size_t kMaxExpansions = 1000000;

bool all_digits(std::string_view s) {
  return !s.empty() && s.size() <= 18 &&
         std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// One brace group's words: {N..M} counts from N to M (either way), padded to the wider endpoint
// when either is written with a leading zero, as braceexpand does; {a,b} gives a and b.
std::vector<std::string> brace_words(std::string_view body, const std::string& pattern) {
  const size_t dots = body.find("..");
  if (dots != std::string_view::npos && all_digits(body.substr(0, dots)) &&
      all_digits(body.substr(dots + 2))) {
    const std::string_view lo = body.substr(0, dots), hi = body.substr(dots + 2);
    const bool padded = (lo.size() > 1 && lo[0] == '0') || (hi.size() > 1 && hi[0] == '0');
    const size_t width = padded ? std::max(lo.size(), hi.size()) : 0;
    const int64_t a = std::stoll(std::string(lo)), b = std::stoll(std::string(hi));
    if (uint64_t(a > b ? a - b : b - a) >= kMaxExpansions) {
      fail("shard pattern '{}': range {{{}}} has more than {} values", pattern, body, kMaxExpansions);
    }
    std::vector<std::string> out;
    for (int64_t i = a;; i += a <= b ? 1 : -1) {
      std::string s = std::to_string(i);
      if (s.size() < width) s.insert(0, width - s.size(), '0');
      out.push_back(std::move(s));
      if (i == b) break;
    }
    return out;
  }
  if (body.find(',') == std::string_view::npos) {
    fail("shard pattern '{}': {{{}}} is neither a range {{N..M}} nor a list {{a,b}}", pattern, body);
  }
  std::vector<std::string> out;
  size_t start = 0;
  for (;;) {
    const size_t comma = body.find(',', start);
    out.emplace_back(
        body.substr(start, comma == std::string_view::npos ? std::string_view::npos : comma - start));
    if (comma == std::string_view::npos) break;
    start = comma + 1;
  }
  return out;
}

// The member name's webdataset key and extension (lowercased), or false where webdataset skips it:
// no dot in the last component, nothing before that dot, or a __meta__ name.
bool split_key(const std::string& name, std::string& key, std::string& ext) {
  const std::string_view first(name.data(), std::min(name.find('/'), name.size()));
  if (first.size() >= 4 && first.substr(0, 2) == "__" && ends_with(first, "__")) return false;
  const size_t base = name.rfind('/') == std::string::npos ? 0 : name.rfind('/') + 1;
  const size_t dot = name.find('.', base);
  if (dot == std::string::npos || dot == base) return false;
  key = name.substr(0, dot);
  ext = name.substr(dot + 1);
  for (char& c : ext) c = char(std::tolower(static_cast<unsigned char>(c)));
  return true;
}

std::string member_list(const std::vector<const tar::Member*>& members) {
  std::string out;
  for (size_t i = 0; i < members.size() && i < 5; ++i) out += (i ? ", " : "") + members[i]->name;
  if (members.size() > 5) out += ", ...";
  return out;
}

// Each sample's txt member, in the shard's order, onto `out`.
void read_shard(const std::string& path, std::vector<std::string>& out) {
  const tar::File file(path);
  std::string key;
  std::vector<std::pair<std::string, const tar::Member*>> sample;  // extension, member
  auto finish = [&] {
    if (sample.empty()) return;
    const auto txt =
        std::find_if(sample.begin(), sample.end(), [](const auto& p) { return p.first == "txt"; });
    if (txt == sample.end()) {
      std::vector<const tar::Member*> members;
      for (const auto& p : sample) members.push_back(p.second);
      fail("{}: sample '{}' (member at offset {}) has no txt member holding its prompt; its members: {}",
           path, key, sample.front().second->offset, member_list(members));
    }
    const tar::Member& m = *txt->second;
    std::string text = file.read(m);
    if (!utf8::is_valid(text)) {
      fail("{}: member '{}' at offset {}: the prompt is not valid UTF-8 (byte {})", path, m.name, m.offset,
           utf8::valid_prefix(text));
    }
    const size_t end = text.find_last_not_of(" \t\r\n\v\f");
    if (end == std::string::npos)
      fail("{}: member '{}' at offset {}: the prompt is empty", path, m.name, m.offset);
    text.resize(end + 1);
    out.push_back(std::move(text));
    sample.clear();
  };
  for (const tar::Member& m : file.members()) {
    std::string k, ext;
    if (!split_key(m.name, k, ext)) continue;
    if (k != key) finish();
    key = std::move(k);
    for (const auto& p : sample) {
      if (p.first == ext) {
        fail("{}: member '{}' at offset {}: sample '{}' already has a member '{}' with extension '{}'", path,
             m.name, m.offset, key, p.second->name, ext);
      }
    }
    sample.emplace_back(std::move(ext), &m);
  }
  finish();
}

// The shards one source names; empty for a JSONL file.
std::vector<std::string> shards_of(const std::string& source) {
  if (source.find_first_of("{}") != std::string::npos) {
    std::vector<std::string> shards = expand_braces(source);
    for (const auto& s : shards) {
      if (!fs::is_regular_file(s)) fail("shard '{}' (from '{}') does not exist or is not a file", s, source);
    }
    return shards;
  }
  if (fs::is_directory(source)) {
    std::vector<std::string> shards;
    for (const auto& e : fs::directory_iterator(source)) {
      if (e.is_regular_file() && e.path().extension() == ".tar") shards.push_back(e.path().string());
    }
    if (shards.empty()) fail("{}: a folder without .tar shards", source);
    std::sort(shards.begin(), shards.end());
    return shards;
  }
  if (ends_with(source, ".tar")) return {source};
  for (const char* compressed : {".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst"}) {
    if (ends_with(source, compressed))
      fail("{}: compressed shards are not read: decompress it to a .tar", source);
  }
  if (ends_with(source, ".pkl")) {
    fail(
        "{}: NeMo's pickled shard lists are not read: give the shards (a .tar, a folder or "
        "dir/shard-{{0..9}}.tar)",
        source);
  }
  return {};
}

}  // namespace

std::vector<std::string> expand_braces(const std::string& pattern) {
  std::vector<std::string> out{""};
  size_t pos = 0;
  while (pos <= pattern.size()) {
    const size_t open = pattern.find_first_of("{}", pos);
    const std::string literal =
        pattern.substr(pos, open == std::string::npos ? std::string::npos : open - pos);
    if (open == std::string::npos) {
      for (auto& s : out) s += literal;
      break;
    }
    if (pattern[open] == '}') fail("shard pattern '{}': '}}' at byte {} closes no '{{'", pattern, open);
    const size_t close = pattern.find_first_of("{}", open + 1);
    if (close == std::string::npos)
      fail("shard pattern '{}': '{{' at byte {} is never closed", pattern, open);
    if (pattern[close] == '{') fail("shard pattern '{}': nested braces at byte {}", pattern, close);
    const auto words = brace_words(std::string_view(pattern).substr(open + 1, close - open - 1), pattern);
    if (out.size() * words.size() > kMaxExpansions) {
      fail("shard pattern '{}' stands for more than {} paths", pattern, kMaxExpansions);
    }
    std::vector<std::string> next;
    next.reserve(out.size() * words.size());
    for (const auto& s : out) {
      for (const auto& w : words) next.push_back(s + literal + w);
    }
    out = std::move(next);
    pos = close + 1;
  }
  return out;
}

std::vector<std::string> read_prompts(const std::string& spec, const std::string& field) {
  std::vector<std::string> prompts;
  size_t start = 0;
  for (;;) {
    const size_t sep = spec.find("::", start);
    const std::string source = spec.substr(start, sep == std::string::npos ? std::string::npos : sep - start);
    if (source.empty()) fail("data source '{}': an empty entry in a '::' list", spec);
    const auto shards = shards_of(source);
    if (shards.empty()) {
      auto lines = read_string_field(source, field);
      prompts.insert(prompts.end(), std::make_move_iterator(lines.begin()),
                     std::make_move_iterator(lines.end()));
    }
    for (const auto& shard : shards) read_shard(shard, prompts);
    if (sep == std::string::npos) break;
    start = sep + 2;
  }
  if (prompts.empty()) fail("data source '{}': no samples with a txt member", spec);
  return prompts;
}

}  // namespace aligner
