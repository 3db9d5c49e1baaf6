// A JSONL output that a data-making run (aligner cai) appends to as it goes, so that a run that
// stops (killed, or a server it needs stops answering) keeps what it finished, and the same command
// run again continues from there. Each line names the input it came from (an index field, never
// decreasing); the lines of one input are written together, so only the last input's lines can be
// incomplete, and a continued run makes that input again.
#pragma once
#include <cstdint>
#include <functional>
#include <string>

namespace aligner {

struct ResumedJsonl {
  bool continued = false;   // the file was there and is continued
  int64_t first_index = 0;  // the input to start from
  int64_t kept_lines = 0;   // complete lines of earlier inputs, left as they were
};

// The complete lines of `path` (each ended by its newline), in order, each given to `line` with its
// 1-based number; a last line without its newline (a run stopped while writing it) is cut off the
// file, with a warning. Returns how many complete lines there are; a missing file has none.
int64_t read_complete_lines(const std::string& path,
                            const std::function<void(int64_t number, const std::string& text)>& line);

// Makes `path` ready for appending. A missing or empty file, or any file with `overwrite`, starts
// empty. Otherwise an unfinished last line (no newline) and the lines of the last index found are
// cut off, and the run starts at that index. A line that is not a JSON object with an integer
// `index_field` and a field `kind_field` (what this command's lines hold, so that another's output
// is never continued), or whose index is lower than the line's before it, is an error naming the
// line.
ResumedJsonl resume_jsonl(const std::string& path, const std::string& index_field,
                          const std::string& kind_field, bool overwrite);

}  // namespace aligner
