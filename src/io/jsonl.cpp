#include "io/jsonl.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>

#include "core/error.h"
#include "core/json.h"
#include "io/file_io.h"

namespace aligner {

namespace {

bool is_blank_byte(char c) {
  return c == ' ' || c == '\t' || c == '\r';
}

}  // namespace

JsonlFile::JsonlFile(std::string path) : path_(std::move(path)) {
  fd_ = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) fail_errno("open", path_);

  // Not zero-filled: opening a small file, as the data readers do for every file, then touches only
  // the pages it reads into.
  constexpr size_t kChunk = 1 << 20;
  const std::unique_ptr<char[]> buf(new char[kChunk]);
  uint64_t offset = 0;      // of buf[0] in the file
  uint64_t line_start = 0;  // of the current line
  uint32_t line = 1;
  bool blank = true;
  bool first_chunk = true;
  auto end_line = [&](uint64_t end) {
    if (!blank) {
      if (end - line_start > std::numeric_limits<uint32_t>::max()) {
        fail("{}:{}: line longer than 4 GiB", path_, line);
      }
      starts_.push_back(line_start);
      lengths_.push_back(static_cast<uint32_t>(end - line_start));
      lines_.push_back(line);
    }
  };
  for (;;) {
    ssize_t n = ::read(fd_, buf.get(), kChunk);
    if (n < 0) {
      if (errno == EINTR) continue;
      fail_errno("read", path_);
    }
    if (n == 0) break;
    size_t i = 0;
    // A UTF-8 byte order mark, as some editors write, is not part of the first record.
    if (first_chunk && n >= 3 && std::memcmp(buf.get(), "\xEF\xBB\xBF", 3) == 0) {
      i = 3;
      line_start = 3;
    }
    first_chunk = false;
    for (; i < static_cast<size_t>(n); ++i) {
      char c = buf[i];
      if (c == '\n') {
        end_line(offset + i);
        line_start = offset + i + 1;
        ++line;
        blank = true;
      } else if (blank && !is_blank_byte(c)) {
        blank = false;
      }
    }
    offset += static_cast<uint64_t>(n);
  }
  end_line(offset);
  if (starts_.empty()) {
    ::close(fd_);
    fd_ = -1;
    fail("{}: empty file: no JSON lines in it", path_);
  }
}

JsonlFile::~JsonlFile() {
  if (fd_ >= 0) ::close(fd_);
}

JsonlFile::JsonlFile(JsonlFile&& other) noexcept
    : path_(std::move(other.path_)),
      fd_(other.fd_),
      starts_(std::move(other.starts_)),
      lengths_(std::move(other.lengths_)),
      lines_(std::move(other.lines_)) {
  other.fd_ = -1;
}

JsonlFile& JsonlFile::operator=(JsonlFile&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    path_ = std::move(other.path_);
    fd_ = other.fd_;
    starts_ = std::move(other.starts_);
    lengths_ = std::move(other.lengths_);
    lines_ = std::move(other.lines_);
    other.fd_ = -1;
  }
  return *this;
}

int64_t JsonlFile::line_number(int64_t i) const {
  if (i < 0 || i >= size()) fail("{}: record {} out of range (file has {})", path_, i, size());
  return lines_[static_cast<size_t>(i)];
}

std::string JsonlFile::where(int64_t i) const {
  return fmt::format("{}:{}", path_, line_number(i));
}

std::string JsonlFile::read_text(int64_t i) const {
  line_number(i);  // range check
  std::string text(lengths_[static_cast<size_t>(i)], '\0');
  pread_exact(fd_, text.data(), text.size(), starts_[static_cast<size_t>(i)], path_);
  return text;
}

nlohmann::json JsonlFile::read(int64_t i) const {
  const nlohmann::json j = parse_json(read_text(i), where(i));
  if (!j.is_object()) fail("{}: expected a JSON object, got {}", where(i), json_type_name(j));
  return j;
}

std::string json_type_name(const nlohmann::json& value) {
  if (value.is_number_integer()) return "integer";
  if (value.is_number_float()) return "number";
  return value.type_name();
}

std::string field_name(std::string_view parent, std::string_view key) {
  if (parent.empty()) return std::string(key);
  return fmt::format("{}.{}", parent, key);
}

const nlohmann::json& require_field(const nlohmann::json& obj, std::string_view key, std::string_view where,
                                    std::string_view parent) {
  if (!obj.is_object()) {
    fail("{}: field \"{}\": expected an object, got {}", where, parent.empty() ? "(record)" : parent,
         json_type_name(obj));
  }
  auto it = obj.find(key);
  if (it == obj.end()) {
    std::string present;
    for (const auto& item : obj.items()) present += (present.empty() ? "" : ", ") + item.key();
    fail("{}: missing field \"{}\" (fields present: {})", where, field_name(parent, key),
         present.empty() ? "none" : present);
  }
  return *it;
}

template <>
std::string json_as<std::string>(const nlohmann::json& v, std::string_view where, std::string_view name) {
  if (!v.is_string()) fail("{}: field \"{}\": expected a string, got {}", where, name, json_type_name(v));
  return v.get<std::string>();
}

template <>
double json_as<double>(const nlohmann::json& v, std::string_view where, std::string_view name) {
  if (!v.is_number()) fail("{}: field \"{}\": expected a number, got {}", where, name, json_type_name(v));
  return v.get<double>();
}

template <>
int64_t json_as<int64_t>(const nlohmann::json& v, std::string_view where, std::string_view name) {
  if (v.is_number_integer()) return v.get<int64_t>();
  // 3.0 is accepted as 3, as Python writers produce floats for integers now and then.
  if (v.is_number_float()) {
    double d = v.get<double>();
    if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9.0e15) return static_cast<int64_t>(d);
  }
  fail("{}: field \"{}\": expected an integer, got {}", where, name,
       v.is_number_float() ? v.dump() : json_type_name(v));
}

template <>
bool json_as<bool>(const nlohmann::json& v, std::string_view where, std::string_view name) {
  if (!v.is_boolean()) fail("{}: field \"{}\": expected a boolean, got {}", where, name, json_type_name(v));
  return v.get<bool>();
}

template <class T>
T get_field(const nlohmann::json& obj, std::string_view key, std::string_view where,
            std::string_view parent) {
  return json_as<T>(require_field(obj, key, where, parent), where, field_name(parent, key));
}

template <class T>
std::optional<T> get_optional_field(const nlohmann::json& obj, std::string_view key, std::string_view where,
                                    std::string_view parent) {
  if (!obj.is_object()) return std::nullopt;
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return std::nullopt;
  return json_as<T>(*it, where, field_name(parent, key));
}

template std::string get_field<std::string>(const nlohmann::json&, std::string_view, std::string_view,
                                            std::string_view);
template double get_field<double>(const nlohmann::json&, std::string_view, std::string_view,
                                  std::string_view);
template int64_t get_field<int64_t>(const nlohmann::json&, std::string_view, std::string_view,
                                    std::string_view);
template bool get_field<bool>(const nlohmann::json&, std::string_view, std::string_view, std::string_view);
template std::optional<std::string> get_optional_field<std::string>(const nlohmann::json&, std::string_view,
                                                                    std::string_view, std::string_view);
template std::optional<double> get_optional_field<double>(const nlohmann::json&, std::string_view,
                                                          std::string_view, std::string_view);
template std::optional<int64_t> get_optional_field<int64_t>(const nlohmann::json&, std::string_view,
                                                            std::string_view, std::string_view);
template std::optional<bool> get_optional_field<bool>(const nlohmann::json&, std::string_view,
                                                      std::string_view, std::string_view);

std::vector<std::string> read_string_field(const std::string& path, const std::string& field) {
  const JsonlFile f(path);
  std::vector<std::string> out;
  for (int64_t i = 0; i < f.size(); ++i) out.push_back(get_field<std::string>(f.read(i), field, f.where(i)));
  return out;
}

}  // namespace aligner
