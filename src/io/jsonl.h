// JSON Lines files read by random access: opening a file reads it once to index where each line
// starts, and a record is parsed only when asked for, so a file larger than memory can be used.
#pragma once
#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace aligner {

class JsonlFile {
 public:
  // Indexes the non-blank lines. A missing, unreadable or empty (all blank) file is an error.
  explicit JsonlFile(std::string path);
  ~JsonlFile();
  JsonlFile(JsonlFile&& other) noexcept;
  JsonlFile& operator=(JsonlFile&& other) noexcept;
  JsonlFile(const JsonlFile&) = delete;
  JsonlFile& operator=(const JsonlFile&) = delete;

  const std::string& path() const { return path_; }
  // Records, i.e. non-blank lines.
  int64_t size() const { return static_cast<int64_t>(starts_.size()); }
  // 1-based line number in the file of record i; blank lines count.
  int64_t line_number(int64_t i) const;
  // "path:line" of record i, the prefix of every error about it.
  std::string where(int64_t i) const;
  // The raw text of record i, without its line ending.
  std::string read_text(int64_t i) const;
  // Record i parsed; it must be a JSON object.
  nlohmann::json read(int64_t i) const;

 private:
  std::string path_;
  int fd_ = -1;  // reads use pread, so concurrent readers share it safely
  std::vector<uint64_t> starts_;
  std::vector<uint32_t> lengths_;
  std::vector<uint32_t> lines_;
};

// The string field `field` of every record of the JSONL file at `path`, in order (prompts); a record
// without it is an error naming the file and line.
std::vector<std::string> read_string_field(const std::string& path, const std::string& field);

// Typed access to fields of a record. `where` is the record's "path:line"; `parent` names the
// object inside the record ("messages[2]") so errors give the full field path. A wrong type or a
// missing required field is an aligner::Error naming the field; an optional field that is absent
// or null gives nullopt.
std::string json_type_name(const nlohmann::json& value);
std::string field_name(std::string_view parent, std::string_view key);
const nlohmann::json& require_field(const nlohmann::json& obj, std::string_view key, std::string_view where,
                                    std::string_view parent = {});

template <class T>
T get_field(const nlohmann::json& obj, std::string_view key, std::string_view where,
            std::string_view parent = {});
template <class T>
std::optional<T> get_optional_field(const nlohmann::json& obj, std::string_view key, std::string_view where,
                                    std::string_view parent = {});
// The conversions behind get_field, for values reached some other way (array elements).
// T is one of std::string, double, int64_t (a float with an integral value is accepted), bool.
template <class T>
T json_as(const nlohmann::json& value, std::string_view where, std::string_view name);
template <>
std::string json_as<std::string>(const nlohmann::json&, std::string_view, std::string_view);
template <>
double json_as<double>(const nlohmann::json&, std::string_view, std::string_view);
template <>
int64_t json_as<int64_t>(const nlohmann::json&, std::string_view, std::string_view);
template <>
bool json_as<bool>(const nlohmann::json&, std::string_view, std::string_view);

}  // namespace aligner
