// The tokenized examples the data readers produce, the options they share, and what they count
// while reading (bad lines skipped, examples dropped or truncated for length).
#pragma once
#include <nlohmann/json.hpp>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace aligner {

struct Sequence {
  std::vector<int32_t> input_ids;
  std::vector<uint8_t> loss_mask;  // 1: the token is a training target, predicted from those before it
};

struct PreferenceExample {
  Sequence chosen, rejected;  // prompt + response; the loss mask covers the response only
  int64_t prompt_length = 0;  // tokens shared at the start of both
  std::optional<double> chosen_reward, rejected_reward, margin;
};

struct PromptExample {
  std::vector<int32_t> input_ids;  // ends where generation starts (an assistant header for chats)
  std::string text;                // the prompt as rendered, for logs and generation outputs
  nlohmann::json record;           // the line as read, for reward functions that check its fields
};

struct AttributeExample {
  std::vector<int32_t> input_ids;  // the whole text scored
  std::vector<float> values;       // one per attribute of the data set
  std::vector<uint8_t> present;    // 0 where the example has no value for the attribute
};

enum class Truncation {
  kTruncateLeft,  // drop prompt tokens from the start (after BOS); then cut the response's end
  kDrop,          // skip the example
};
Truncation parse_truncation(std::string_view name);  // "truncate_left" | "drop"

struct DataOptions {
  std::string format = "auto";  // the record layout (SFT and preference data list theirs)
  int64_t max_length = 2048;    // tokens of prompt + response (of the prompt alone for prompt data)
  Truncation truncation = Truncation::kTruncateLeft;
  bool skip_bad_lines = false;  // skip and count malformed records instead of failing
  // A response (or `text`) given as a plain string ends with EOS, so the model learns to stop.
  // Off for data whose strings already end with their end-of-turn marker (NeMo's own files).
  bool add_eos = true;
};

enum class ExampleStatus : uint8_t { kUnread = 0, kOk, kTruncated, kDropped, kBad };

// Counted once per example however many epochs read it, so the totals describe the data set.
// Readers update it, so a data set is read from one thread at a time.
struct DataStats {
  std::vector<ExampleStatus> status;  // per example index
  int64_t bad_lines = 0, dropped = 0, truncated = 0;
  std::string first_error;                 // why the first skipped line was bad
  std::map<std::string, int64_t> layouts;  // records per layout ("messages", "hh", ...), from check_examples
};

void record_status(DataStats& stats, int64_t index, ExampleStatus status);
// One line for the end of a run ("warning: FILE: 3 bad lines skipped (first: ...), ..."), or "" when
// nothing was skipped, dropped or truncated.
std::string data_report(const DataStats& stats, std::string_view path, int64_t max_length);

}  // namespace aligner
