// Training progress for the person watching. On a terminal: one live line, redrawn in place
//   step 12/100 | loss 2.3456 | lr 1.00e-04 | 5,432 tok/s | ETA 3m12s
// In a log file (stderr is not a terminal): a plain line every log_every steps, which grep, tail
// and plotting one-liners handle, where '\r' redraws would be garbage
//   [2026-11-23 10:00:00] step 12/100 loss=2.3456 lr=1.00e-04 tok/s=5432 eta=3m12s
#pragma once
#include <chrono>
#include <cstdint>
#include <functional>
#include <iostream>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "core/log.h"

namespace aligner {

using MetricValues = std::vector<std::pair<std::string, double>>;

// "45s", "3m12s", "2h05m", "3d04h": two units are enough to plan around. "?" when unknown
// (negative or not finite).
std::string format_duration(double seconds);
// 5432 -> "5,432".
std::string format_thousands(int64_t n);
// A value for display: learning rates (key "lr" or ending in "lr") as "1.00e-04", whole numbers
// without decimals, others with 4 decimals, and very small or large ones as "1.234e-05".
std::string format_metric(const std::string& key, double value);

// The two line formats, without the terminal's redraw codes and the log line's timestamp. "loss"
// and "lr" come first when present, then speed and ETA, then the other values in the order given.
std::string progress_tty_line(int64_t step, int64_t total_steps, const MetricValues& values,
                              double tokens_per_s, double eta_s);
std::string progress_log_line(int64_t step, int64_t total_steps, const MetricValues& values,
                              double tokens_per_s, double eta_s);

// Time left from a smoothed time per step. The smoothing is an exponential moving average with a
// per-step weight, so that it means the same whether it hears of every step or of every 100th.
class EtaEstimator {
 public:
  EtaEstimator(int64_t start_step, double start_time_s);
  // `step` steps are done at time `now_s`. Calls that do not advance the step are ignored.
  void record(int64_t step, double now_s);
  // Smoothed seconds per step; negative until a step is recorded.
  double seconds_per_step() const { return seconds_per_step_; }
  // Seconds until total_steps; negative while unknown.
  double eta_seconds(int64_t total_steps) const;

 private:
  int64_t last_step_;
  double last_time_s_;
  int intervals_ = 0;
  double seconds_per_step_ = -1;
};

// Progress of a data job of `total` items (prompts labelled, completions generated) in the log: a
// line every `every_s` seconds and when asked, never twice for the same count. The caller words
// the line from the seconds elapsed and the time left (negative while unknown), estimated from the
// items done so far.
class JobProgress {
 public:
  explicit JobProgress(int64_t total, double every_s = 10.0);
  void update(int64_t done, bool always,
              const std::function<std::string(double elapsed_s, double eta_s)>& line);

 private:
  int64_t total_, printed_ = -1;
  double every_s_, last_s_ = 0;
  std::chrono::steady_clock::time_point start_;
};

class Progress {
 public:
  // total_steps: the step number at the end. log_every: steps between log lines when not a
  // terminal (the last step is always logged). start_step: where a resumed run starts, so that the
  // first interval's time is spread over the steps done in it. On a terminal, log_info/log_warn
  // lines go through message() while this object lives, so they do not break the live line.
  Progress(int64_t total_steps, bool is_tty, int64_t log_every = 1, int64_t start_step = 0,
           std::ostream& out = std::cerr);
  ~Progress();
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;

  // `step` steps are done; `values` are shown as described above.
  void update(int64_t step, const MetricValues& values, double tokens_per_s);
  // A full line of its own, above the live line on a terminal.
  void message(const std::string& line);
  // Ends the live line; in a log, prints the last update if log_every skipped it. Idempotent.
  void finish();

 private:
  void draw_live_line();

  int64_t total_steps_;
  bool is_tty_;
  int64_t log_every_;
  std::ostream& out_;
  EtaEstimator eta_;
  bool sink_installed_ = false;
  LogSink previous_sink_;
  // A data loader thread's warning reaches message() while the main thread calls update().
  std::mutex mutex_;
  std::string live_line_;     // the terminal line now shown, "" when none
  std::string pending_line_;  // a log line not printed yet because of log_every
  bool finished_ = false;
};

}  // namespace aligner
