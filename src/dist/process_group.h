// Data-parallel processes through torch's c10d: where this process sits among its peers (read
// from torchrun's or Slurm's variables) and the collectives that training needs, on a Gloo group
// for CPU tensors or an NCCL group for CUDA ones. A world of one process needs no group at all,
// and every collective is then a no-op, so single-process code runs the same calls.
#pragma once
#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace aligner::dist {

// torchrun's default, and the port `aligner launch` uses unless told otherwise.
inline constexpr int kDefaultMasterPort = 29500;

struct DistEnv {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;  // the rank among the processes of this node: picks the GPU
  std::string master_addr = "127.0.0.1";
  int master_port = kDefaultMasterPort;
};

// Reads torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or, when RANK
// and WORLD_SIZE are both unset, Slurm's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the master
// is MASTER_ADDR or else the first host of SLURM_JOB_NODELIST or SLURM_NODELIST). Neither: one
// process. MASTER_PORT defaults to kDefaultMasterPort. A missing or invalid value is an
// aligner::Error that names the variable.
DistEnv read_dist_env();

// The first host of a Slurm node list: "a,b" gives "a", "gpu[07-09,12]" gives "gpu07",
// "r[1-2]-n[3-4]" gives "r1-n3". `variable` names the source in errors.
std::string first_slurm_host(const std::string& nodelist, const std::string& variable);

// An operation in flight; wait() returns once its result can be used on this process's device
// (for NCCL: by work queued after it on the current CUDA stream) and rethrows a peer's failure.
class Work {
 public:
  Work() = default;  // already complete: what every collective returns in a world of one
  explicit Work(c10::intrusive_ptr<c10d::Work> work) : work_(std::move(work)) {}
  void wait();

 private:
  c10::intrusive_ptr<c10d::Work> work_;
};

class Dist {
 public:
  Dist();  // a world of one process, on the CPU
  // Joins the group that `env` describes: rank 0 serves a c10d TCPStore on master_addr:port that
  // the others connect to, then every rank builds a Gloo group (CPU `device`) or an NCCL one
  // (CUDA `device`, usually cuda:local_rank; only in CUDA builds of torch 2.x). Blocks until all
  // ranks have joined or `timeout` passes; the same timeout bounds each collective.
  static Dist init(const DistEnv& env, const at::Device& device,
                   std::chrono::milliseconds timeout = std::chrono::minutes(30));
  // A group of some of this world's ranks, `ranks` (world ranks in the order that numbers them in the
  // group), on the same rendezvous and device. Every rank in `ranks` calls it with the same list and
  // `name` (unique per group), and only they do. is_main() stays the world's.
  Dist subgroup(const std::vector<int>& ranks, const std::string& name) const;
  Dist(Dist&&) noexcept;
  Dist& operator=(Dist&&) noexcept;
  ~Dist();

  int rank() const { return env_.rank; }
  int world_size() const { return env_.world_size; }
  int local_rank() const { return env_.local_rank; }
  // Rank 0 of the whole world (not of a subgroup): the process that writes the run's files.
  bool is_main() const { return world_rank_ == 0; }
  int world_rank() const { return world_rank_; }
  const at::Device& device() const { return device_; }

  // In place, over all ranks. The tensors may differ in shape and dtype but must live on device():
  // they are packed into one buffer per dtype, so a call costs one collective per dtype.
  void all_reduce_sum(std::vector<at::Tensor>& tensors);
  void all_reduce_mean(std::vector<at::Tensor>& tensors);
  // Overwrites the tensors with rank `root`'s values.
  void broadcast(std::vector<at::Tensor>& tensors, int root = 0);
  void barrier();
  // Means over all ranks of per-rank numbers (losses, accuracies). Every rank must pass the same
  // keys (the same number of values): otherwise an aligner::Error on every rank, not a hang.
  std::vector<double> mean(const std::vector<double>& values);
  // Sums over all ranks in one collective, for the hot path: unlike mean() it does not check that
  // the ranks pass as many values, so every rank must.
  std::vector<double> sum(const std::vector<double>& values);
  std::map<std::string, double> mean(const std::map<std::string, double>& values);

  // The building blocks for bucketed gradient reduction: one contiguous tensor on device(),
  // summed or overwritten in place once the returned Work is waited on.
  Work all_reduce_sum_async(at::Tensor& flat);
  Work broadcast_async(at::Tensor& flat, int root);
  // For sharded data parallel, over a contiguous `flat` of world_size() equal chunks: `chunk` (a
  // tensor of one chunk's size, not a view of flat) receives the sum over ranks of every rank's
  // chunk rank(); and all_gather fills every chunk of flat with its owner's values, from this rank's
  // own chunk in place. NCCL runs them as such; Gloo (which lacks them in torch 1.13) as an
  // all-reduce, with the same results (the gather adds zeros), at twice the traffic.
  Work reduce_scatter_sum_async(at::Tensor& flat, at::Tensor& chunk);
  Work all_gather_async(at::Tensor& flat);
  // Elementwise maximum over ranks, in place.
  Work all_reduce_max_async(at::Tensor& flat);

 private:
  struct Group;
  void check_device(const at::Tensor& t, const char* op) const;
  void trace(const char* op, const at::Tensor& t) const;
  Work all_reduce_async(at::Tensor& flat, bool max);
  void check_same_on_all_ranks(uint64_t value, const char* what);
  void for_each_packed(std::vector<at::Tensor>& tensors, const char* op,
                       const std::function<Work(at::Tensor&)>& collective);

  DistEnv env_;
  int world_rank_ = 0;
  at::Device device_{at::kCPU};
  std::shared_ptr<Group> group_;   // null in a world of one; shared with subgroups (their rendezvous)
  std::shared_ptr<Group> parent_;  // a subgroup's world, whose store its own prefixes
};

}  // namespace aligner::dist
