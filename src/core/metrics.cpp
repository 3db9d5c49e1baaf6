#include "core/metrics.h"

#include <fmt/ranges.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <optional>
#include <stdexcept>
#include <system_error>
#include <vector>

#include "core/error.h"
#include "core/json.h"
#include "core/log.h"

namespace aligner {

MetricsLog::MetricsLog(const std::string& path, bool append) : path_(path) {
  std::filesystem::path parent = std::filesystem::path(path_).parent_path();
  if (!parent.empty()) {
    std::error_code ec;
    std::filesystem::create_directories(parent, ec);
    if (ec) fail("{}: cannot create the directory: {}", parent.string(), ec.message());
  }
  open(append ? std::ios::app : std::ios::trunc);
}

void MetricsLog::open(std::ios::openmode mode) {
  out_.open(path_, std::ios::binary | std::ios::out | mode);
  if (!out_) fail("{}: cannot open for writing: {}", path_, std::strerror(errno));
}

void MetricsLog::write(const nlohmann::json& row) {
  if (!row.is_object()) throw std::invalid_argument("MetricsLog::write: a row must be a JSON object");
  std::string line = row.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  line += '\n';
  out_.write(line.data(), static_cast<std::streamsize>(line.size()));
  out_.flush();
  if (!out_) fail("{}: write failed: {}", path_, std::strerror(errno));
}

void MetricsLog::truncate_after(int64_t step) {
  out_.close();
  std::ifstream in(path_, std::ios::binary);
  if (!in) fail("{}: cannot open for reading: {}", path_, std::strerror(errno));
  // Written beside the file and renamed over it, so that a crash leaves the old rows or the new.
  const std::string kept_path = path_ + ".tmp";
  std::ofstream kept(kept_path, std::ios::binary | std::ios::trunc);
  if (!kept) fail("{}: cannot open for writing: {}", kept_path, std::strerror(errno));
  // A row without a "step" (a note, a summary) goes with the step of the row before it.
  std::optional<double> row_step;
  std::vector<int64_t> bad_lines;
  std::string line;
  for (int64_t number = 1; std::getline(in, line); ++number) {
    if (in.eof()) break;  // no newline after it: the torn last write of a killed run
    nlohmann::json row;
    try {
      row = parse_json(line, path_);
    } catch (const Error&) {
      // left null: counted with the bad lines below
    }
    if (!row.is_object()) {
      bad_lines.push_back(number);
      continue;
    }
    auto it = row.find("step");
    if (it != row.end() && it->is_number()) row_step = it->get<double>();
    if (row_step && *row_step > static_cast<double>(step)) continue;
    kept << line << '\n';
  }
  if (in.bad()) fail("{}: read failed: {}", path_, std::strerror(errno));
  in.close();
  kept.close();
  if (!kept) fail("{}: write failed: {}", kept_path, std::strerror(errno));
  std::error_code ec;
  std::filesystem::rename(kept_path, path_, ec);
  if (ec) fail("{}: cannot replace with {}: {}", path_, kept_path, ec.message());
  if (!bad_lines.empty()) {
    const size_t shown = std::min<size_t>(bad_lines.size(), 10);
    log_warn("{}: dropped {} line(s) that are not JSON objects: line {}{}", path_, bad_lines.size(),
             fmt::join(bad_lines.begin(), bad_lines.begin() + shown, ", "),
             shown < bad_lines.size() ? ", ..." : "");
  }
  open(std::ios::app);
}

}  // namespace aligner
