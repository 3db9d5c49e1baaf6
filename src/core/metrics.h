// metrics.jsonl: the run's numbers as one JSON object per line, for scripts and plots. Each line is
// handed to the OS as it is written, so a killed run keeps everything up to its last row.
#pragma once
#include <nlohmann/json.hpp>

#include <cstdint>
#include <fstream>
#include <string>

namespace aligner {

class MetricsLog {
 public:
  // append=false starts the file afresh; append=true (resuming) keeps what is there, and the
  // caller then calls truncate_after(resumed step). Creates the parent directory if needed.
  MetricsLog(const std::string& path, bool append);

  // One line. `row` must be an object; invalid UTF-8 in strings (sampled text) is replaced, not
  // an error, so logging cannot stop a run.
  void write(const nlohmann::json& row);

  // Drops every row whose "step" is greater than `step`, so that the rows a resumed run writes
  // again are not duplicated; a row without a "step" goes with the row before it. A last line
  // without a newline (the torn last write of a killed run) is dropped; so are lines that are not
  // JSON objects, with one warning that gives their line numbers. Every other row is kept as it
  // was written.
  void truncate_after(int64_t step);

  const std::string& path() const { return path_; }

 private:
  void open(std::ios::openmode mode);

  std::string path_;
  std::ofstream out_;
};

}  // namespace aligner
