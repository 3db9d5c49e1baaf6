// Data parallelism: reading torchrun's and Slurm's variables, the collectives and the bucketed
// gradient sync on a real two-rank group (Gloo on CPU; NCCL where a CUDA build has two GPUs), and
// `aligner launch`. The two ranks are this test binary started again (exec, not fork: libtorch's
// threads make fork unsafe), each running only DistWorker.TwoRanks; the parent checks that both
// finished it cleanly.
#include <dirent.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <thread>

#include <torch/cuda.h>

#include "core/error.h"
#include "core/torch_compat.h"
#include "dist/ddp.h"
#include "dist/process_group.h"
#include "test_ranks.h"

namespace aligner::dist {
namespace {

// A fresh directory for files written by child processes, made and removed with POSIX calls:
// the libtorch.so of PyTorch 2.x exports its own std::filesystem::remove_all, which crashes when
// a binary linked against it calls that.
class ScratchDir {
 public:
  ScratchDir() {
    std::string pattern = testing::TempDir() + "aligner_dist_XXXXXX";
    if (mkdtemp(pattern.data())) path_ = pattern;
  }
  ~ScratchDir() {
    if (path_.empty()) return;
    if (DIR* d = opendir(path_.c_str())) {
      while (dirent* e = readdir(d)) {
        if (std::string(e->d_name) != "." && std::string(e->d_name) != "..") unlink(file(e->d_name).c_str());
      }
      closedir(d);
    }
    rmdir(path_.c_str());
  }
  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

void expect_error(const std::function<void()>& fn, const std::string& fragment) {
  try {
    fn();
    ADD_FAILURE() << "expected an aligner::Error containing: " << fragment;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  }
}

// Clears every variable read_dist_env looks at, sets the given ones, and restores all afterwards.
class ScopedEnv {
 public:
  explicit ScopedEnv(const std::vector<std::pair<std::string, std::string>>& values) {
    for (const char* name : {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
                             "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_NODELIST"}) {
      const char* v = std::getenv(name);
      saved_.emplace_back(name, v ? std::optional<std::string>(v) : std::nullopt);
      unsetenv(name);
    }
    for (const auto& [name, value] : values) setenv(name.c_str(), value.c_str(), 1);
  }
  ~ScopedEnv() {
    for (const auto& [name, value] : saved_) {
      if (value) {
        setenv(name.c_str(), value->c_str(), 1);
      } else {
        unsetenv(name.c_str());
      }
    }
  }

 private:
  std::vector<std::pair<std::string, std::optional<std::string>>> saved_;
};

TEST(DistEnv, NoVariablesMeansOneProcess) {
  ScopedEnv env({});
  DistEnv e = read_dist_env();
  EXPECT_EQ(e.rank, 0);
  EXPECT_EQ(e.world_size, 1);
  EXPECT_EQ(e.local_rank, 0);
  EXPECT_EQ(e.master_port, kDefaultMasterPort);
}

TEST(DistEnv, ReadsTorchrun) {
  ScopedEnv env({{"RANK", "5"},
                 {"WORLD_SIZE", "8"},
                 {"LOCAL_RANK", "1"},
                 {"MASTER_ADDR", "node3"},
                 {"MASTER_PORT", "1234"},
                 {"SLURM_PROCID", "0"}});  // torchrun inside a Slurm allocation: torchrun wins
  DistEnv e = read_dist_env();
  EXPECT_EQ(e.rank, 5);
  EXPECT_EQ(e.world_size, 8);
  EXPECT_EQ(e.local_rank, 1);
  EXPECT_EQ(e.master_addr, "node3");
  EXPECT_EQ(e.master_port, 1234);
}

TEST(DistEnv, TorchrunErrorsNameTheVariable) {
  {
    ScopedEnv env({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"}});
    expect_error(read_dist_env, "LOCAL_RANK is not set");
  }
  {
    ScopedEnv env({{"RANK", "0"}, {"LOCAL_RANK", "0"}});
    expect_error(read_dist_env, "WORLD_SIZE is not set");
  }
  {
    ScopedEnv env({{"RANK", "x1"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "0"}});
    expect_error(read_dist_env, "RANK='x1' is not an integer");
  }
  {
    ScopedEnv env({{"RANK", "2"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "0"}, {"MASTER_ADDR", "h"}});
    expect_error(read_dist_env, "RANK=2 must be below WORLD_SIZE=2");
  }
  {
    ScopedEnv env({{"RANK", "0"}, {"WORLD_SIZE", "0"}, {"LOCAL_RANK", "0"}});
    expect_error(read_dist_env, "WORLD_SIZE=0 must be at least 1");
  }
  {
    ScopedEnv env({{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "1"}});
    expect_error(read_dist_env, "MASTER_ADDR is not set");
  }
  {
    ScopedEnv env({{"RANK", "1"},
                   {"WORLD_SIZE", "2"},
                   {"LOCAL_RANK", "1"},
                   {"MASTER_ADDR", "h"},
                   {"MASTER_PORT", "70000"}});
    expect_error(read_dist_env, "MASTER_PORT=70000 is not a TCP port");
  }
}

TEST(DistEnv, ReadsSlurm) {
  {
    ScopedEnv env({{"SLURM_PROCID", "3"},
                   {"SLURM_NTASKS", "8"},
                   {"SLURM_LOCALID", "1"},
                   {"SLURM_JOB_NODELIST", "gpu[07-09,12],cpu1"},
                   {"SLURM_NODELIST", "other"}});
    DistEnv e = read_dist_env();
    EXPECT_EQ(e.rank, 3);
    EXPECT_EQ(e.world_size, 8);
    EXPECT_EQ(e.local_rank, 1);
    EXPECT_EQ(e.master_addr, "gpu07");
    EXPECT_EQ(e.master_port, kDefaultMasterPort);
  }
  {
    ScopedEnv env({{"SLURM_PROCID", "0"},
                   {"SLURM_NTASKS", "2"},
                   {"SLURM_LOCALID", "0"},
                   {"SLURM_NODELIST", "a1,a2"},
                   {"MASTER_PORT", "4000"}});
    DistEnv e = read_dist_env();
    EXPECT_EQ(e.master_addr, "a1");
    EXPECT_EQ(e.master_port, 4000);
  }
  {
    ScopedEnv env({{"SLURM_PROCID", "0"},
                   {"SLURM_NTASKS", "2"},
                   {"SLURM_LOCALID", "0"},
                   {"SLURM_JOB_NODELIST", "a[1-2]"},
                   {"MASTER_ADDR", "10.0.0.5"}});
    EXPECT_EQ(read_dist_env().master_addr, "10.0.0.5");
  }
}

TEST(DistEnv, SlurmErrorsNameTheVariable) {
  {
    ScopedEnv env({{"SLURM_PROCID", "0"}, {"SLURM_LOCALID", "0"}});
    expect_error(read_dist_env, "SLURM_NTASKS is not set");
  }
  {
    ScopedEnv env({{"SLURM_PROCID", "4"}, {"SLURM_NTASKS", "4"}, {"SLURM_LOCALID", "0"}});
    expect_error(read_dist_env, "SLURM_PROCID=4 must be below SLURM_NTASKS=4");
  }
  {
    ScopedEnv env({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "2"}, {"SLURM_LOCALID", "0"}});
    expect_error(read_dist_env, "nor is SLURM_JOB_NODELIST or SLURM_NODELIST");
  }
  {
    ScopedEnv env(
        {{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "2"}, {"SLURM_LOCALID", "0"}, {"SLURM_NODELIST", "n[1-2"}});
    expect_error(read_dist_env, "SLURM_NODELIST='n[1-2' is not a Slurm node list");
  }
}

TEST(DistEnv, FirstSlurmHost) {
  EXPECT_EQ(first_slurm_host("node1", "V"), "node1");
  EXPECT_EQ(first_slurm_host("host1,host2", "V"), "host1");
  EXPECT_EQ(first_slurm_host("prefix[1-4,7]", "V"), "prefix1");
  EXPECT_EQ(first_slurm_host("prefix[7,1-4]", "V"), "prefix7");
  EXPECT_EQ(first_slurm_host("gpu[007-010]", "V"), "gpu007");
  EXPECT_EQ(first_slurm_host("r[1-2]-n[03-04],x9", "V"), "r1-n03");
  EXPECT_EQ(first_slurm_host("a[3]b", "V"), "a3b");
  for (const char* bad : {"", ",a", "p[1-4", "p]", "p[]", "p[-3]"}) {
    expect_error([&] { first_slurm_host(bad, "SLURM_NODELIST"); }, "is not a Slurm node list");
  }
}

TEST(Dist, OneProcessMakesEveryCollectiveANoOp) {
  Dist dist = Dist::init(DistEnv{}, at::kCPU);
  EXPECT_TRUE(dist.is_main());
  EXPECT_EQ(dist.world_size(), 1);
  std::vector<at::Tensor> t{at::full({2}, 3.0)};
  dist.all_reduce_sum(t);
  dist.all_reduce_mean(t);
  dist.broadcast(t, 0);
  dist.barrier();
  EXPECT_TRUE(t[0].equal(at::full({2}, 3.0)));
  EXPECT_EQ(dist.mean(std::vector<double>{1.5, 2.5}), (std::vector<double>{1.5, 2.5}));
  expect_error([] { Dist::init(DistEnv{2, 2, 0, "h", 1}, at::kCPU); }, "not a valid position");
}

TEST(DataParallel, BucketsInReverseOrderByDtypeAndSize) {
  Dist dist;
  auto f = [](int64_t n) { return at::zeros({n}, at::kFloat).requires_grad_(); };
  at::Tensor dbl = at::zeros({4}, at::kDouble).requires_grad_();
  at::Tensor frozen = at::zeros({3});  // left out
  std::vector<at::Tensor> params{f(10), f(10), dbl, f(10), frozen, f(5)};
  params.push_back(params[1]);  // tied: counted once
  DataParallelOptions opts;
  opts.bucket_bytes = 80;  // twenty floats
  DataParallel ddp(dist, params, opts);
  // Reverse order: 5 (20 B), 3 (60 B), 1 (100 B: full), then 0 alone; the double has its own.
  EXPECT_EQ(ddp.bucket_layout(), (std::vector<std::vector<size_t>>{{5, 3, 1}, {2}, {0}}));
  ddp.sync_gradients();  // one process: nothing to do
  EXPECT_FALSE(params[0].grad().defined());
}

// ---- two ranks ----

// The loss of micro-batch k (1-based) on rank r: sum(base * (r + 1) * k), per parameter. The
// unused parameter only appears on rank 1, so its bucket is complete at different times on the
// two ranks.
void micro_batch(const std::vector<at::Tensor>& params, int rank, int k) {
  at::Tensor loss = at::zeros({}, params[0].options().dtype(at::kDouble).requires_grad(false));
  for (size_t i = 0; i + 1 < params.size(); ++i) {
    at::Tensor base =
        at::arange(params[i].numel(), params[i].options().requires_grad(false)).view(params[i].sizes());
    loss = loss + (params[i] * base * double((rank + 1) * k)).sum().to(at::kDouble);
  }
  if (rank == 1) loss = loss + params.back().sum().to(at::kDouble) * 4.0;
  loss.backward();
}

void check_ddp(Dist& dist, GradReduction reduction, bool overlap) {
  const int rank = dist.rank();
  const auto on = [&](at::ScalarType dtype) {
    return at::TensorOptions().dtype(dtype).device(dist.device());
  };
  std::vector<at::Tensor> params;
  for (int64_t n : {12, 4, 7, 6, 2}) {
    at::ScalarType dtype = n == 7 ? at::kDouble : at::kFloat;
    params.push_back((at::arange(n, on(dtype)) + 100 * rank).requires_grad_());
  }
  params[0] = params[0].detach().view({3, 4}).requires_grad_();
  DataParallelOptions opts;
  opts.bucket_bytes = 24;  // several buckets
  opts.reduction = reduction;
  DataParallel ddp(dist, params, opts);
  ASSERT_EQ(ddp.bucket_layout().size(), 3u);

  ddp.broadcast_parameters();
  for (const auto& p : params) {
    EXPECT_TRUE(p.equal(at::arange(p.numel(), on(p.scalar_type())).view(p.sizes()))) << "rank " << rank;
  }

  for (int step = 0; step < 2; ++step) {
    micro_batch(params, rank, 1);
    if (overlap) ddp.begin_final_backward();
    micro_batch(params, rank, 2);
    ddp.sync_gradients();
    // Rank r's gradient is base * (r + 1) * (1 + 2): 3 * base on rank 0, 6 * base on rank 1.
    const double scale = reduction == GradReduction::kSum ? 9.0 : 4.5;
    for (size_t i = 0; i + 1 < params.size(); ++i) {
      at::Tensor want =
          at::arange(params[i].numel(), on(params[i].scalar_type())).view(params[i].sizes()) * scale;
      EXPECT_TRUE(params[i].grad().equal(want))
          << "param " << i << " rank " << rank << ": " << params[i].grad();
    }
    const double unused = reduction == GradReduction::kSum ? 8.0 : 4.0;
    EXPECT_TRUE(params.back().grad().equal(at::full({2}, unused, on(at::kFloat)))) << params.back().grad();
    for (auto& p : params) p.mutable_grad() = at::Tensor();
  }
}

// One rank of a two-rank group, on the device named by ALIGNER_DIST_TEST_DEVICE ("cuda" means
// cuda:LOCAL_RANK).
TEST(DistWorker, TwoRanks) {
  const char* done = std::getenv("ALIGNER_DIST_TEST_DONE");
  if (!done) GTEST_SKIP() << "runs as a rank started by DistGloo.TwoRanks or DistNccl.TwoRanks";
  const at::Device device(std::getenv("ALIGNER_DIST_TEST_DEVICE"));
  Dist dist = Dist::init(read_dist_env(), device, std::chrono::seconds(60));
  const int rank = dist.rank();
  ASSERT_EQ(dist.world_size(), 2);
  EXPECT_EQ(dist.is_main(), rank == 0);
  const auto on = [&](at::ScalarType dtype) {
    return at::TensorOptions().dtype(dtype).device(dist.device());
  };

  // Mixed dtypes and a non-contiguous view, summed in place.
  at::Tensor base = at::full({2, 3}, double(rank + 1), on(at::kDouble));
  std::vector<at::Tensor> t{at::full({2, 3}, float(rank + 1), on(at::kFloat)),
                            at::arange(4, on(at::kDouble)) * (rank + 1), at::full({1}, rank, on(at::kLong)),
                            base.t()};
  dist.all_reduce_sum(t);
  EXPECT_TRUE(t[0].equal(at::full({2, 3}, 3.0f, on(at::kFloat))));
  EXPECT_TRUE(t[1].equal(at::arange(4, on(at::kDouble)) * 3));
  EXPECT_EQ(t[2].item<int64_t>(), 1);
  EXPECT_TRUE(base.equal(at::full({2, 3}, 3.0, on(at::kDouble))));  // written through the transposed view

  std::vector<at::Tensor> m{at::full({3}, 1.0f + 2 * rank, on(at::kFloat))};
  dist.all_reduce_mean(m);
  EXPECT_TRUE(m[0].equal(at::full({3}, 2.0f, on(at::kFloat))));

  std::vector<at::Tensor> b{at::full({2}, float(rank), on(at::kFloat)),
                            at::full({1}, double(10 + rank), on(at::kDouble))};
  dist.broadcast(b, 1);
  EXPECT_TRUE(b[0].equal(at::full({2}, 1.0f, on(at::kFloat))));
  EXPECT_EQ(b[1].item<double>(), 11.0);

  EXPECT_EQ(dist.mean(std::vector<double>{double(rank), 10.0 * rank}), (std::vector<double>{0.5, 5.0}));
  auto metrics = dist.mean(std::map<std::string, double>{{"loss", rank + 1.0}, {"acc", 2.0 * rank}});
  EXPECT_EQ(metrics, (std::map<std::string, double>{{"loss", 1.5}, {"acc", 1.0}}));
  expect_error(
      [&] {
        dist.mean(std::map<std::string, double>{{rank == 0 ? "loss" : "lr", 1.0}});
      },
      "different metric names");
  expect_error([&] { dist.mean(std::vector<double>(rank + 1, 1.0)); }, "different numbers of values");
  std::vector<at::Tensor> meta{at::empty({2}, at::TensorOptions().device(at::kMeta))};
  expect_error([&] { dist.all_reduce_sum(meta); }, "but the process group runs on " + dist.device().str());

  check_ddp(dist, GradReduction::kMean, /*overlap=*/false);
  check_ddp(dist, GradReduction::kMean, /*overlap=*/true);
  check_ddp(dist, GradReduction::kSum, /*overlap=*/true);

  dist.barrier();
  if (!HasFailure()) std::ofstream(std::string(done) + "/rank" + std::to_string(rank)) << "ok\n";
}

// Starts DistWorker.TwoRanks twice as ranks 0 and 1 on `device` and checks that both passed.
void run_two_ranks(const std::string& device) {
  ScratchDir dir;
  ASSERT_FALSE(dir.path().empty());
  aligner::test::run_test_ranks(
      "DistWorker.TwoRanks", 2, dir.path(),
      {"ALIGNER_DIST_TEST_DONE=" + dir.path(), "ALIGNER_DIST_TEST_DEVICE=" + device});
}

TEST(DistGloo, TwoRanks) {
  if (!ALIGNER_HAS_GLOO) GTEST_SKIP() << "this libtorch build has no Gloo headers";
  run_two_ranks("cpu");
}

TEST(DistNccl, TwoRanks) {
  if (!ALIGNER_HAS_NCCL) GTEST_SKIP() << "not a CUDA build of libtorch 2.x";
  if (torch::cuda::device_count() < 2) GTEST_SKIP() << "needs two GPUs";
  run_two_ranks("cuda");
}

// ---- aligner launch ----

std::string run_capturing(const std::string& command, int* exit_code) {
  std::string out;
  FILE* p = popen((command + " 2>&1").c_str(), "r");
  char buf[512];
  while (size_t n = fread(buf, 1, sizeof(buf), p)) out.append(buf, n);
  const int status = pclose(p);
  *exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return out;
}

TEST(Launch, StartsRanksWithTorchrunVariables) {
  ScratchDir dir;
  ASSERT_FALSE(dir.path().empty());
  int code = 0;
  std::string out =
      run_capturing(std::string(ALIGNER_BINARY) + " launch --nproc-per-node 3 --master-port 4321 -- sh -c " +
                        "'echo $RANK $LOCAL_RANK $WORLD_SIZE $LOCAL_WORLD_SIZE $MASTER_ADDR $MASTER_PORT > " +
                        dir.path() + "/rank$RANK'",
                    &code);
  EXPECT_EQ(code, 0) << out;
  for (int r = 0; r < 3; ++r) {
    std::ifstream in(dir.file("rank" + std::to_string(r)));
    std::string line;
    std::getline(in, line);
    EXPECT_EQ(line, fmt::format("{} {} 3 3 127.0.0.1 4321", r, r));
  }
}

TEST(Launch, OneFailedRankStopsTheOthers) {
  const auto start = std::chrono::steady_clock::now();
  int code = 0;
  std::string out = run_capturing(std::string(ALIGNER_BINARY) +
                                      " launch --nproc-per-node 2 -- sh -c "
                                      "'if [ $RANK = 1 ]; then exit 3; fi; exec sleep 60'",
                                  &code);
  EXPECT_NE(code, 0);
  EXPECT_NE(out.find("rank 1 exited with code 3"), std::string::npos) << out;
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(30)) << "rank 0 was not stopped";

  out = run_capturing(std::string(ALIGNER_BINARY) + " launch --nproc-per-node 2 -- /nonexistent/program",
                      &code);
  EXPECT_NE(code, 0);
  EXPECT_NE(out.find("could not start rank 0"), std::string::npos) << out;
}

}  // namespace
}  // namespace aligner::dist
