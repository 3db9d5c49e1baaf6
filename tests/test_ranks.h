// Tests that need several processes: a free local port, and this test binary started again as the
// ranks of a group (exec, not fork: libtorch's threads make fork unsafe), each running one worker test.
#pragma once
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <string>
#include <thread>
#include <vector>

extern char** environ;

namespace aligner::test {

// A port nothing listens on now (the kernel's pick, released); 0 if none could be had.
inline int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  const bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
                  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0;
  ::close(fd);
  return ok ? ntohs(addr.sin_port) : 0;
}

// Runs the worker test `filter` of this binary as `ranks` processes with torchrun's variables on a
// free port and `env` (NAME=value) besides, and checks that each exited cleanly within `timeout` and
// left the file `done_dir`/rankR that a worker writes once its checks pass. gtest's own variables are
// not passed on: a shard index could skip the worker, an output file be overwritten.
inline void run_test_ranks(const std::string& filter, int ranks, const std::string& done_dir,
                           const std::vector<std::string>& env = {},
                           std::chrono::seconds timeout = std::chrono::seconds(150)) {
  const int port = free_port();
  ASSERT_GT(port, 0);
  std::vector<pid_t> pids;
  for (int rank = 0; rank < ranks; ++rank) {
    std::vector<std::string> ours = {
        "RANK=" + std::to_string(rank),        "LOCAL_RANK=" + std::to_string(rank),
        "WORLD_SIZE=" + std::to_string(ranks), "MASTER_ADDR=127.0.0.1",
        "MASTER_PORT=" + std::to_string(port), "OMP_NUM_THREADS=1"};
    ours.insert(ours.end(), env.begin(), env.end());
    std::vector<std::string> all;
    for (char** e = environ; *e; ++e) {
      const std::string entry(*e), name = entry.substr(0, entry.find('=') + 1);
      bool replaced = name.rfind("GTEST_", 0) == 0;
      for (const auto& kv : ours) replaced = replaced || kv.rfind(name, 0) == 0;
      if (!replaced) all.push_back(entry);
    }
    all.insert(all.end(), ours.begin(), ours.end());
    std::vector<char*> envp;
    for (auto& kv : all) envp.push_back(kv.data());
    envp.push_back(nullptr);
    std::string exe = "/proc/self/exe", flag = "--gtest_filter=" + filter;
    char* argv[] = {exe.data(), flag.data(), nullptr};
    pid_t pid = -1;
    ASSERT_EQ(posix_spawn(&pid, exe.c_str(), nullptr, nullptr, argv, envp.data()), 0);
    pids.push_back(pid);
  }
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  std::vector<int> status(pids.size(), -1);
  for (size_t finished = 0; finished < pids.size();) {
    for (size_t r = 0; r < pids.size(); ++r)
      if (status[r] == -1 && waitpid(pids[r], &status[r], WNOHANG) == pids[r]) ++finished;
    if (finished < pids.size() && std::chrono::steady_clock::now() > deadline) {
      for (size_t r = 0; r < pids.size(); ++r)
        if (status[r] == -1) {
          kill(pids[r], SIGKILL);
          waitpid(pids[r], &status[r], 0);
        }
      FAIL() << "the ranks did not finish in time";
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  for (int r = 0; r < ranks; ++r) {
    EXPECT_TRUE(WIFEXITED(status[r]) && WEXITSTATUS(status[r]) == 0)
        << "rank " << r << " status " << status[r];
    const std::string done = done_dir + "/rank" + std::to_string(r);
    EXPECT_EQ(access(done.c_str(), F_OK), 0) << "rank " << r << " did not pass its checks";
  }
}

}  // namespace aligner::test
