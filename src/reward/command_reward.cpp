#include "reward/command_reward.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstring>
#include <optional>
#include <string_view>
#include <utility>

#include "core/error.h"
#include "text/utf8.h"

namespace aligner {
namespace {

using Clock = std::chrono::steady_clock;

constexpr size_t kStderrKept = 4096;  // the end of the program's stderr, for error messages
constexpr size_t kStderrLines = 3;
// How long the program gets to end by itself once its input is closed, or once it closed its
// output (to learn its exit status), before it is killed.
constexpr auto kExitGrace = std::chrono::seconds(2);

class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(Fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) {
      reset();
      fd_ = std::exchange(o.fd_, -1);
    }
    return *this;
  }
  ~Fd() { reset(); }
  int get() const { return fd_; }
  bool open() const { return fd_ >= 0; }
  void reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
};

// Both ends close on exec (the program gets its ends through dup2 alone) and are above 2, so that
// dup2 onto the program's 0, 1 and 2 never finds one of them already there.
void make_pipe(Fd& read_end, Fd& write_end) {
  int p[2];
  if (::pipe2(p, O_CLOEXEC) != 0) fail("reward.command: cannot create a pipe: {}", std::strerror(errno));
  Fd ends[2] = {Fd(p[0]), Fd(p[1])};
  for (Fd& e : ends) {
    if (e.get() > 2) continue;
    Fd moved(::fcntl(e.get(), F_DUPFD_CLOEXEC, 3));
    if (!moved.open()) fail("reward.command: cannot create a pipe: {}", std::strerror(errno));
    e = std::move(moved);
  }
  read_end = std::move(ends[0]);
  write_end = std::move(ends[1]);
}

void set_nonblocking(const Fd& fd) {
  ::fcntl(fd.get(), F_SETFL, ::fcntl(fd.get(), F_GETFL) | O_NONBLOCK);
}

// SIGPIPE held back in this thread while it lives, so that writing to a program that has exited
// fails with EPIPE instead of ending aligner. A SIGPIPE that the writes raised is taken before the
// signal is let through again.
class SigpipeBlocked {
 public:
  SigpipeBlocked() {
    sigemptyset(&pipe_);
    sigaddset(&pipe_, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe_, &old_);
    sigset_t pending;
    sigpending(&pending);
    already_pending_ = sigismember(&pending, SIGPIPE) == 1;
  }
  ~SigpipeBlocked() {
    sigset_t pending;
    sigpending(&pending);
    if (!already_pending_ && sigismember(&pending, SIGPIPE) == 1) {
      const timespec zero = {};
      sigtimedwait(&pipe_, nullptr, &zero);
    }
    pthread_sigmask(SIG_SETMASK, &old_, nullptr);
  }
  SigpipeBlocked(const SigpipeBlocked&) = delete;
  SigpipeBlocked& operator=(const SigpipeBlocked&) = delete;

 private:
  sigset_t pipe_, old_;
  bool already_pending_ = false;
};

std::string_view trim(std::string_view s) {
  constexpr std::string_view kSpace = " \t\n\r\f\v";
  const size_t begin = s.find_first_not_of(kSpace);
  if (begin == std::string_view::npos) return {};
  return s.substr(begin, s.find_last_not_of(kSpace) - begin + 1);
}

// One finite number, maybe with whitespace around it: what Python's print(float) writes.
std::optional<double> parse_answer(std::string_view line) {
  line = trim(line);
  if (!line.empty() && line[0] == '+') line.remove_prefix(1);
  double v = 0;
  const auto [end, ec] = std::from_chars(line.data(), line.data() + line.size(), v);
  if (line.empty() || ec != std::errc() || end != line.data() + line.size() || !std::isfinite(v))
    return std::nullopt;
  return v;
}

// A line of the program's output as an error message shows it: quoted, escaped and short.
std::string quoted(std::string_view s) {
  constexpr size_t kMax = 200;
  return fmt::format("{:?}{}", utf8::lossy(s.substr(0, kMax)), s.size() > kMax ? "..." : "");
}

// The query as the program reads it: the prompt's record with the texts over any fields so named.
std::string request_line(const RewardQuery& q) {
  nlohmann::json j = q.record.is_object() ? q.record : nlohmann::json::object();
  j["prompt"] = q.prompt_text;
  j["response"] = q.response_text;
  // Texts may end inside a character (a response cut at the token limit); JSON needs UTF-8.
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

class CommandReward final : public Reward {
 public:
  CommandReward(std::string command, double timeout_s) : command_(std::move(command)), timeout_s_(timeout_s) {
    start();
  }

  ~CommandReward() override {
    if (pid_ < 0) return;
    in_.reset();  // end of input: a program that reads until then ends by itself
    const auto until = Clock::now() + kExitGrace;
    while (!ended() && Clock::now() < until) {
      // Its output is read and dropped meanwhile, so that a program writing as it ends does not
      // wait on a full pipe.
      pollfd fds[2] = {{out_.get(), POLLIN, 0}, {err_.get(), POLLIN, 0}};
      ::poll(fds, 2, 10);
      read_output();
      out_buf_.clear();
      read_stderr();
    }
    kill_and_reap();
  }

  std::vector<double> score(const std::vector<RewardQuery>& queries) override {
    if (!broken_.empty()) fail("{}", broken_);
    if (queries.empty()) return {};
    const size_t n = queries.size();
    std::string input;
    for (const auto& q : queries) input += request_line(q) + '\n';

    bool out_eof = read_output();
    if (!out_buf_.empty())
      stop(fmt::format("wrote {} when no query was waiting for an answer",
                       quoted(std::string_view(out_buf_).substr(0, out_buf_.find('\n')))));
    if (!in_.open()) stop("closed its stdin");

    const SigpipeBlocked no_sigpipe;
    // Clamped so that a timeout of years still fits the clock's nanoseconds.
    const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                             std::chrono::duration<double>(std::min(timeout_s_, 1e9)));
    std::vector<double> answers;
    answers.reserve(n);
    size_t written = 0;
    while (answers.size() < n) {
      if (const auto how = ended()) {
        // What it wrote before it ended counts.
        read_output();
        take_lines(answers, n, true);
        if (answers.size() == n) break;
        stop(fmt::format("{} after {} of {} answers", *how, answers.size(), n));
      }
      if (out_eof) {
        const auto until = std::min(deadline, Clock::now() + kExitGrace);
        while (!ended() && Clock::now() < until) ::poll(nullptr, 0, 10);
        stop(fmt::format("{} after {} of {} answers", ended().value_or("closed its stdout"), answers.size(),
                         n));
      }
      const auto now = Clock::now();
      if (now >= deadline)
        stop(fmt::format("gave {} of {} answers within reward.timeout_s = {} s; it was killed",
                         answers.size(), n, timeout_s_));
      pollfd fds[3];
      nfds_t count = 0;
      fds[count++] = {out_.get(), POLLIN, 0};
      if (err_.open()) fds[count++] = {err_.get(), POLLIN, 0};
      if (written < input.size() && in_.open()) fds[count++] = {in_.get(), POLLOUT, 0};
      // Short waits: a program that exits while something it started holds its stdout open is
      // seen through ended() alone.
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - now).count() + 1;
      if (::poll(fds, count, int(std::clamp<int64_t>(left, 1, 100))) < 0 && errno != EINTR)
        stop(fmt::format("could not be waited for: poll: {}", std::strerror(errno)));
      write_some(input, written);
      read_stderr();
      out_eof = read_output();
      take_lines(answers, n, out_eof);
    }
    return answers;
  }

 private:
  void start() {
    Fd in_read, out_write, err_write;
    make_pipe(in_read, in_);
    make_pipe(out_, out_write);
    make_pipe(err_, err_write);

    // posix_spawn rather than fork: it does not copy the page tables of a process that may hold
    // models in tens of GB, and the child runs nothing of ours between fork and exec.
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, in_read.get(), 0);
    posix_spawn_file_actions_adddup2(&actions, out_write.get(), 1);
    posix_spawn_file_actions_adddup2(&actions, err_write.get(), 2);
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 34))
    // Descriptors that other code opened without O_CLOEXEC (ours have it) stay out of the program.
    posix_spawn_file_actions_addclosefrom_np(&actions, 3);
#endif
    posix_spawnattr_t attr;
    posix_spawnattr_init(&attr);
    // A process group of its own, to kill it with whatever it started; every signal at its
    // default and none blocked, whatever aligner ignores (SIGPIPE) or handles (SIGINT, SIGTERM).
    sigset_t all, none;
    sigfillset(&all);
    sigemptyset(&none);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK);
    posix_spawnattr_setpgroup(&attr, 0);
    posix_spawnattr_setsigdefault(&attr, &all);
    posix_spawnattr_setsigmask(&attr, &none);

    std::string sh = "sh", c = "-c", command = command_;
    char* argv[] = {sh.data(), c.data(), command.data(), nullptr};
    pid_t pid = -1;
    const int rc = posix_spawn(&pid, "/bin/sh", &actions, &attr, argv, environ);
    posix_spawn_file_actions_destroy(&actions);
    posix_spawnattr_destroy(&attr);
    if (rc != 0) fail("reward.command '{}': cannot start /bin/sh: {}", command_, std::strerror(rc));
    pid_ = pid;
    set_nonblocking(in_);
    set_nonblocking(out_);
    set_nonblocking(err_);
  }

  // How the program ended, once it has. It stays a zombie (WNOWAIT) until kill_and_reap, so that
  // its pid, which is its group's id, cannot go to another process before the group is killed.
  std::optional<std::string> ended() const {
    siginfo_t info = {};
    if (::waitid(P_PID, id_t(pid_), &info, WEXITED | WNOHANG | WNOWAIT) != 0)
      return errno == ECHILD ? std::optional<std::string>("ended") : std::nullopt;
    if (info.si_pid == 0) return std::nullopt;
    if (info.si_code == CLD_EXITED) return fmt::format("exited with status {}", info.si_status);
    return fmt::format("was killed by signal {} ({})", info.si_status, strsignal(info.si_status));
  }

  void kill_and_reap() {
    if (pid_ < 0) return;
    ::kill(-pid_, SIGKILL);
    while (::waitpid(pid_, nullptr, 0) < 0 && errno == EINTR) {
    }
    pid_ = -1;
  }

  // Kills the program and whatever it started, and fails with `what` and the end of its stderr;
  // every later score() call fails the same way.
  [[noreturn]] void stop(const std::string& what) {
    kill_and_reap();
    read_stderr();  // all it wrote is in the pipe now
    broken_ = fmt::format("reward.command '{}' {}", command_, what);
    const std::string err = stderr_end();
    if (!err.empty()) broken_ += "; its stderr ends: " + err;
    in_.reset();
    out_.reset();
    err_.reset();
    fail("{}", broken_);
  }

  void write_some(const std::string& input, size_t& written) {
    while (written < input.size() && in_.open()) {
      const ssize_t r = ::write(in_.get(), input.data() + written, input.size() - written);
      if (r > 0) {
        written += size_t(r);
      } else if (errno == EAGAIN) {
        return;
      } else if (errno != EINTR) {
        // EPIPE: it closed its stdin. Whether it ended, or still answers, shows on its stdout.
        in_.reset();
      }
    }
  }

  // Appends what the program has written to out_buf_; true at the end of its output.
  bool read_output() {
    char buf[65536];
    while (out_.open()) {
      const ssize_t r = ::read(out_.get(), buf, sizeof buf);
      if (r > 0) {
        out_buf_.append(buf, size_t(r));
      } else if (r < 0 && errno == EINTR) {
        continue;
      } else {
        return r == 0 || errno != EAGAIN;
      }
    }
    return true;
  }

  // The complete lines in out_buf_ as answers; at the end of the output, the last one too.
  void take_lines(std::vector<double>& answers, size_t n, bool at_end) {
    size_t start = 0;
    for (size_t nl; (nl = out_buf_.find('\n', start)) != std::string::npos; start = nl + 1)
      take(std::string_view(out_buf_).substr(start, nl - start), answers, n);
    out_buf_.erase(0, start);
    if (at_end && !out_buf_.empty()) {
      take(out_buf_, answers, n);
      out_buf_.clear();
    }
  }

  void take(std::string_view line, std::vector<double>& answers, size_t n) {
    if (answers.size() == n)
      stop(fmt::format("wrote more answers than the {} asked for: {}", n, quoted(line)));
    const auto v = parse_answer(line);
    if (!v)
      stop(fmt::format("wrote {} where answer {} of {} should be a finite number", quoted(line),
                       answers.size() + 1, n));
    answers.push_back(*v);
  }

  void read_stderr() {
    char buf[4096];
    while (err_.open()) {
      const ssize_t r = ::read(err_.get(), buf, sizeof buf);
      if (r > 0) {
        err_tail_.append(buf, size_t(r));
        if (err_tail_.size() > 2 * kStderrKept) err_tail_.erase(0, err_tail_.size() - kStderrKept);
      } else if (r == 0 || errno != EINTR) {
        if (r == 0 || errno != EAGAIN) err_.reset();
        return;
      }
    }
  }

  // The last few non-empty lines of its stderr, on one line.
  std::string stderr_end() const {
    std::vector<std::string_view> lines;
    std::string_view rest(err_tail_);
    while (!rest.empty()) {
      const size_t nl = rest.find('\n');
      const auto line = trim(rest.substr(0, nl));
      if (!line.empty()) lines.push_back(line);
      rest = nl == std::string_view::npos ? std::string_view() : rest.substr(nl + 1);
    }
    std::string out;
    for (size_t i = lines.size() - std::min(lines.size(), kStderrLines); i < lines.size(); ++i)
      out += (out.empty() ? "" : " | ") + std::string(lines[i]);
    return utf8::lossy(out);
  }

  std::string command_;
  double timeout_s_;
  pid_t pid_ = -1;
  Fd in_, out_, err_;     // the program's stdin, stdout and stderr (our ends, non-blocking)
  std::string out_buf_;   // its output after the last complete line taken
  std::string err_tail_;  // the end of its stderr
  std::string broken_;    // why it was stopped, once it was
};

}  // namespace

std::unique_ptr<Reward> start_command_reward(const std::string& command, double timeout_s) {
  if (command.empty()) fail("config key 'reward.command' is empty");
  if (!(timeout_s > 0) || !std::isfinite(timeout_s))
    fail("config key 'reward.timeout_s' must be a positive number of seconds, got {}", timeout_s);
  return std::make_unique<CommandReward>(command, timeout_s);
}

}  // namespace aligner
