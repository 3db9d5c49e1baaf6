#include "io/resumable_jsonl.h"

#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "core/json.h"
#include "core/log.h"

namespace aligner {

int64_t read_complete_lines(const std::string& path,
                            const std::function<void(int64_t number, const std::string& text)>& line) {
  namespace fs = std::filesystem;
  if (!fs::exists(path)) return 0;
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("cannot read {}", path);
  int64_t lines = 0;
  uint64_t complete_bytes = 0;
  for (std::string text; std::getline(in, text);) {
    if (in.eof()) break;  // no newline after it: written in part
    line(++lines, text);
    complete_bytes += text.size() + 1;
  }
  in.close();
  if (fs::file_size(path) != complete_bytes) {
    log_warn("{}: dropping a partial last line (a stopped run was writing it)", path);
    fs::resize_file(path, complete_bytes);
  }
  return lines;
}

ResumedJsonl resume_jsonl(const std::string& path, const std::string& index_field,
                          const std::string& kind_field, bool overwrite) {
  namespace fs = std::filesystem;
  if (overwrite || !fs::exists(path) || fs::file_size(path) == 0) {
    std::ofstream out(path, std::ios::trunc);
    if (!out) fail("cannot write {}", path);
    return {};
  }
  // Where the lines of the last index begin, and how many lines come before them.
  uint64_t offset = 0, last_start = 0;
  int64_t last_first_line = 0, last = -1;
  read_complete_lines(path, [&](int64_t number, const std::string& line) {
    const std::string where = fmt::format("{}:{}", path, number);
    const auto j = parse_json(line, where);
    if (!j.is_object() || !j.contains(index_field) || !j[index_field].is_number_integer())
      fail("{}: no integer \"{}\": not a line of this command's output (overwrite=true starts {} afresh)",
           where, index_field, path);
    if (!j.contains(kind_field))
      fail("{}: no \"{}\": not a line of this command's output (overwrite=true starts {} afresh)", where,
           kind_field, path);
    const int64_t index = j[index_field].get<int64_t>();
    if (index < last)
      fail("{}: \"{}\" {} comes after {}: not this command's output (overwrite=true starts {} afresh)", where,
           index_field, index, last, path);
    if (index != last) {
      last = index;
      last_start = offset;
      last_first_line = number - 1;
    }
    offset += line.size() + 1;
  });
  if (last < 0) {
    fs::resize_file(path, 0);
    return {true, 0, 0};
  }
  fs::resize_file(path, last_start);
  return {true, last, last_first_line};
}

}  // namespace aligner
