#include "core/progress.h"

#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <ctime>

namespace aligner {

namespace {

// Each step's weight in the smoothed step time: about a 20-step memory, long enough to average out
// step-to-step noise (sequence lengths vary), short enough to follow a real change of speed.
constexpr double kStepWeight = 0.05;

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

const double* find_value(const MetricValues& values, const std::string& key) {
  for (const auto& [k, v] : values) {
    if (k == key) return &v;
  }
  return nullptr;
}

std::string join(const std::vector<std::string>& parts, const char* sep) {
  std::string out;
  for (size_t i = 0; i < parts.size(); ++i) {
    if (i > 0) out += sep;
    out += parts[i];
  }
  return out;
}

// Both formats: step, loss and lr when given, speed, ETA, then the other values in the order given.
// `pair` goes between a key and its value.
std::string progress_line(int64_t step, int64_t total_steps, const MetricValues& values, const char* pair,
                          std::string speed, std::string eta, const char* separator) {
  std::vector<std::string> parts{fmt::format("step {}/{}", step, total_steps)};
  for (const char* key : {"loss", "lr"}) {
    if (const double* v = find_value(values, key)) {
      parts.push_back(std::string(key) + pair + format_metric(key, *v));
    }
  }
  // No speed where a step counts no tokens (the image recipes).
  if (!speed.empty()) parts.push_back(std::move(speed));
  parts.push_back(std::move(eta));
  for (const auto& [key, v] : values) {
    if (key != "loss" && key != "lr") parts.push_back(key + pair + format_metric(key, v));
  }
  return join(parts, separator);
}

}  // namespace

std::string format_duration(double seconds) {
  // Past ~30,000 years an estimate means "never"; the bound also keeps llround defined.
  if (!(seconds >= 0) || seconds > 1e12) return "?";
  int64_t s = std::llround(seconds);
  if (s < 60) return fmt::format("{}s", s);
  if (s < 3600) return fmt::format("{}m{:02}s", s / 60, s % 60);
  if (s < 86400) return fmt::format("{}h{:02}m", s / 3600, s % 3600 / 60);
  return fmt::format("{}d{:02}h", s / 86400, s % 86400 / 3600);
}

std::string format_thousands(int64_t n) {
  // The magnitude as unsigned, because -INT64_MIN does not fit in int64_t.
  uint64_t magnitude = n < 0 ? 0 - static_cast<uint64_t>(n) : static_cast<uint64_t>(n);
  std::string digits = std::to_string(magnitude);
  std::string out = n < 0 ? "-" : "";
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return out;
}

std::string format_metric(const std::string& key, double value) {
  bool is_lr = key.size() >= 2 && key.compare(key.size() - 2, 2, "lr") == 0;
  if (is_lr) return fmt::format("{:.2e}", value);
  if (!std::isfinite(value)) return fmt::format("{}", value);
  double magnitude = std::fabs(value);
  // + 0.0 turns -0.0 into 0.0, which would otherwise print as "-0".
  if (value == std::trunc(value) && magnitude < 1e15) return fmt::format("{:.0f}", value + 0.0);
  if (magnitude >= 1e-3 && magnitude < 1e6) return fmt::format("{:.4f}", value);
  return fmt::format("{:.3e}", value);
}

std::string progress_tty_line(int64_t step, int64_t total_steps, const MetricValues& values,
                              double tokens_per_s, double eta_s) {
  std::string speed = std::isfinite(tokens_per_s) ? format_thousands(std::llround(tokens_per_s)) : "?";
  return progress_line(step, total_steps, values, " ", tokens_per_s == 0 ? "" : speed + " tok/s",
                       "ETA " + format_duration(eta_s), " | ");
}

std::string progress_log_line(int64_t step, int64_t total_steps, const MetricValues& values,
                              double tokens_per_s, double eta_s) {
  std::string speed = std::isfinite(tokens_per_s) ? std::to_string(std::llround(tokens_per_s)) : "?";
  return progress_line(step, total_steps, values, "=", tokens_per_s == 0 ? "" : "tok/s=" + speed,
                       "eta=" + format_duration(eta_s), " ");
}

JobProgress::JobProgress(int64_t total, double every_s)
    : total_(total), every_s_(every_s), start_(std::chrono::steady_clock::now()) {}

void JobProgress::update(int64_t done, bool always,
                         const std::function<std::string(double elapsed_s, double eta_s)>& line) {
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  if ((!always && s - last_s_ < every_s_) || done == printed_) return;
  last_s_ = s;
  printed_ = done;
  log_info("{}", line(s, done > 0 ? s * double(total_ - done) / double(done) : -1.0));
}

EtaEstimator::EtaEstimator(int64_t start_step, double start_time_s)
    : last_step_(start_step), last_time_s_(start_time_s) {}

void EtaEstimator::record(int64_t step, double now_s) {
  if (step <= last_step_) return;
  double steps = static_cast<double>(step - last_step_);
  double per_step = (now_s - last_time_s_) / steps;
  if (intervals_ < 2) {
    // The first interval includes start-up (loading, allocator and kernel warm-up), so it stands
    // in only until a second one is measured, which then starts the average.
    seconds_per_step_ = per_step;
    ++intervals_;
  } else {
    double weight = 1 - std::pow(1 - kStepWeight, steps);
    seconds_per_step_ += weight * (per_step - seconds_per_step_);
  }
  last_step_ = step;
  last_time_s_ = now_s;
}

double EtaEstimator::eta_seconds(int64_t total_steps) const {
  if (seconds_per_step_ < 0) return -1;
  return seconds_per_step_ * static_cast<double>(std::max<int64_t>(0, total_steps - last_step_));
}

Progress::Progress(int64_t total_steps, bool is_tty, int64_t log_every, int64_t start_step, std::ostream& out)
    : total_steps_(total_steps),
      is_tty_(is_tty),
      log_every_(std::max<int64_t>(1, log_every)),
      out_(out),
      eta_(start_step, now_s()) {
  if (is_tty_) {
    previous_sink_ = set_log_sink([this](const std::string& line) { message(line); });
    sink_installed_ = true;
  }
}

Progress::~Progress() {
  finish();
}

void Progress::update(int64_t step, const MetricValues& values, double tokens_per_s) {
  std::lock_guard<std::mutex> lock(mutex_);
  eta_.record(step, now_s());
  double eta = eta_.eta_seconds(total_steps_);
  if (is_tty_) {
    live_line_ = progress_tty_line(step, total_steps_, values, tokens_per_s, eta);
    draw_live_line();
    return;
  }
  std::string line = progress_log_line(step, total_steps_, values, tokens_per_s, eta);
  if (step % log_every_ == 0 || step >= total_steps_) {
    out_ << '[' << format_timestamp(std::time(nullptr)) << "] " << line << '\n' << std::flush;
    pending_line_.clear();
  } else {
    pending_line_ = std::move(line);
  }
}

void Progress::message(const std::string& line) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (live_line_.empty()) {
    out_ << line << '\n' << std::flush;
    return;
  }
  out_ << "\r\033[K" << line << '\n';
  draw_live_line();
}

void Progress::finish() {
  // Before taking mutex_: set_log_sink waits for a log line being written, which may be waiting
  // for mutex_ in message().
  if (sink_installed_) {
    set_log_sink(std::move(previous_sink_));
    sink_installed_ = false;
  }
  std::lock_guard<std::mutex> lock(mutex_);
  if (finished_) return;
  finished_ = true;
  if (!live_line_.empty()) {
    out_ << '\n' << std::flush;
    live_line_.clear();
  }
  if (!pending_line_.empty()) {
    out_ << '[' << format_timestamp(std::time(nullptr)) << "] " << pending_line_ << '\n' << std::flush;
    pending_line_.clear();
  }
}

void Progress::draw_live_line() {
  std::string shown = live_line_;
  // A line wider than the terminal wraps, and '\r' then returns only to its last row, so every
  // redraw would leave a row behind. Only stderr's width is known here.
  winsize ws{};
  if (&out_ == &std::cerr && ioctl(STDERR_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 1 &&
      shown.size() >= ws.ws_col) {
    shown.resize(ws.ws_col - 1);
  }
  // Clear to the end of the line: the new text may be shorter than the old.
  out_ << "\r\033[K" << shown << std::flush;
}

}  // namespace aligner
