#include "dist/process_group.h"

// torch_compat.h first: it decides which c10d backends this build has.
#include "core/torch_compat.h"

#include <ATen/core/grad_mode.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#if ALIGNER_HAS_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#if ALIGNER_HAS_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <atomic>
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <thread>

#include "core/error.h"

namespace aligner::dist {
namespace {

// An empty variable counts as unset, as in a shell's `VAR= cmd`.
const char* getenv_set(const char* name) {
  const char* v = std::getenv(name);
  return v && *v ? v : nullptr;
}

int parse_int(const char* name, const char* value, int min) {
  int out = 0;
  const char* end = value + std::char_traits<char>::length(value);
  auto [ptr, ec] = std::from_chars(value, end, out);
  if (ec != std::errc() || ptr != end) fail("{}='{}' is not an integer", name, value);
  if (out < min) fail("{}={} must be at least {}", name, out, min);
  return out;
}

int required_int(const char* name, int min, const char* context) {
  const char* v = getenv_set(name);
  if (!v) fail("{} is not set ({})", name, context);
  return parse_int(name, v, min);
}

std::string message_of(const std::exception& e) {
  if (auto* c10 = dynamic_cast<const c10::Error*>(&e)) return c10->what_without_backtrace();
  return e.what();
}

#if ALIGNER_HAS_GLOO
// GLOO_SOCKET_IFNAME picks the network interface, as in torch.distributed. Otherwise a group whose
// master is this machine stays on the loopback device, which needs no resolvable hostname; any
// other binds to the address this machine's hostname resolves to.
std::shared_ptr<::gloo::transport::Device> gloo_device(const std::string& master_addr) {
  if (const char* ifname = getenv_set("GLOO_SOCKET_IFNAME")) {
    std::string first(ifname);
    return c10d::ProcessGroupGloo::createDeviceForInterface(first.substr(0, first.find(',')));
  }
  if (master_addr == "localhost" || master_addr.rfind("127.", 0) == 0) {
    return c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1");
  }
  return c10d::ProcessGroupGloo::createDefaultDevice();
}
#endif

}  // namespace

std::string first_slurm_host(const std::string& nodelist, const std::string& variable) {
  auto bad = [&] { fail("{}='{}' is not a Slurm node list", variable, nodelist); };
  std::string host;
  size_t i = 0;
  while (i < nodelist.size() && nodelist[i] != ',') {
    if (nodelist[i] == ']') bad();
    if (nodelist[i] != '[') {
      host += nodelist[i++];
      continue;
    }
    // A range list such as [07-09,12]: its first number, zero padding kept.
    const size_t close = nodelist.find(']', i);
    if (close == std::string::npos) bad();
    const std::string ranges = nodelist.substr(i + 1, close - i - 1);
    const std::string first = ranges.substr(0, ranges.find_first_of(",-"));
    if (first.empty()) bad();
    host += first;
    i = close + 1;
  }
  if (host.empty()) bad();
  return host;
}

DistEnv read_dist_env() {
  DistEnv env;
  const bool torchrun = getenv_set("RANK") || getenv_set("WORLD_SIZE");
  const bool slurm = !torchrun && getenv_set("SLURM_PROCID");
  if (!torchrun && !slurm) return env;

  if (torchrun) {
    const char* context = "torchrun sets RANK, WORLD_SIZE and LOCAL_RANK together";
    env.world_size = required_int("WORLD_SIZE", 1, context);
    env.rank = required_int("RANK", 0, context);
    env.local_rank = required_int("LOCAL_RANK", 0, context);
    if (env.rank >= env.world_size) fail("RANK={} must be below WORLD_SIZE={}", env.rank, env.world_size);
  } else {
    const char* context = "srun sets SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID together";
    env.world_size = required_int("SLURM_NTASKS", 1, context);
    env.rank = required_int("SLURM_PROCID", 0, context);
    env.local_rank = required_int("SLURM_LOCALID", 0, context);
    if (env.rank >= env.world_size) {
      fail("SLURM_PROCID={} must be below SLURM_NTASKS={}", env.rank, env.world_size);
    }
  }

  if (const char* addr = getenv_set("MASTER_ADDR")) {
    env.master_addr = addr;
  } else if (env.world_size > 1) {
    const char* list_var = nullptr;
    if (slurm) {
      for (const char* name : {"SLURM_JOB_NODELIST", "SLURM_NODELIST"}) {
        if (getenv_set(name)) {
          list_var = name;
          break;
        }
      }
    }
    if (!list_var) {
      fail("MASTER_ADDR is not set: with {} processes they need the address of rank 0{}", env.world_size,
           slurm ? " (nor is SLURM_JOB_NODELIST or SLURM_NODELIST, to take it from)" : "");
    }
    env.master_addr = first_slurm_host(getenv_set(list_var), list_var);
  }
  if (const char* port = getenv_set("MASTER_PORT")) {
    env.master_port = parse_int("MASTER_PORT", port, 1);
    if (env.master_port > 65535) fail("MASTER_PORT={} is not a TCP port (1-65535)", env.master_port);
  }
  return env;
}

void Work::wait() {
  if (!work_) return;
  try {
    work_->wait();
  } catch (const std::exception& e) {
    fail("a collective operation failed (did another rank exit?): {}", message_of(e));
  }
}

struct Dist::Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<compat::CommBackend> backend;
  std::chrono::milliseconds timeout{0};

  ~Group() {
    if (backend) compat::shutdown_comm(*backend);
  }
};

namespace {

c10::intrusive_ptr<compat::CommBackend> make_backend(const c10::intrusive_ptr<c10d::Store>& store, int rank,
                                                     int size, const at::Device& device,
                                                     const std::string& master_addr,
                                                     std::chrono::milliseconds timeout) {
  try {
    if (device.is_cpu()) {
#if ALIGNER_HAS_GLOO
      auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
      opts->devices.push_back(gloo_device(master_addr));
      return c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, size, opts);
#endif
    } else {
#if ALIGNER_HAS_NCCL
      // As torch.cuda.set_device in a torchrun script: what allocates on the current device
      // (NCCL's own buffers, raw allocations) uses this rank's GPU, not GPU 0.
      c10::impl::getDeviceGuardImpl(at::kCUDA)->setDevice(device);
      auto opts = c10d::ProcessGroupNCCL::Options::create();
      opts->timeout = timeout;
      return c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, size, opts);
#endif
    }
  } catch (const std::exception& e) {
    fail("rank {}: could not set up the process group: {}", rank, message_of(e));
  }
  fail("no process group backend for {}", device.str());
}

}  // namespace

Dist::Dist() = default;
Dist::Dist(Dist&&) noexcept = default;
Dist& Dist::operator=(Dist&&) noexcept = default;
Dist::~Dist() = default;

Dist Dist::init(const DistEnv& env, const at::Device& device, std::chrono::milliseconds timeout) {
  if (env.world_size < 1 || env.rank < 0 || env.rank >= env.world_size) {
    fail("rank {} of a world of {} processes is not a valid position", env.rank, env.world_size);
  }
  Dist d;
  d.env_ = env;
  d.world_rank_ = env.rank;
  d.device_ = device;
  // cuda means this process's GPU, cuda:local_rank, so that tensors compare equal to it.
  if (device.is_cuda() && !device.has_index()) d.device_ = at::Device(at::kCUDA, env.local_rank);
  if (env.world_size == 1) return d;

  if (!device.is_cpu() && !device.is_cuda()) {
    fail("distributed training runs on CPU or CUDA, not {}", device.str());
  }
#if !ALIGNER_HAS_NCCL
  if (device.is_cuda()) fail("distributed training on CUDA needs a CUDA build of libtorch 2.x (for NCCL)");
#endif
#if !ALIGNER_HAS_GLOO
  if (device.is_cpu()) {
    fail("distributed training on CPU needs Gloo: build against libtorch with Gloo's headers");
  }
#endif

  d.group_ = std::make_shared<Group>();
  d.group_->timeout = timeout;
  try {
    c10d::TCPStoreOptions store_opts;
    store_opts.port = static_cast<std::uint16_t>(env.master_port);
    store_opts.isServer = env.rank == 0;
    store_opts.numWorkers = static_cast<std::size_t>(env.world_size);
    store_opts.waitWorkers = true;
    store_opts.timeout = timeout;
    d.group_->store = c10::make_intrusive<c10d::TCPStore>(env.master_addr, store_opts);
  } catch (const std::exception& e) {
    fail("rank {}: could not join the rendezvous at {}:{}: {}", env.rank, env.master_addr, env.master_port,
         message_of(e));
  }
  d.group_->backend =
      make_backend(d.group_->store, env.rank, env.world_size, d.device_, env.master_addr, timeout);
  return d;
}

Dist Dist::subgroup(const std::vector<int>& ranks, const std::string& name) const {
  const auto at = std::find(ranks.begin(), ranks.end(), world_rank_);
  if (at == ranks.end()) fail("subgroup {}: rank {} is not one of its ranks", name, world_rank_);
  Dist d;
  d.env_ = env_;
  d.env_.rank = int(at - ranks.begin());
  d.env_.world_size = int(ranks.size());
  d.world_rank_ = world_rank_;
  d.device_ = device_;
  if (ranks.size() == 1 || !group_) return d;
  d.group_ = std::make_shared<Group>();
  d.group_->timeout = group_->timeout;
  d.group_->store = c10::make_intrusive<c10d::PrefixStore>("aligner/" + name, group_->store);
  d.group_->backend = make_backend(d.group_->store, d.env_.rank, d.env_.world_size, device_, env_.master_addr,
                                   group_->timeout);
  d.parent_ = group_;
  return d;
}

void Dist::check_device(const at::Tensor& t, const char* op) const {
  if (!t.defined()) fail("{}: undefined tensor", op);
  if (t.device() != device_) {
    fail("{}: a tensor on {}, but the process group runs on {}", op, t.device().str(), device_.str());
  }
}

// ALIGNER_DIST_TRACE=1: every collective a rank issues, numbered, on stderr. A hang in NCCL says
// nothing; the first line where the ranks' traces differ names the collective one rank skipped.
void Dist::trace(const char* op, const at::Tensor& t) const {
  static const bool on = [] {
    const char* v = std::getenv("ALIGNER_DIST_TRACE");
    return v && *v && std::string(v) != "0";
  }();
  if (!on) return;
  static std::atomic<int64_t> count{0};
  std::fprintf(stderr, "[dist trace] rank %d (%d of %d) #%lld %s %lld x %s (thread %zu)\n", world_rank_,
               rank(), world_size(), static_cast<long long>(count++), op, static_cast<long long>(t.numel()),
               c10::toString(t.scalar_type()),
               std::hash<std::thread::id>{}(std::this_thread::get_id()) % 1000);
}

Work Dist::all_reduce_async(at::Tensor& flat, bool max) {
  if (!group_) return Work();
  const char* op = max ? "all_reduce_max" : "all_reduce_sum";
  check_device(flat, op);
  if (!flat.is_contiguous()) fail("{}: the buffer must be contiguous", op);
  std::vector<at::Tensor> tensors{flat};
  c10d::AllreduceOptions opts;
  opts.reduceOp = max ? c10d::ReduceOp::MAX : c10d::ReduceOp::SUM;
  trace(op, flat);
  return Work(group_->backend->allreduce(tensors, opts));
}

Work Dist::all_reduce_sum_async(at::Tensor& flat) {
  return all_reduce_async(flat, false);
}

Work Dist::all_reduce_max_async(at::Tensor& flat) {
  return all_reduce_async(flat, true);
}

Work Dist::broadcast_async(at::Tensor& flat, int root) {
  if (!group_) return Work();
  check_device(flat, "broadcast");
  if (!flat.is_contiguous()) fail("broadcast: the buffer must be contiguous");
  if (root < 0 || root >= world_size()) fail("broadcast: root {} is not a rank of {}", root, world_size());
  std::vector<at::Tensor> tensors{flat};
  c10d::BroadcastOptions opts;
  opts.rootRank = root;
  trace("broadcast", flat);
  return Work(group_->backend->broadcast(tensors, opts));
}

Work Dist::reduce_scatter_sum_async(at::Tensor& flat, at::Tensor& chunk) {
  check_device(flat, "reduce_scatter_sum");
  check_device(chunk, "reduce_scatter_sum");
  const int64_t n = chunk.numel();
  if (!flat.is_contiguous() || !chunk.is_contiguous() || flat.numel() != n * world_size())
    fail("reduce_scatter_sum: need a contiguous buffer of {} chunks of {} elements", world_size(), n);
  if (!group_) {
    chunk.copy_(flat);
    return Work();
  }
#if ALIGNER_HAS_NCCL
  if (device_.is_cuda()) {
    c10d::ReduceScatterOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    trace("reduce_scatter_sum", flat);
    return Work(group_->backend->_reduce_scatter_base(chunk, flat, opts));
  }
#endif
  all_reduce_sum_async(flat).wait();
  chunk.copy_(flat.narrow(0, rank() * n, n));
  return Work();
}

Work Dist::all_gather_async(at::Tensor& flat) {
  check_device(flat, "all_gather");
  if (!flat.is_contiguous() || flat.numel() % world_size() != 0)
    fail("all_gather: need a contiguous buffer of {} equal chunks", world_size());
  if (!group_) return Work();
  const int64_t n = flat.numel() / world_size();
#if ALIGNER_HAS_NCCL
  if (device_.is_cuda()) {
    auto mine = flat.narrow(0, rank() * n, n);
    trace("all_gather", flat);
    return Work(group_->backend->_allgather_base(flat, mine));
  }
#endif
  if (rank() > 0) flat.narrow(0, 0, rank() * n).zero_();
  flat.narrow(0, (rank() + 1) * n, flat.numel() - (rank() + 1) * n).zero_();
  return all_reduce_sum_async(flat);
}

// c10d reads a list of tensors as copies of one tensor on several devices, so distinct tensors
// travel packed: one flat buffer per dtype, in order of first appearance (the same on every rank).
void Dist::for_each_packed(std::vector<at::Tensor>& tensors, const char* op,
                           const std::function<Work(at::Tensor&)>& collective) {
  if (!group_) return;
  at::NoGradGuard no_grad;
  std::vector<at::ScalarType> dtypes;
  for (const auto& t : tensors) {
    check_device(t, op);
    if (std::find(dtypes.begin(), dtypes.end(), t.scalar_type()) == dtypes.end()) {
      dtypes.push_back(t.scalar_type());
    }
  }
  for (auto dtype : dtypes) {
    std::vector<at::Tensor> members;
    for (const auto& t : tensors) {
      if (t.scalar_type() == dtype) members.push_back(t);
    }
    if (members.size() == 1 && members[0].is_contiguous()) {
      collective(members[0]).wait();
      continue;
    }
    std::vector<at::Tensor> flat_views;
    for (const auto& t : members) flat_views.push_back(t.reshape({-1}));
    at::Tensor flat = at::cat(flat_views);
    collective(flat).wait();
    int64_t offset = 0;
    for (auto& t : members) {
      t.copy_(flat.narrow(0, offset, t.numel()).view(t.sizes()));
      offset += t.numel();
    }
  }
}

void Dist::all_reduce_sum(std::vector<at::Tensor>& tensors) {
  for_each_packed(tensors, "all_reduce_sum", [this](at::Tensor& flat) { return all_reduce_sum_async(flat); });
}

void Dist::all_reduce_mean(std::vector<at::Tensor>& tensors) {
  if (!group_) return;
  all_reduce_sum(tensors);
  at::NoGradGuard no_grad;
  for (auto& t : tensors) t.div_(world_size());
}

void Dist::broadcast(std::vector<at::Tensor>& tensors, int root) {
  for_each_packed(tensors, "broadcast",
                  [this, root](at::Tensor& flat) { return broadcast_async(flat, root); });
}

void Dist::barrier() {
  if (!group_) return;
  // An all-reduce rather than c10d's barrier, whose NCCL version must guess the device; reading
  // the result back makes the host wait for it on CUDA too.
  at::Tensor token = at::zeros({1}, at::TensorOptions().dtype(at::kFloat).device(device_));
  all_reduce_sum_async(token).wait();
  (void)token.item<float>();
}

std::vector<double> Dist::mean(const std::vector<double>& values) {
  if (!group_) return values;
  check_same_on_all_ranks(values.size(), "numbers of values");
  at::Tensor t = at::tensor(values, at::kDouble).to(device_);
  all_reduce_sum_async(t).wait();
  t = t.cpu();
  std::vector<double> out(values.size());
  for (size_t i = 0; i < values.size(); ++i) out[i] = t[i].item<double>() / world_size();
  return out;
}

std::vector<double> Dist::sum(const std::vector<double>& values) {
  if (!group_) return values;
  at::Tensor t = at::tensor(values, at::kDouble).to(device_);
  all_reduce_sum_async(t).wait();
  t = t.cpu().contiguous();
  return std::vector<double>(t.data_ptr<double>(), t.data_ptr<double>() + t.numel());
}

std::map<std::string, double> Dist::mean(const std::map<std::string, double>& values) {
  if (!group_) return values;
  // FNV-1a over the names, so that ranks reporting different metrics fail instead of mixing them.
  uint64_t hash = 1469598103934665603ull;
  std::vector<double> flat;
  for (const auto& [name, v] : values) {
    for (unsigned char c : name + '\n') hash = (hash ^ c) * 1099511628211ull;
    flat.push_back(v);
  }
  check_same_on_all_ranks(hash, "metric names");
  flat = mean(flat);
  std::map<std::string, double> out;
  size_t i = 0;
  for (const auto& [name, v] : values) out[name] = flat[i++];
  return out;
}

// A collective over mismatched buffers hangs or fails without saying why; a MAX over (v, -v)
// equals (v, -v) only where every rank has the same v.
void Dist::check_same_on_all_ranks(uint64_t value, const char* what) {
  const double v = static_cast<double>(value & ((1ull << 52) - 1));
  at::Tensor t = at::tensor(std::vector<double>{v, -v}, at::kDouble).to(device_);
  all_reduce_max_async(t).wait();
  t = t.cpu();
  if (t[0].item<double>() != v || t[1].item<double>() != -v) {
    fail("mean: the ranks passed different {}", what);
  }
}

}  // namespace aligner::dist
