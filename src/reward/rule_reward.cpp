#define PCRE2_CODE_UNIT_WIDTH 8
#include "reward/rule_reward.h"

#include <pcre2.h>

#include <charconv>
#include <cmath>
#include <optional>
#include <string_view>

#include "core/error.h"
#include "text/utf8.h"

namespace aligner {
namespace {

// A number as people and models write them: signed (ASCII or U+2212 minus), with thousands
// separators (1,234,567), decimals and an exponent. Not preceded by a digit, so that "1234,567"
// is not read from its middle, and "2024-06" is two numbers, not 2024 and -6.
constexpr std::string_view kNumber =
    R"((?<![0-9])(?:-|\x{2212})?(?:[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)"
    R"(|(?<![0-9])(?:-|\x{2212})?\.[0-9]+(?:[eE][-+]?[0-9]+)?)";

std::string pcre2_message(int code) {
  PCRE2_UCHAR buffer[256];
  pcre2_get_error_message(code, buffer, sizeof(buffer));
  return reinterpret_cast<const char*>(buffer);
}

// PCRE2 directly rather than text/regex.h's Regex: the answer is often a capture group, which
// Regex (whole matches, for tokenizer splits) does not give.
class Pattern {
 public:
  // `key`: the config key the pattern came from, for errors.
  Pattern(std::string_view pattern, std::string key, uint32_t options = 0) : key_(std::move(key)) {
    int error = 0;
    PCRE2_SIZE offset = 0;
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                          PCRE2_UTF | PCRE2_UCP | options, &error, &offset, nullptr);
    if (code_ == nullptr)
      fail("config key '{}': bad regex \"{}\" at offset {}: {}", key_, pattern, offset, pcre2_message(error));
    pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE);
    uint32_t groups = 0;
    pcre2_pattern_info(code_, PCRE2_INFO_CAPTURECOUNT, &groups);
    group_ = groups > 0 ? 1 : 0;
  }
  ~Pattern() { pcre2_code_free(code_); }
  Pattern(const Pattern&) = delete;
  Pattern& operator=(const Pattern&) = delete;

  // The last of the non-overlapping matches in `text` (valid UTF-8), left to right: its group 1
  // when the pattern has groups, else the whole match. None when nothing matches, or when group 1
  // took no part in the last match.
  std::optional<std::string_view> last_match(std::string_view text) const {
    MatchData m(code_);
    std::optional<std::string_view> found;
    const auto one_char = [&](size_t i) {
      return i < text.size() ? utf8::sequence_length(static_cast<unsigned char>(text[i])) : 1;
    };
    for (size_t pos = 0; pos <= text.size();) {
      if (!match(text, pos, m.data)) break;
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(m.data);
      const PCRE2_SIZE begin = ov[2 * group_], end = ov[2 * group_ + 1];
      if (begin == PCRE2_UNSET) {
        found.reset();
      } else {
        found = text.substr(begin, end - begin);
      }
      // After an empty match the search goes on one character later, as Regex::find_all does.
      size_t next = ov[1] > ov[0] ? ov[1] : ov[1] + one_char(ov[1]);
      if (next <= pos) next = pos + one_char(pos);
      pos = next;
    }
    return found;
  }

  bool matches(std::string_view text) const {
    MatchData m(code_);
    return match(text, 0, m.data);
  }

 private:
  struct MatchData {
    explicit MatchData(const pcre2_code* code) : data(pcre2_match_data_create_from_pattern(code, nullptr)) {}
    ~MatchData() { pcre2_match_data_free(data); }
    pcre2_match_data* data;
  };

  bool match(std::string_view text, size_t pos, pcre2_match_data* data) const {
    const int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(text.data()), text.size(), pos,
                               PCRE2_NO_UTF_CHECK, data, nullptr);
    if (rc == PCRE2_ERROR_NOMATCH) return false;
    // The match limits stop patterns that backtrack without end.
    if (rc < 0) fail("config key '{}': matching a response failed: {}", key_, pcre2_message(rc));
    return true;
  }

  pcre2_code* code_;
  std::string key_;
  uint32_t group_ = 0;
};

// Responses may end inside a character (cut at the token limit); PCRE2 needs valid UTF-8.
std::string valid_utf8(const std::string& s) {
  return utf8::is_valid(s) ? s : utf8::lossy(s);
}

std::string_view trim(std::string_view s) {
  constexpr std::string_view kSpace = " \t\n\r\f\v";
  const size_t begin = s.find_first_not_of(kSpace);
  if (begin == std::string_view::npos) return {};
  return s.substr(begin, s.find_last_not_of(kSpace) - begin + 1);
}

const Pattern& number_pattern() {
  static const Pattern p(kNumber, "reward.rule");
  return p;
}

// The last number written in `text`.
std::optional<double> last_number(std::string_view text) {
  const auto m = number_pattern().last_match(text);
  if (!m) return std::nullopt;
  std::string plain;
  for (size_t i = 0; i < m->size(); ++i) {
    if ((*m)[i] == ',') continue;
    if (m->substr(i, 3) == "\u2212") {
      plain += '-';
      i += 2;
      continue;
    }
    plain += (*m)[i];
  }
  double v = 0;
  const auto [end, ec] = std::from_chars(plain.data(), plain.data() + plain.size(), v);
  // Out of range (1e999) is no usable number.
  if (ec != std::errc() || end != plain.data() + plain.size() || !std::isfinite(v)) return std::nullopt;
  return v;
}

// The record, on one line and short enough for an error message.
std::string shortened(const nlohmann::json& record) {
  std::string s = record.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  constexpr size_t kMax = 200;
  if (s.size() <= kMax) return s;
  size_t n = kMax;
  while (n > 0 && (static_cast<unsigned char>(s[n]) & 0xC0) == 0x80) --n;
  return s.substr(0, n) + "...";
}

class RuleReward final : public Reward {
 public:
  explicit RuleReward(const RuleOptions& opt) : opt_(opt) {
    if (opt.rule != "exact_match" && opt.rule != "regex" && opt.rule != "numeric")
      fail("config key 'reward.rule' expects exact_match, regex or numeric, got '{}'", opt.rule);
    if (opt.rule == "regex" && opt.pattern.empty())
      fail("config key 'reward.pattern' must be set with reward.rule=regex: it extracts the answer");
    if (opt.rule == "exact_match" && !opt.pattern.empty())
      fail(
          "config key 'reward.pattern' is set but reward.rule=exact_match compares the whole response; "
          "reward.rule=regex compares what the pattern extracts");
    if (opt.answer_field.empty()) fail("config key 'reward.answer_field' is empty");
    if (!(opt.tolerance >= 0) || !std::isfinite(opt.tolerance))
      fail("config key 'reward.tolerance' must be a non-negative number, got {}", opt.tolerance);
    if (!opt.pattern.empty()) pattern_.emplace(opt.pattern, "reward.pattern");
    number_pattern();  // compiled now, not on the first rollout
  }

  std::vector<double> score(const std::vector<RewardQuery>& queries) override {
    std::vector<double> out;
    out.reserve(queries.size());
    for (const auto& q : queries) out.push_back(correct(q) ? 1.0 : 0.0);
    return out;
  }

 private:
  bool correct(const RewardQuery& q) const {
    const nlohmann::json& ref = reference(q);
    const std::string response = valid_utf8(q.response_text);
    if (opt_.rule == "numeric") {
      const double b = reference_number(q, ref);
      std::optional<double> a;
      if (pattern_) {
        if (const auto m = pattern_->last_match(response)) a = last_number(*m);
      } else {
        a = last_number(response);
      }
      return a && std::abs(*a - b) <= opt_.tolerance * std::max(1.0, std::abs(b));
    }
    const std::string expected = ref.is_string() ? ref.get<std::string>() : ref.dump();
    if (opt_.rule == "exact_match") return trim(response) == trim(expected);
    const auto m = pattern_->last_match(response);
    return m && trim(*m) == trim(expected);
  }

  const nlohmann::json& reference(const RewardQuery& q) const {
    const auto& field = opt_.answer_field;
    if (!q.record.is_object() || !q.record.contains(field))
      fail(
          "reward.rule: the prompt line has no field '{}' (reward.answer_field) for the reference answer: {}",
          field, shortened(q.record));
    const nlohmann::json& v = q.record[field];
    if (!v.is_string() && !v.is_number())
      fail(
          "reward.rule: the prompt line's field '{}' (reward.answer_field) holds {}, not a string or number: "
          "{}",
          field, v.type_name(), shortened(q.record));
    return v;
  }

  // The reference read as the response is (through reward.pattern when it matches there too, as in
  // a worked solution ending in \boxed{...}), else its last number: "#### 72" is 72.
  double reference_number(const RewardQuery& q, const nlohmann::json& ref) const {
    if (ref.is_number()) return ref.get<double>();
    const std::string text = valid_utf8(ref.get<std::string>());
    std::optional<std::string_view> part;
    if (pattern_) part = pattern_->last_match(text);
    if (const auto v = last_number(part ? *part : text)) return *v;
    fail("reward.rule=numeric: the prompt line's field '{}' (reward.answer_field) holds no number: {}",
         opt_.answer_field, shortened(q.record));
  }

  RuleOptions opt_;
  std::optional<Pattern> pattern_;
};

class FormatReward final : public Reward {
 public:
  explicit FormatReward(const std::string& pattern)
      : pattern_(pattern, "reward.format_pattern", PCRE2_ANCHORED | PCRE2_ENDANCHORED) {}

  std::vector<double> score(const std::vector<RewardQuery>& queries) override {
    std::vector<double> out;
    out.reserve(queries.size());
    for (const auto& q : queries) out.push_back(pattern_.matches(valid_utf8(q.response_text)) ? 1.0 : 0.0);
    return out;
  }

 private:
  Pattern pattern_;
};

}  // namespace

std::unique_ptr<Reward> make_rule_reward(const RuleOptions& opt) {
  return std::make_unique<RuleReward>(opt);
}

std::unique_ptr<Reward> make_format_reward(const std::string& pattern) {
  return std::make_unique<FormatReward>(pattern);
}

}  // namespace aligner
