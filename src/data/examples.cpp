#include "data/examples.h"

#include "core/error.h"

namespace aligner {

Truncation parse_truncation(std::string_view name) {
  if (name == "truncate_left") return Truncation::kTruncateLeft;
  if (name == "drop") return Truncation::kDrop;
  fail("unknown truncation policy \"{}\": expected truncate_left or drop", name);
}

void record_status(DataStats& stats, int64_t index, ExampleStatus status) {
  if (index < 0) return;
  if (stats.status.size() <= static_cast<size_t>(index))
    stats.status.resize(index + 1, ExampleStatus::kUnread);
  ExampleStatus& s = stats.status[static_cast<size_t>(index)];
  if (s != ExampleStatus::kUnread) return;
  s = status;
  if (status == ExampleStatus::kBad) ++stats.bad_lines;
  if (status == ExampleStatus::kDropped) ++stats.dropped;
  if (status == ExampleStatus::kTruncated) ++stats.truncated;
}

std::string data_report(const DataStats& stats, std::string_view path, int64_t max_length) {
  std::string parts;
  auto add = [&](const std::string& p) { parts += (parts.empty() ? "" : ", ") + p; };
  if (stats.bad_lines)
    add(fmt::format("{} bad lines skipped (first: {})", stats.bad_lines, stats.first_error));
  if (stats.dropped)
    add(fmt::format("{} examples dropped as longer than {} tokens", stats.dropped, max_length));
  if (stats.truncated) add(fmt::format("{} examples truncated to {} tokens", stats.truncated, max_length));
  if (parts.empty()) return {};
  return fmt::format("warning: {}: {}", path, parts);
}

}  // namespace aligner
