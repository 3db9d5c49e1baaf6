#include "core/log.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

namespace aligner {

namespace {

std::atomic<int> g_rank{0};
std::atomic<bool> g_all_ranks{false};
// Data loader threads log too; the mutex keeps their lines whole and the sink swap safe.
std::mutex g_sink_mutex;
LogSink g_sink;

}  // namespace

std::string format_timestamp(std::time_t t) {
  std::tm tm{};
  localtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S", &tm);
  return buf;
}

void set_log_rank(int rank, bool all_ranks) {
  g_rank = rank;
  g_all_ranks = all_ranks;
}

bool log_enabled() {
  return g_rank == 0 || g_all_ranks;
}

bool log_debug_enabled() {
  static const bool on = [] {
    const char* level = std::getenv("ALIGNER_LOG_LEVEL");
    return level && std::strcmp(level, "debug") == 0;
  }();
  return on;
}

LogSink set_log_sink(LogSink sink) {
  std::lock_guard<std::mutex> lock(g_sink_mutex);
  std::swap(g_sink, sink);
  return sink;
}

void log_line(LogLevel level, const std::string& message) {
  if (!log_enabled()) return;
  std::string line = "[" + format_timestamp(std::time(nullptr)) + "] ";
  if (g_all_ranks) line += fmt::format("[rank {}] ", g_rank.load());
  if (level == LogLevel::warn) line += "warning: ";
  if (level == LogLevel::debug) line += "debug: ";
  line += message;
  std::lock_guard<std::mutex> lock(g_sink_mutex);
  if (g_sink) {
    g_sink(line);
  } else {
    // One write for the whole line, so that lines from several processes sharing the terminal
    // do not interleave mid-line.
    line += '\n';
    std::fwrite(line.data(), 1, line.size(), stderr);
  }
}

}  // namespace aligner
