// Messages for the person running a command: one "[time] message" line each, on stderr. Every
// rank of a multi-process run executes the same code, so by default only rank 0 prints; otherwise
// N ranks would print each message N times.
#pragma once
#include <fmt/format.h>

#include <ctime>
#include <functional>
#include <string>
#include <utility>

namespace aligner {

// "2026-11-23 10:00:00", local time: what a person compares with the clock on the wall.
std::string format_timestamp(std::time_t t);

// This process's rank. Ranks other than 0 print nothing unless all_ranks, which is for debugging
// one rank's behaviour; then every line says which rank printed it.
void set_log_rank(int rank, bool all_ranks = false);
bool log_enabled();

// Where finished lines go (without their newline); an empty sink means stderr. Returns the sink
// it replaces, so that a temporary one (a live progress line, a test) can put it back.
using LogSink = std::function<void(const std::string& line)>;
LogSink set_log_sink(LogSink sink);

enum class LogLevel { debug, info, warn };
void log_line(LogLevel level, const std::string& message);

// Debug lines (what a server does with each batch) are too many for a normal run: they print only
// when the environment sets ALIGNER_LOG_LEVEL=debug.
bool log_debug_enabled();

template <class... Args>
void log_debug(fmt::format_string<Args...> format, Args&&... args) {
  if (log_enabled() && log_debug_enabled())
    log_line(LogLevel::debug, fmt::format(format, std::forward<Args>(args)...));
}

template <class... Args>
void log_info(fmt::format_string<Args...> format, Args&&... args) {
  if (log_enabled()) log_line(LogLevel::info, fmt::format(format, std::forward<Args>(args)...));
}

template <class... Args>
void log_warn(fmt::format_string<Args...> format, Args&&... args) {
  if (log_enabled()) log_line(LogLevel::warn, fmt::format(format, std::forward<Args>(args)...));
}

}  // namespace aligner
