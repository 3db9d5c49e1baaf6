#include "core/metrics.h"

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <system_error>

#include "core/error.h"

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
  uint64_t keep = 0;  // bytes of the rows kept
  std::string line;
  while (std::getline(in, line)) {
    if (in.eof()) break;  // no newline after it: a torn write
    nlohmann::json row = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (!row.is_object()) break;  // includes parse failures, which are "discarded" values
    auto it = row.find("step");
    if (it != row.end() && it->is_number() && it->get<double>() > static_cast<double>(step)) break;
    keep += line.size() + 1;
  }
  in.close();
  std::error_code ec;
  std::filesystem::resize_file(path_, keep, ec);
  if (ec) fail("{}: cannot truncate: {}", path_, ec.message());
  open(std::ios::app);
}

}  // namespace aligner
