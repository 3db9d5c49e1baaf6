// `aligner launch`: runs N copies of a command on this machine as the ranks of one data-parallel
// job, with the variables torchrun would set, for machines without torchrun. If one rank fails,
// the others would wait for it until their collectives time out, so they are stopped at once.
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "commands.h"
#include "core/error.h"
#include "dist/process_group.h"

extern char** environ;

namespace aligner::cli {
namespace {

struct Child {
  int rank = 0;
  pid_t pid = -1;
  bool running = false;
};

std::string describe(int status) {
  if (WIFEXITED(status)) return fmt::format("exited with code {}", WEXITSTATUS(status));
  if (WIFSIGNALED(status))
    return fmt::format("was killed by signal {} ({})", WTERMSIG(status), strsignal(WTERMSIG(status)));
  return fmt::format("ended with wait status {}", status);
}

// This process's environment with the rank variables replaced.
std::vector<std::string> child_environment(int rank, int nproc, int port) {
  const std::vector<std::pair<std::string, std::string>> ours = {
      {"RANK", std::to_string(rank)},        {"LOCAL_RANK", std::to_string(rank)},
      {"WORLD_SIZE", std::to_string(nproc)}, {"LOCAL_WORLD_SIZE", std::to_string(nproc)},
      {"MASTER_ADDR", "127.0.0.1"},          {"MASTER_PORT", std::to_string(port)},
  };
  std::vector<std::string> env;
  for (char** e = environ; *e; ++e) {
    const std::string entry(*e);
    const std::string name = entry.substr(0, entry.find('='));
    bool replaced = false;
    for (const auto& [n, v] : ours) replaced = replaced || n == name;
    if (!replaced) env.push_back(entry);
  }
  for (const auto& [n, v] : ours) env.push_back(n + "=" + v);
  // As torchrun: N processes each running a thread per core would oversubscribe the machine.
  if (nproc > 1 && !std::getenv("OMP_NUM_THREADS")) env.push_back("OMP_NUM_THREADS=1");
  return env;
}

// Reaps what has exited; true once nothing is left running.
bool reap(std::vector<Child>& children) {
  bool all_done = true;
  for (auto& c : children) {
    if (!c.running) continue;
    int status = 0;
    if (waitpid(c.pid, &status, WNOHANG) == c.pid) {
      c.running = false;
    } else {
      all_done = false;
    }
  }
  return all_done;
}

// SIGTERM, then SIGKILL for whatever still runs after a grace period to save its state or die.
void stop_all(std::vector<Child>& children) {
  for (const auto& c : children) {
    if (c.running) kill(c.pid, SIGTERM);
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!reap(children)) {
    if (std::chrono::steady_clock::now() > deadline) {
      for (auto& c : children) {
        if (!c.running) continue;
        kill(c.pid, SIGKILL);
        waitpid(c.pid, nullptr, 0);
        c.running = false;
      }
      return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

void launch(int nproc, int port, std::vector<std::string> command) {
  // `aligner` means this very binary, which need not be on PATH.
  if (command[0] == "aligner") {
    std::vector<char> self(4096);
    const ssize_t n = readlink("/proc/self/exe", self.data(), self.size() - 1);
    if (n > 0) command[0] = std::string(self.data(), static_cast<size_t>(n));
  }
  std::vector<char*> argv;
  for (auto& a : command) argv.push_back(a.data());
  argv.push_back(nullptr);

  // The launcher takes SIGINT, SIGTERM and SIGCHLD synchronously (sigwaitinfo below), so that a
  // signal cannot slip in between checking for it and waiting; the children get default handling.
  // Inherited SIG_IGN would make the kernel reap the children before waitpid sees their status.
  signal(SIGCHLD, SIG_DFL);
  sigset_t watched, previous;
  sigemptyset(&watched);
  for (int sig : {SIGINT, SIGTERM, SIGCHLD}) sigaddset(&watched, sig);
  sigprocmask(SIG_BLOCK, &watched, &previous);
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  sigset_t none, defaults;
  sigemptyset(&none);
  sigemptyset(&defaults);
  sigaddset(&defaults, SIGINT);
  sigaddset(&defaults, SIGTERM);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setsigdefault(&attr, &defaults);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);

  std::vector<Child> children;
  std::string error;
  for (int rank = 0; rank < nproc && error.empty(); ++rank) {
    auto env_strings = child_environment(rank, nproc, port);
    std::vector<char*> envp;
    for (auto& e : env_strings) envp.push_back(e.data());
    envp.push_back(nullptr);
    pid_t pid = -1;
    const int rc = posix_spawnp(&pid, argv[0], nullptr, &attr, argv.data(), envp.data());
    if (rc != 0) {
      error = fmt::format("could not start rank {} ({}): {}", rank, command[0], std::strerror(rc));
    } else {
      children.push_back({rank, pid, true});
    }
  }
  posix_spawnattr_destroy(&attr);

  while (error.empty()) {
    bool all_done = true;
    for (auto& c : children) {
      if (!c.running) continue;
      int status = 0;
      if (waitpid(c.pid, &status, WNOHANG) != c.pid) {
        all_done = false;
        continue;
      }
      c.running = false;
      if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        error = fmt::format("rank {} {}; stopped the other ranks", c.rank, describe(status));
        break;
      }
    }
    if (all_done || !error.empty()) break;
    const int sig = sigwaitinfo(&watched, nullptr);
    if (sig == SIGINT || sig == SIGTERM)
      error = fmt::format("interrupted by {}; stopped all ranks", strsignal(sig));
  }
  if (!error.empty()) stop_all(children);
  sigprocmask(SIG_SETMASK, &previous, nullptr);
  if (!error.empty()) throw Error(error);
}

}  // namespace

void add_launch(CLI::App& app) {
  auto* cmd =
      app.add_subcommand("launch",
                         "Run a command as N data-parallel ranks on this machine, as torchrun does: e.g. "
                         "aligner launch --nproc-per-node 2 -- aligner sft --config sft.yaml");
  auto nproc = std::make_shared<int>(1);
  auto port = std::make_shared<int>(dist::kDefaultMasterPort);
  auto command = std::make_shared<std::vector<std::string>>();
  cmd->add_option("--nproc-per-node", *nproc, "Number of ranks (processes) to start")
      ->required()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--master-port", *port, "Port of rank 0's rendezvous, on 127.0.0.1")
      ->check(CLI::Range(1, 65535));
  cmd->add_option("command", *command,
                  "The command after --, started with RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, "
                  "MASTER_ADDR and MASTER_PORT set (and OMP_NUM_THREADS=1 unless set); 'aligner' is this "
                  "binary")
      ->required();
  cmd->callback([=] { launch(*nproc, *port, *command); });
}

}  // namespace aligner::cli
