// Verifiable rewards (reward.rule, reward.format_pattern): a response checked against the reference
// answer in its prompt's JSONL line, as math and QA data sets allow, and a check of its shape.
#pragma once
#include <memory>
#include <string>

#include "reward/reward.h"

namespace aligner {

struct RuleOptions {
  // exact_match: the trimmed response is the trimmed reference. regex: `pattern`'s last match in
  // the response (its group 1 when it has groups) is. numeric: the number that `pattern`'s last
  // match holds, or the response's last number, is the reference's within `tolerance`.
  std::string rule;
  std::string answer_field = "answer";  // the prompt line's field holding the reference answer
  std::string pattern;                  // "" for none
  double tolerance = 1e-6;              // |answer - reference| <= tolerance x max(1, |reference|)
};

// 1 for a correct response, else 0. A bad rule or pattern is an error naming reward.rule or
// reward.pattern; a prompt line without a usable reference is an error when scored.
std::unique_ptr<Reward> make_rule_reward(const RuleOptions& opt);

// 1 when the whole response text matches `pattern` (PCRE2 syntax: `(?s)` lets `.` match newlines),
// else 0. A bad pattern is an error naming reward.format_pattern.
std::unique_ptr<Reward> make_format_reward(const std::string& pattern);

}  // namespace aligner
