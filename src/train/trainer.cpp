#include "train/trainer.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>

#include "core/device_memory.h"
#include "core/error.h"
#include "core/log.h"
#include "core/metrics.h"
#include "core/progress.h"
#include "core/tensorboard.h"
#include "core/torch_compat.h"
#include "dist/ddp.h"
#include "dist/sharded_model.h"
#include "io/hf_checkpoint.h"
#include "io/peft_adapter.h"
#include "train/checkpoint.h"
#include "train/optimizer.h"
#include "train/schedule.h"
#include "train/step_profiler.h"

namespace aligner {
namespace fs = std::filesystem;
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// Every rank's string, on every rank, in rank order: a gather made of two sums (the lengths, then
// the bytes, each rank filling its own slot), for the few hundred bytes of a data position.
std::vector<std::string> gather_strings(dist::Dist& dist, const std::string& mine) {
  const int world = dist.world_size(), rank = dist.rank();
  if (world == 1) return {mine};
  std::vector<double> lengths(world, 0.0);
  lengths[rank] = double(mine.size());
  lengths = dist.sum(lengths);
  const size_t longest = size_t(*std::max_element(lengths.begin(), lengths.end()));
  std::vector<double> bytes(world * longest, 0.0);
  for (size_t i = 0; i < mine.size(); ++i) bytes[rank * longest + i] = double(uint8_t(mine[i]));
  bytes = dist.sum(bytes);
  std::vector<std::string> out(world);
  for (int r = 0; r < world; ++r)
    for (size_t i = 0; i < size_t(lengths[r]); ++i) out[r].push_back(char(uint8_t(bytes[r * longest + i])));
  return out;
}

// FNV-1a of the names: ranks that report other metrics are caught instead of summed position by
// position. 32 bits, so that its sum over ranks stays exact in a double.
double names_hash(const std::vector<std::string>& names) {
  uint32_t h = 2166136261u;
  for (const auto& n : names)
    for (char c : n + '\n') h = (h ^ uint8_t(c)) * 16777619u;
  return double(h);
}

// Means over the global batch of the given micro-batch results: "loss" per unit (when any part has
// a loss), then each metric
// `names` (every part carries them, in that order) as its sum over its count; a metric counted
// nowhere is left out. A rank without parts still sends zeros for each name, so that all ranks
// reduce vectors of one length.
std::vector<std::pair<std::string, double>> reduce_metrics(dist::Dist& dist,
                                                           const std::vector<std::string>& names,
                                                           const std::vector<LossSums>& parts,
                                                           double* tokens_out) {
  // names hash, units, loss, tokens, parts with a loss, then (sum, count) per metric
  constexpr size_t kFirst = 5;
  std::vector<double> sums(kFirst + 2 * names.size(), 0.0);
  sums[0] = names_hash(names);
  for (const auto& p : parts) {
    sums[1] += p.units;
    sums[2] += p.loss.defined() ? p.loss.item<double>() : 0.0;
    sums[3] += double(p.tokens);
    sums[4] += p.loss.defined();
    bool same = p.metrics.size() == names.size();
    for (size_t k = 0; same && k < names.size(); ++k) same = p.metrics[k].name == names[k];
    if (!same) fail("a micro-batch reports metrics other than the [{}] declared", fmt::join(names, ", "));
    for (size_t k = 0; k < names.size(); ++k) {
      sums[kFirst + 2 * k] += p.metrics[k].sum;
      sums[kFirst + 1 + 2 * k] += p.metrics[k].count;
    }
  }
  const double hash = sums[0];
  sums = dist.sum(sums);
  if (sums[0] != hash * dist.world_size())
    fail("the ranks report different metrics (this rank: [{}])", fmt::join(names, ", "));
  if (tokens_out) *tokens_out = sums[3];
  const double units = std::max(sums[1], 1e-12);
  // Validation that only measures (PPO's held-out reward) has no loss to report.
  std::vector<std::pair<std::string, double>> out;
  if (sums[4] > 0) out.emplace_back("loss", sums[2] / units);
  for (size_t k = 0; k < names.size(); ++k)
    if (sums[kFirst + 1 + 2 * k] > 0)
      out.emplace_back(names[k], sums[kFirst + 2 * k] / sums[kFirst + 1 + 2 * k]);
  return out;
}

// An advisory lock on OUTPUT_DIR/.aligner.lock for the run's life, the file holding the run's process
// id: a second run on the same folder is refused instead of interleaving its files with the first's.
// The system drops the lock with the process, however it ends, so it never goes stale.
class OutputDirLock {
 public:
  explicit OutputDirLock(const fs::path& dir) {
    const fs::path path = dir / kFile;
    fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd_ < 0) fail("cannot create {}: {}", path.string(), std::strerror(errno));
    if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
      char pid[32] = {};
      const ssize_t n = ::pread(fd_, pid, sizeof pid - 1, 0);
      ::close(fd_);
      fail("output_dir {} is in use by process {}", dir.string(), n > 0 ? std::string(pid, size_t(n)) : "?");
    }
    const std::string pid = std::to_string(::getpid());
    if (::ftruncate(fd_, 0) != 0 || ::pwrite(fd_, pid.data(), pid.size(), 0) != ssize_t(pid.size()))
      fail("cannot write {}: {}", path.string(), std::strerror(errno));
  }
  ~OutputDirLock() { ::close(fd_); }
  OutputDirLock(const OutputDirLock&) = delete;
  OutputDirLock& operator=(const OutputDirLock&) = delete;

  static constexpr const char* kFile = ".aligner.lock";

 private:
  int fd_ = -1;
};

// Creates and locks output_dir, and clears it for resume=false with overwrite=true.
std::unique_ptr<OutputDirLock> prepare_output_dir(const TrainerOptions& opt) {
  const fs::path dir(opt.output_dir);
  fs::create_directories(dir);
  auto lock = std::make_unique<OutputDirLock>(dir);
  std::vector<fs::path> entries;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().filename() != OutputDirLock::kFile) entries.push_back(e.path());
  if (opt.resume == "false" && !entries.empty()) {
    if (!opt.overwrite)
      fail(
          "output_dir {} is not empty; resume=false refuses to write over it (set overwrite=true to clear "
          "it, or resume=auto to continue)",
          opt.output_dir);
    for (const auto& e : entries) fs::remove_all(e);
  }
  return lock;
}

// SIGTERM and SIGINT ask the run to stop after the step under way; the handler puts the default
// back, so a second one kills at once.
volatile std::sig_atomic_t stop_signal = 0;

extern "C" void on_stop_signal(int sig) {
  stop_signal = sig;
}

class StopSignals {
 public:
  StopSignals() {
    stop_signal = 0;
    struct sigaction sa = {};
    sa.sa_handler = on_stop_signal;
    sa.sa_flags = SA_RESETHAND;
    sigemptyset(&sa.sa_mask);
    ::sigaction(SIGTERM, &sa, &previous_term_);
    ::sigaction(SIGINT, &sa, &previous_int_);
  }
  ~StopSignals() {
    ::sigaction(SIGTERM, &previous_term_, nullptr);
    ::sigaction(SIGINT, &previous_int_, nullptr);
  }

 private:
  struct sigaction previous_term_ = {}, previous_int_ = {};
};

// A module while training: its optimizer and schedule.
struct Running {
  TrainableModule module;
  bool whole_model = false;  // its params are all of its model's
  Schedule schedule;
  std::unique_ptr<AdamW> optimizer;
  // Sharded: the optimizer updates pieces of the parameters, these of the data-parallel shard
  // pieces (indices), each at this offset into its parameter (by name).
  std::vector<size_t> pieces;
  std::map<std::string, int64_t> offsets;
  std::vector<std::string> piece_names;               // the parameter of each piece, in the optimizer's order
  std::shared_ptr<dist::ShardedModel> sharded_model;  // trainer.sharding=full
};

// The module's model's weights and its adapters.
NamedParams model_parameters(const TrainableModule& m) {
  if (!m.model) return m.other.parameters();
  auto all = named_parameters(*m.model);
  for (auto& p : adapter_parameters(*m.model)) all.push_back(std::move(p));
  return all;
}

const TensorSplit* split_of(const TrainableModule& m) {
  return m.model ? m.model->tp.get() : nullptr;
}

// Checks the modules, freezes what they do not train, and says which train a whole model.
std::vector<Running> prepare_modules(std::vector<TrainableModule> modules, int64_t total_steps) {
  if (modules.empty()) fail("an algorithm must train at least one module");
  std::set<std::string> names;
  std::map<const void*, std::string> owner;  // parameter -> module
  for (const auto& m : modules) {
    if (!names.insert(m.name).second) fail("two trainable modules are named '{}'", m.name);
    if (!m.model && !(m.other.parameters && m.other.save)) fail("trainable module '{}' has no model", m.name);
    if (m.params.empty()) fail("trainable module '{}' has no parameters", m.name);
    if (!m.model && process_tensor_parallel())
      fail("trainer.tensor_parallel splits transformer models only, not module '{}'", m.name);
    std::map<std::string, const void*> known;
    for (const auto& [name, t] : model_parameters(m)) known.emplace(name, t.unsafeGetTensorImpl());
    for (const auto& [name, t] : m.params) {
      auto it = known.find(name);
      if (it == known.end() || it->second != t.unsafeGetTensorImpl())
        fail("trainable module '{}': '{}' is not a parameter of its model", m.name, name);
      auto [at, fresh] = owner.emplace(t.unsafeGetTensorImpl(), m.name);
      if (!fresh) fail("parameter '{}' is in trainable modules '{}' and '{}'", name, at->second, m.name);
    }
  }
  for (const auto& m : modules)
    for (auto& [name, t] : model_parameters(m)) t.requires_grad_(false);
  std::vector<Running> out;
  for (auto& m : modules) {
    for (auto& [name, t] : m.params) t.requires_grad_(true);
    Running r;
    r.whole_model = m.model && m.lora.rank == 0 && m.params.size() == named_parameters(*m.model).size();
    const auto& o = m.optim;
    r.schedule = Schedule{o.schedule, o.adam.lr, o.min_lr, o.warmup_steps, total_steps};
    if (o.schedule != ScheduleKind::kConstant && o.warmup_steps > total_steps)
      fail("config key '{}.warmup_steps' ({}) is more than the run's {} steps", o.prefix, o.warmup_steps,
           total_steps);
    check_schedule(r.schedule);
    r.module = std::move(m);
    out.push_back(std::move(r));
  }
  return out;
}

// What a rank holds beyond activations, logged before the optimizers take their state: the trained
// models' weights, the gradients (and data parallel's buffers of their size), and the optimizer
// state (moments, float32 masters of 16-bit weights), which sharding divides among the ranks. On
// CUDA a run whose gradients and optimizer state cannot fit beside the loaded weights stops here.
void check_memory(const std::vector<Running>& modules, const std::vector<at::Tensor>& leaves,
                  const std::vector<dist::ShardPiece>& pieces, const dist::Dist& dist,
                  dist::Sharding sharding) {
  constexpr double GB = 1e9;
  std::set<const void*> seen;  // models may share weights (a LoRA critic on the actor's base)
  double weights = 0, grads = 0, state = 0, largest = 0;
  for (const auto& r : modules)
    for (const auto& [name, t] : model_parameters(r.module))
      if (seen.insert(t.unsafeGetTensorImpl()).second) weights += double(t.nbytes());
  const auto state_bytes = [](const at::Tensor& t, int64_t numel) {
    const bool master = t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf;
    return double(numel) * (master ? 12 : 2 * double(t.element_size()));
  };
  if (sharding == dist::Sharding::kFull) {
    // A shard of each weight and of its summed gradient, and one unit gathered at a time with its
    // full gradients (two while the next one's gather overlaps).
    for (const auto& r : modules) {
      double whole = 0;
      for (const auto& [name, t] : model_parameters(r.module)) whole += double(t.nbytes());
      const double unit = double(r.sharded_model->largest_unit_bytes()),
                   shard = double(r.sharded_model->shard_bytes());
      weights += shard + 2 * unit - whole;
      largest = std::max(largest, unit);
      grads += shard + 2 * unit;
      for (const auto& p : r.sharded_model->pieces()) state += state_bytes(p.param, p.values.numel());
    }
  }
  for (const auto& t : leaves) {
    if (sharding == dist::Sharding::kFull) break;
    grads += double(t.nbytes()) * (dist.world_size() > 1 ? 2 : 1);
    if (sharding == dist::Sharding::kNone) state += state_bytes(t, t.numel());
  }
  for (const auto& p : pieces)
    if (sharding == dist::Sharding::kOptimizer || sharding == dist::Sharding::kGradients)
      state += state_bytes(leaves[p.param], p.numel);
  const char* how = sharding == dist::Sharding::kOptimizer   ? ", sharding=optimizer"
                    : sharding == dist::Sharding::kGradients ? ", sharding=gradients"
                    : sharding == dist::Sharding::kFull      ? ", sharding=full"
                                                             : "";
  log_info(
      "memory per rank before activations: weights {:.3g} GB, gradients {:.3g} GB, optimizer state {:.3g} GB "
      "({} data-parallel ranks{}{}{})",
      weights / GB, grads / GB, state / GB, dist.world_size(),
      process_tensor_parallel() ? fmt::format(" x {} tensor-parallel", process_tensor_parallel()->size())
                                : "",
      how, largest > 0 ? fmt::format(", largest gathered layer {:.3g} GB", largest / GB) : "");
  const at::Device device = leaves.front().device();
  const double available = device_memory_available(device);
  if (available >= 0 && grads + state > available)
    fail(
        "the run cannot fit on {}: its gradients ({:.2f} GB) and optimizer state ({:.2f} GB) need {:.2f} GB "
        "beside "
        "the weights, and {:.2f} GB are free; shard them over more ranks (trainer.sharding), train adapters "
        "(lora.rank), or use a smaller model",
        device.str(), grads / GB, state / GB, (grads + state) / GB, available / GB);
}

// The parameter an optimizer state key is of: "exp_avg.<name>" -> "<name>" ("step" stays).
std::string state_param(const std::string& key) {
  const size_t dot = key.find('.');
  return dot == std::string::npos ? key : key.substr(dot + 1);
}

// Tensor parallel: a module's optimizer state from a checkpoint of whole tensors, sliced for this rank.
NamedParams read_split_optimizer(const std::string& ckpt, const Running& r) {
  const TensorSplit& s = *split_of(r.module);
  NamedParams whole;
  for (const auto& [key, t] : r.optimizer->state()) {
    whole.emplace_back(key, at::empty(whole_sizes(t.sizes(), tensor_slice(s, state_param(key))),
                                      t.options().device(at::kCPU)));
  }
  return slice_named(s, read_module_optimizer(ckpt, r.module.name, whole, r.offsets), state_param);
}

// The global gradient norm of a tensor-parallel module's gradients (of the parameters `names`, or
// pieces of them): the split parameters' squares summed over the tensor group, the replicated ones'
// (the same on every rank of it) counted once, and then over the data-parallel ranks that hold the
// other pieces (`over_data`).
double split_grad_norm(const std::vector<at::Tensor>& grads, const std::vector<std::string>& names,
                       const TensorSplit& s, const std::function<double(double)>& over_data) {
  std::vector<at::Tensor> split, replicated;
  for (size_t i = 0; i < grads.size(); ++i)
    (tensor_slice(s, names[i]).dim >= 0 ? split : replicated).push_back(grads[i]);
  const double a = grad_norm(split, [&](double x) { return s.tp.group->sum({x})[0]; });
  const double b = grad_norm(replicated, [](double x) { return x; });
  return std::sqrt(over_data(a * a + b * b));
}

// Where a module's per-rank files (sharded optimizer state and weights) go: its name, and with tensor
// parallelism each tensor rank's own, as they hold different slices.
std::string rank_files_stem(const Running& r) {
  const auto* s = split_of(r.module);
  return s ? fmt::format("{}.tp-{}-of-{}", r.module.name, s->rank(), s->size()) : r.module.name;
}

// Copies a module's trained tensors from a checkpoint, matched by name; anything else in the
// checkpoint, or missing from it, means it comes from another configuration. `stem`: where a sharded
// run's per-rank pieces are.
void load_module_params(const std::string& ckpt, const TrainableModule& m, const std::string& stem) {
  std::map<std::string, at::Tensor> saved;
  const std::string from = fs::is_directory(fs::path(ckpt) / stem) ? stem : m.name;
  // A tensor-parallel run reads whole tensors (but this rank's own pieces) and slices them below.
  NamedParams expected = m.params;
  const TensorSplit* split = split_of(m);
  if (split && from != stem)
    for (auto& [name, t] : expected)
      t = at::empty(whole_sizes(t.sizes(), tensor_slice(*split, name)), t.options().device(at::kCPU));
  for (auto& [name, t] : read_module_params(ckpt, from, expected)) saved.emplace(name, t);
  at::NoGradGuard no_grad;
  for (const auto& [name, param] : m.params) {
    auto it = saved.find(name);
    if (it == saved.end())
      fail("checkpoint {}: module '{}' has no tensor '{}' (a checkpoint of another configuration?)", ckpt,
           m.name, name);
    if (split && !it->second.sizes().equals(param.sizes()))
      it->second =
          slice_named(*split, {{name, it->second}}, [](const std::string& n) { return n; })[0].second;
    if (it->second.scalar_type() != param.scalar_type() || !it->second.sizes().equals(param.sizes()))
      fail("checkpoint {}: tensor '{}' of module '{}' is {} [{}], this run trains {} [{}]", ckpt, name,
           m.name, dtype_name(it->second.scalar_type()), fmt::join(it->second.sizes(), ", "),
           dtype_name(param.scalar_type()), fmt::join(param.sizes(), ", "));
    param.copy_(it->second);
    saved.erase(it);
  }
  if (!saved.empty())
    fail(
        "checkpoint {}: module '{}' has tensor '{}', which this run does not train (a checkpoint of another "
        "configuration?)",
        ckpt, m.name, saved.begin()->first);
}

void write_validation_images(const std::string& output_dir, int64_t step,
                             const std::vector<ValidationImage>& images, TensorBoardWriter& tensorboard) {
  if (images.empty()) return;
  const fs::path dir = fs::path(output_dir) / "images" / fmt::format("step_{}", step);
  fs::create_directories(dir);
  for (const auto& im : images) {
    if (im.name.empty() ||
        im.name.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                  "0123456789_-.") != std::string::npos ||
        im.name[0] == '.')
      fail("a validation image's name must be letters, digits, '_', '-' or '.', not '{}'", im.name);
    write_text(dir / (im.name + ".png"), im.png);
    tensorboard.add_image(step, "validation/" + im.name, im.png, im.height, im.width, im.channels);
  }
}

}  // namespace

OptimizerSettings read_optimizer_settings(const Config& cfg, const std::string& prefix,
                                          const std::string& grad_clip_key) {
  auto key = [&](const char* k) { return prefix + "." + k; };
  OptimizerSettings o;
  o.prefix = prefix;
  o.adam.lr = cfg.get_float(key("lr"));
  const auto betas = cfg.get_float_list(key("betas"));
  if (betas.size() != 2) fail("config key '{}' expects two numbers, got {}", key("betas"), betas.size());
  o.adam.beta1 = betas[0];
  o.adam.beta2 = betas[1];
  o.adam.eps = cfg.get_float(key("eps"));
  o.adam.weight_decay = cfg.get_float(key("weight_decay"));
  o.min_lr = cfg.get_float(key("min_lr"));
  o.warmup_steps = cfg.get_int(key("warmup_steps"));
  o.grad_clip = cfg.get_float(grad_clip_key);
  const std::string scheduler = cfg.get_string(key("scheduler"));
  if (scheduler != "constant" && scheduler != "linear" && scheduler != "cosine")
    fail("config key '{}' expects constant, linear or cosine, got '{}'", key("scheduler"), scheduler);
  o.schedule = parse_schedule_kind(scheduler);
  if (!(o.adam.lr >= 0)) fail("config key '{}' must be >= 0, got {}", key("lr"), o.adam.lr);
  for (double b : betas)
    if (!(b >= 0 && b < 1)) fail("config key '{}' expects numbers in [0, 1), got {}", key("betas"), b);
  if (!(o.adam.eps >= 0)) fail("config key '{}' must be >= 0, got {}", key("eps"), o.adam.eps);
  if (!(o.adam.weight_decay >= 0))
    fail("config key '{}' must be >= 0, got {}", key("weight_decay"), o.adam.weight_decay);
  if (o.schedule != ScheduleKind::kConstant && !(o.min_lr >= 0 && o.min_lr <= o.adam.lr))
    fail("config key '{}' must be in [0, {} = {}], got {}", key("min_lr"), key("lr"), o.adam.lr, o.min_lr);
  if (o.warmup_steps < 0) fail("config key '{}' must be >= 0, got {}", key("warmup_steps"), o.warmup_steps);
  if (!(o.grad_clip >= 0)) fail("config key '{}' must be >= 0, got {}", grad_clip_key, o.grad_clip);
  return o;
}

TrainableModule whole_model(Transformer& model, OptimizerSettings optim, std::string tokenizer_dir,
                            std::string name) {
  TrainableModule m;
  m.name = std::move(name);
  m.model = &model;
  m.params = named_parameters(model);
  m.optim = optim;
  m.tokenizer_dir = std::move(tokenizer_dir);
  return m;
}

int64_t data_epochs(const Config& cfg) {
  return cfg.get_int("trainer.max_steps") > 0 ? 0 : cfg.get_int("trainer.max_epochs");
}

TrainerOptions read_trainer_options(const Config& cfg) {
  TrainerOptions o;
  o.max_steps = cfg.get_int("trainer.max_steps");
  o.max_epochs = cfg.get_int("trainer.max_epochs");
  o.micro_batch_size = cfg.get_int("trainer.micro_batch_size");
  // An online algorithm sets the global batch from its rollout instead (PPO: one update's responses).
  o.global_batch_size = cfg.has("trainer.global_batch_size") ? cfg.get_int("trainer.global_batch_size") : 1;
  o.val_interval = cfg.get_int("trainer.val_interval");
  o.save_interval = cfg.get_int("trainer.save_interval");
  o.keep_last = cfg.get_int("trainer.keep_last");
  if (cfg.has("trainer.async_checkpoint")) o.async_checkpoint = cfg.get_string("trainer.async_checkpoint");
  if (o.async_checkpoint != "auto" && o.async_checkpoint != "true" && o.async_checkpoint != "false")
    fail("config key 'trainer.async_checkpoint' expects auto, true or false, got '{}'", o.async_checkpoint);
  o.log_interval = std::max<int64_t>(1, cfg.get_int("trainer.log_interval"));
  o.seed = uint64_t(cfg.get_int("trainer.seed"));
  o.output_dir = cfg.get_string("output_dir");
  o.resume = cfg.get_string("resume");
  o.overwrite = cfg.get_bool("overwrite");
  const std::string sharding = cfg.has("trainer.sharding") ? cfg.get_string("trainer.sharding") : "none";
  if (sharding == "optimizer")
    o.sharding = dist::Sharding::kOptimizer;
  else if (sharding == "gradients")
    o.sharding = dist::Sharding::kGradients;
  else if (sharding == "full")
    o.sharding = dist::Sharding::kFull;
  else if (sharding != "none")
    fail("config key 'trainer.sharding' expects none, optimizer, gradients or full, got '{}'", sharding);
  if (o.output_dir.empty()) fail("config key 'output_dir' must be set");
  if (o.resume != "auto" && o.resume != "true" && o.resume != "false" &&
      !fs::exists(fs::path(o.resume) / "trainer_state.json"))
    fail(
        "config key 'resume' expects auto, true, false or a checkpoint folder, got '{}' (no "
        "trainer_state.json "
        "there)",
        o.resume);
  for (const char* key : {"trainer.max_steps", "trainer.max_epochs", "trainer.val_interval",
                          "trainer.save_interval", "trainer.keep_last", "trainer.log_interval"})
    if (cfg.get_int(key) < 0) fail("config key '{}' must not be negative, got {}", key, cfg.get_int(key));
  for (const char* key : {"trainer.micro_batch_size", "trainer.global_batch_size"})
    if (cfg.has(key) && cfg.get_int(key) < 1)
      fail("config key '{}' must be at least 1, got {}", key, cfg.get_int(key));
  if (o.max_steps == 0 && o.max_epochs == 0) fail("set trainer.max_steps or trainer.max_epochs");
  return o;
}

void train(const Config& cfg, const TrainerOptions& opt, std::vector<TrainableModule> trainable,
           Algorithm& algo, dist::Dist& dist) {
  const bool main_rank = dist.is_main();
  const int64_t per_step = opt.micro_batch_size * dist.world_size();
  if (opt.global_batch_size % per_step != 0)
    fail("trainer.global_batch_size ({}) must be a multiple of micro_batch_size x ranks ({} x {})",
         opt.global_batch_size, opt.micro_batch_size, dist.world_size());
  const int64_t accumulation = opt.global_batch_size / per_step;
  const int64_t examples = algo.train_examples(), updates = algo.updates_per_step();
  const auto per_step_examples = algo.examples_per_step(opt.global_batch_size);
  const int64_t step_examples = per_step_examples.count;
  if (updates < 1) fail("an algorithm must make at least one update per step, not {}", updates);
  if (examples < step_examples)
    fail("{} ({}) is larger than the training data ({} examples)", per_step_examples.key, step_examples,
         examples);
  // With packing an epoch can take fewer steps than this (a row holds several examples): the run then
  // stops where the data ends, and the schedule follows this bound.
  const int64_t total_steps = opt.max_steps > 0 ? opt.max_steps : examples / step_examples * opt.max_epochs;
  auto modules = prepare_modules(std::move(trainable), total_steps * updates);
  // Mixtral's load-balancing loss: model.router_aux_loss_coef, or (null) what the model's config.json
  // asks for. Each micro-batch's training forward adds coef / (micro-batches x ranks) of it, as a
  // mean loss per micro-batch averaged over accumulation and ranks would.
  double router_coef = 0;
  for (const auto& r : modules)
    if (r.module.model && r.module.model->cfg.num_experts > 0) {
      const char* key = "model.router_aux_loss_coef";  // null (a string key): config.json's
      const std::string text = cfg.has(key) ? cfg.get_string(key) : "";
      router_coef = r.module.model->cfg.router_aux_loss_coef;
      if (!text.empty()) {
        char* end = nullptr;
        router_coef = std::strtod(text.c_str(), &end);
        if (end != text.c_str() + text.size() || !(router_coef >= 0))
          fail("config key '{}' expects a number >= 0 or null, got '{}'", key, text);
      }
    }
  // With one module the metrics keep their plain names ("lr"); with several each is prefixed.
  auto module_key = [&](const Running& r, const std::string& what) {
    return modules.size() == 1 ? what : r.module.name + "/" + what;
  };

  // Every rank of the run: with tensor parallelism `dist` is the data-parallel group, which the tensor
  // group's barrier on either side joins to all of them.
  const TensorParallel* tensor = process_tensor_parallel();
  const auto barrier = [&] {
    if (tensor) tensor->group->barrier();
    dist.barrier();
    if (tensor) tensor->group->barrier();
  };
  std::unique_ptr<OutputDirLock> lock;
  if (main_rank) lock = prepare_output_dir(opt);
  barrier();
  if (main_rank) {
    cfg.save((fs::path(opt.output_dir) / "config.yaml").string());
    log_info("config:\n{}", cfg.to_yaml());
  }

  // Resume: trained weights, optimizer moments, step and this rank's data position from the newest
  // checkpoint, each module matched by name.
  int64_t step = 0;
  std::string ckpt;
  if (opt.resume == "auto" || opt.resume == "true") {
    ckpt = latest_checkpoint(opt.output_dir);
    if (opt.resume == "true" && ckpt.empty()) fail("resume=true but {} has no checkpoint", opt.output_dir);
  } else if (opt.resume != "false") {
    ckpt = opt.resume;
    const std::string problem = checkpoint_problem(ckpt);
    if (!problem.empty()) fail("resume={}: {}", ckpt, problem);
  }
  CheckpointState saved;
  nlohmann::json data_state;  // where this rank continues the data
  if (!ckpt.empty()) {
    saved = read_checkpoint_state(ckpt);
    data_state = saved.world_size == dist.world_size() ? saved.data.at(dist.rank()) : nlohmann::json();
    // Each rank's position is in its own shard of the data, which another number of ranks cuts
    // otherwise: the algorithm says where the new shards continue the old ones, if they can.
    if (saved.world_size != dist.world_size()) {
      std::optional<nlohmann::json> mine;
      try {
        mine = algo.reshard_state(saved.data);
      } catch (const nlohmann::json::exception& e) {
        fail("{}/trainer_state.json: field \"data\" is not a data position of this run: {}", ckpt, e.what());
      }
      if (!mine)
        fail(
            "checkpoint {} was written by {} ranks and this run has {}: their data positions do not continue "
            "exactly on {} ranks (the ranks read different amounts, an example waits for a packed row, or a "
            "number of ranks does not divide the data set or what was read); resume with {} ranks (or "
            "resume=false to start afresh)",
            ckpt, saved.world_size, dist.world_size(), dist.world_size(), saved.world_size);
      data_state = *mine;
    }
    std::set<std::string> names(saved.modules.begin(), saved.modules.end());
    for (const auto& r : modules)
      if (!names.erase(r.module.name))
        fail("checkpoint {} has no trainable module '{}' (modules: {})", ckpt, r.module.name,
             fmt::join(saved.modules, ", "));
    if (!names.empty())
      fail("checkpoint {} has a trainable module '{}' that this run does not train", ckpt, *names.begin());
    for (const auto& r : modules) load_module_params(ckpt, r.module, rank_files_stem(r));
  }
  // Rank 0's weights to every rank, and with sharding each rank's pieces of them.
  std::vector<at::Tensor> leaves;
  std::vector<std::pair<size_t, std::string>> leaf_of;  // per leaf: module, name
  for (size_t k = 0; k < modules.size(); ++k)
    for (const auto& [name, t] : modules[k].module.params) {
      leaves.push_back(t);
      leaf_of.emplace_back(k, name);
    }
  const bool sharded = dist.world_size() > 1 && opt.sharding != dist::Sharding::kNone;
  const bool full = sharded && opt.sharding == dist::Sharding::kFull;
  std::unique_ptr<dist::DataParallel> ddp;
  if (dist.world_size() > 1 && !full) {
    ddp = std::make_unique<dist::DataParallel>(
        dist, leaves, dist::DataParallelOptions{25 << 20, dist::GradReduction::kSum, opt.sharding});
    ddp->broadcast_parameters();
  }
  // Full sharding: each module's model on its own (weights shared between models, as a LoRA critic
  // on the actor's base, would be sharded twice).
  std::map<const void*, std::string> sharded_by;
  for (auto& r : modules) {
    if (!full) break;
    if (!r.module.model)
      fail("trainer.sharding=full shards transformer models only, not module '{}'", r.module.name);
    for (const auto& [name, t] : model_parameters(r.module)) {
      const auto [at, fresh] = sharded_by.emplace(t.unsafeGetTensorImpl(), r.module.name);
      if (!fresh)
        fail(
            "trainer.sharding=full shards each trained model on its own, and modules '{}' and '{}' share the "
            "weight '{}'; use trainer.sharding=gradients",
            at->second, r.module.name, name);
    }
    r.sharded_model = dist::ShardedModel::shard(dist, *r.module.model);
  }

  check_memory(modules, leaves, ddp ? ddp->shard_pieces() : std::vector<dist::ShardPiece>(), dist,
               sharded ? opt.sharding : dist::Sharding::kNone);
  // After the weights are loaded: bf16 parameters take their fp32 master copies now, of this rank's
  // pieces only when sharded.
  for (size_t k = 0; k < modules.size(); ++k) {
    auto& r = modules[k];
    if (!sharded) {
      r.optimizer = std::make_unique<AdamW>(r.module.params, r.module.optim.adam);
      continue;
    }
    NamedParams pieces;
    std::vector<bool> decay;
    for (const auto& piece :
         r.sharded_model ? r.sharded_model->pieces() : std::vector<dist::ShardedModel::Piece>()) {
      pieces.emplace_back(piece.name, piece.values);
      decay.push_back(decays(piece.name, piece.param));
      r.offsets[piece.name] = piece.offset;
      r.piece_names.push_back(piece.name);
    }
    const auto& all = ddp ? ddp->shard_pieces() : std::vector<dist::ShardPiece>();
    for (size_t j = 0; j < all.size(); ++j) {
      const auto& [module, name] = leaf_of[all[j].param];
      if (module != k) continue;
      const auto& param = leaves[all[j].param];
      pieces.emplace_back(name, param.detach().view(-1).narrow(0, all[j].offset, all[j].numel));
      r.piece_names.push_back(name);
      decay.push_back(decays(name, param));
      r.pieces.push_back(j);
      r.offsets[name] = all[j].offset;
    }
    r.optimizer = std::make_unique<AdamW>(std::move(pieces), r.module.optim.adam, decay);
  }
  if (!ckpt.empty()) {
    for (auto& r : modules) {
      // Sharded runs write per-rank files named by their tensor-parallel rank (rank_files_stem).
      const std::string stem = rank_files_stem(r) + ".optimizer.";
      bool found = !sharded;
      for (const auto& e : fs::directory_iterator(ckpt))
        found = found || e.path().filename().string().rfind(stem, 0) == 0;
      if (!found)
        fail(
            "checkpoint {} holds no optimizer state for '{}': another trainer.sharding or "
            "trainer.tensor_parallel "
            "wrote it (a sharded run resumes on the same tensor_parallel); resume with that layout, or "
            "resume=false",
            ckpt, rank_files_stem(r));
    }
    for (auto& r : modules)
      r.optimizer->load_state(
          split_of(r.module) && !sharded
              ? read_split_optimizer(ckpt, r)
              : read_module_optimizer(ckpt, rank_files_stem(r), r.optimizer->state(), r.offsets));
    step = saved.step;
    try {
      algo.load_state(data_state);
    } catch (const nlohmann::json::exception& e) {
      // A hand-edited or foreign trainer_state.json: say where, not only what the library saw.
      fail("{}/trainer_state.json: field \"data\"[{}] is not a data position of this run: {}", ckpt,
           dist.rank(), e.what());
    }
    log_info(
        "resuming from {} (step {}){}", ckpt, step,
        saved.world_size != dist.world_size() ? fmt::format(", written by {} ranks", saved.world_size) : "");
  }

  std::unique_ptr<MetricsLog> metrics;
  std::unique_ptr<TensorBoardWriter> tensorboard;
  if (main_rank) {
    metrics = std::make_unique<MetricsLog>((fs::path(opt.output_dir) / "metrics.jsonl").string(), step > 0);
    if (step > 0) metrics->truncate_after(step);
    tensorboard = std::make_unique<TensorBoardWriter>((fs::path(opt.output_dir) / "tensorboard").string());
  }
  auto log_row = [&](const std::string& split, int64_t at_step,
                     const std::vector<std::pair<std::string, double>>& values) {
    if (!main_rank) return;
    nlohmann::json row = {{"step", at_step}, {"split", split}};
    std::vector<std::pair<std::string, double>> tb;
    for (const auto& [k, v] : values) {
      row[k] = v;
      tb.emplace_back(split + "/" + k, v);
    }
    metrics->write(row);
    tensorboard->add_scalars(at_step, tb);
  };

  // A sharded model is gathered whole where something reads its weights outside a forward pass.
  const auto hold = [&](bool on) {
    for (auto& r : modules)
      if (r.sharded_model) on ? r.sharded_model->hold() : r.sharded_model->release();
  };
  auto validate = [&](int64_t at_step) -> std::optional<double> {
    at::NoGradGuard no_grad;
    hold(algo.generates());
    const auto val = algo.validate();
    hold(false);
    if (main_rank) write_validation_images(opt.output_dir, at_step, val.images, *tensorboard);
    // Every rank must join the reduction, even one whose share of the validation set is empty.
    const bool any = dist.sum({double(val.parts.size())})[0] > 0;
    if (!any) return std::nullopt;
    auto values = reduce_metrics(dist, val.metric_names, val.parts, nullptr);
    if (values.empty()) return std::nullopt;
    log_row("validation", at_step, values);
    if (main_rank) log_info("step {}: validation {} {:.4f}", at_step, values[0].first, values[0].second);
    return values[0].second;
  };

  // The step of the newest checkpoint in output_dir; -1: none yet.
  int64_t saved_step = !ckpt.empty() && opt.resume != ckpt ? step : -1;
  // A GPU's tensors are copied to host memory and written from there while training goes on; on
  // the CPU that copy would double the memory the run needs, so there it is written in place.
  const bool async_save =
      opt.async_checkpoint == "true" || (opt.async_checkpoint == "auto" && leaves.front().device().is_cuda());
  CheckpointWriter writer;
  auto save = [&] {
    saved_step = step;
    // Every rank's data position goes into the one checkpoint that rank 0 writes; with sharding
    // every rank writes its optimizer shard into the folder first.
    std::vector<nlohmann::json> data;
    for (const auto& s : gather_strings(dist, algo.state().dump())) data.push_back(nlohmann::json::parse(s));
    if (main_rank) begin_checkpoint(opt.output_dir, step);
    if (sharded) {
      barrier();
      const std::string tmp = checkpoint_tmp_dir(opt.output_dir, step);
      for (const auto& r : modules) {
        write_optimizer_shard(tmp, rank_files_stem(r), dist.rank(), dist.world_size(), r.optimizer->state(),
                              r.offsets);
        // Fully sharded weights: each rank's pieces of them too.
        if (!r.sharded_model) continue;
        NamedParams pieces;
        for (const auto& p : r.sharded_model->pieces()) pieces.emplace_back(p.name, p.values);
        write_weight_shard(tmp, rank_files_stem(r), dist.rank(), dist.world_size(), pieces, r.offsets);
      }
      barrier();
    }
    // Tensor parallel: whole tensors, gathered over the tensor group of the first data replica (the
    // main rank's), so that any layout resumes from them.
    std::vector<std::optional<Transformer>> whole(modules.size());
    std::vector<NamedParams> params(modules.size()), states(modules.size());
    for (size_t k = 0; k < modules.size() && dist.rank() == 0; ++k) {
      const auto& r = modules[k];
      const auto* split = split_of(r.module);
      // Fully sharded weights are written by each rank as pieces, the optimizer state of any sharding so.
      if (r.sharded_model) continue;
      // A whole model is written from its gathered copy.
      if (!(split && r.whole_model))
        params[k] = split ? gather_named(*split, r.module.params, [](const std::string& n) { return n; })
                          : r.module.params;
      if (!sharded)
        states[k] = split ? gather_named(*split, r.optimizer->state(), state_param) : r.optimizer->state();
      if (split && r.whole_model) whole[k] = gather_transformer(*r.module.model);
    }
    if (main_rank) {
      std::vector<CheckpointModule> saved_modules;
      CheckpointState state{step, dist.world_size(), {}, std::move(data)};
      for (size_t k = 0; k < modules.size(); ++k) {
        const auto& r = modules[k];
        saved_modules.push_back({r.module.name, whole[k] ? &*whole[k] : r.module.model, params[k],
                                 r.whole_model, states[k], bool(r.sharded_model), r.module.tokenizer_dir});
        state.modules.push_back(r.module.name);
      }
      if (async_save)
        writer.write(opt.output_dir, saved_modules, state, opt.keep_last);
      else
        save_checkpoint(opt.output_dir, saved_modules, state, opt.keep_last);
    }
    barrier();
  };

  // A real signal at a chosen step (SIGKILL, or ALIGNER_KILL_SIGNAL=TERM or INT), so that tests can
  // check that a killed or stopped run resumes to the same weights as one never interrupted.
  const char* kill_env = std::getenv("ALIGNER_KILL_AT_STEP");
  const int64_t kill_at = kill_env ? std::atoll(kill_env) : -1;
  const std::string kill_name =
      std::getenv("ALIGNER_KILL_SIGNAL") ? std::getenv("ALIGNER_KILL_SIGNAL") : "KILL";
  const int kill_signal = kill_name == "TERM" ? SIGTERM : kill_name == "INT" ? SIGINT : SIGKILL;

  const StopSignals signals;
  StepProfiler profiler(opt.output_dir, dist.world_rank());
  Progress progress(total_steps, main_rank && ::isatty(STDERR_FILENO), opt.log_interval, step);
  if (step == 0 && opt.val_interval > 0) validate(0);
  while (step < total_steps) {
    // Before the next step's data is read, so that the checkpoint continues with it.
    const double stopping = dist.sum({double(stop_signal != 0)})[0];
    if (stopping > 0) {
      progress.finish();
      if (saved_step != step) save();
      writer.wait();
      fail("stopped by {} after step {}; the checkpoint {} holds it: run the same command to resume",
           stop_signal != 0 ? strsignal(stop_signal) : "a signal to another rank", step,
           (fs::path(opt.output_dir) / "checkpoints" / fmt::format("step_{}", step)).string());
    }
    profiler.before_step(step + 1);
    compat::choose_attention_kernels();
    const auto t0 = Clock::now();
    const bool offload = algo.offload_optimizer_in_next_step();
    if (offload)
      for (auto& r : modules) r.optimizer->move_state(at::kCPU);
    hold(algo.generates());
    const bool loaded = algo.next_step(accumulation * updates);
    hold(false);
    if (offload)
      for (auto& r : modules) r.optimizer->move_state(r.module.params.front().second.device());
    // One collective settles both whether every rank has data (uneven shards end together, rather
    // than one rank leaving for validation while the others wait in this step's reductions) and
    // what each update's loss is divided by.
    std::vector<double> counts(1 + updates, 0.0);
    counts[0] = loaded ? 1.0 : 0.0;
    for (int64_t i = 0; loaded && i < accumulation * updates; ++i)
      counts[1 + i / accumulation] += algo.units(i);
    const auto agreed = dist.sum(counts);
    if (agreed[0] < dist.world_size()) {
      if (main_rank && agreed[0] > 0)
        log_info("step {}: a rank's share of the data is done, so every rank stops here", step + 1);
      break;
    }

    // Random draws of the updates (adapter dropout) depend on the seed, step and rank alone, so a
    // resumed run draws what an uninterrupted one does.
    at::manual_seed(opt.seed + 0x9E3779B97F4A7C15ull * uint64_t(step + 1) +
                    0xBF58476D1CE4E5B9ull * uint64_t(dist.rank()));
    const auto updates_start = Clock::now();
    router_aux_loss() = {router_coef / double(accumulation * dist.world_size()), 0, 0};
    std::vector<LossSums> parts;
    std::vector<std::pair<std::string, double>> shown;  // lr and grad_norm per module
    std::vector<double> norm_sums(modules.size(), 0.0);
    for (int64_t u = 0; u < updates; ++u) {
      const double global_units = agreed[1 + u];
      if (global_units <= 0)
        fail("step {}: the global batch has nothing to train on (every loss token masked)", step + 1);
      for (int64_t i = u * accumulation; i < (u + 1) * accumulation; ++i) {
        if (ddp && i == (u + 1) * accumulation - 1) ddp->begin_final_backward();
        LossSums part = algo.loss(i);
        (part.loss / global_units).backward();
        part.loss = part.loss.detach();
        parts.push_back(std::move(part));
      }
      if (ddp) ddp->sync_gradients();
      const int64_t update = step * updates + u;
      std::vector<double> lrs, scales;
      bool finite = true;
      // Sharded: each module's pieces' gradients, its norm summed over the ranks.
      std::vector<std::vector<at::Tensor>> piece_grads(modules.size());
      if (full)
        for (size_t k = 0; k < modules.size(); ++k)
          piece_grads[k] = modules[k].sharded_model->sync_gradients();
      if (sharded && !full) {
        const auto grads = ddp->shard_gradients();
        for (size_t k = 0; k < modules.size(); ++k)
          for (size_t j : modules[k].pieces) piece_grads[k].push_back(grads[j]);
      }
      const auto sum_over_ranks = [&](double x) { return dist.sum({x})[0]; };
      for (size_t k = 0; k < modules.size(); ++k) {
        auto& r = modules[k];
        const double clip = r.module.optim.grad_clip;
        const auto* split = split_of(r.module);
        double norm = 0;
        if (sharded && split) {
          norm = split_grad_norm(piece_grads[k], r.piece_names, *split, sum_over_ranks);
        } else if (sharded) {
          norm = grad_norm(piece_grads[k], sum_over_ranks);
        } else {
          std::vector<at::Tensor> grads;
          std::vector<std::string> names;
          for (const auto& [name, p] : r.module.params)
            if (p.grad().defined()) grads.push_back(p.grad()), names.push_back(name);
          norm = split ? split_grad_norm(grads, names, *split, [](double x) { return x; })
                       : grad_norm(grads, [](double x) { return x; });
        }
        if (!std::isfinite(norm)) {
          log_warn("step {}: the gradient norm of '{}' is {}; update skipped", step + 1, r.module.name, norm);
          finite = false;
        }
        norm_sums[k] += norm;
        lrs.push_back(schedule_lr(r.schedule, update));
        // Clipping's multiply is left to the optimizer's update (on a GPU, inside its kernel).
        scales.push_back(clip > 0 ? clip_coefficient(norm, clip) : 1.0);
      }
      for (size_t k = 0; k < modules.size(); ++k) {
        if (finite && sharded) modules[k].optimizer->step(lrs[k], std::move(piece_grads[k]), scales[k]);
        if (finite && !sharded) modules[k].optimizer->step(lrs[k], scales[k]);
        for (auto& [name, t] : modules[k].module.params) t.mutable_grad() = at::Tensor();
      }
      if (full)
        for (auto& r : modules) r.sharded_model->end_step();
      else if (sharded)
        ddp->gather_parameters();
      if (u == 0)
        for (size_t k = 0; k < modules.size(); ++k) shown.emplace_back(module_key(modules[k], "lr"), lrs[k]);
    }
    if (router_coef > 0) {
      const auto aux = dist.sum({router_aux_loss().sum, double(router_aux_loss().count)});
      if (aux[1] > 0) shown.emplace_back("router_aux_loss", aux[0] / aux[1]);
    }
    router_aux_loss() = {};
    // With several updates a step reports the mean of their norms.
    for (size_t k = 0; k < modules.size(); ++k)
      shown.emplace_back(module_key(modules[k], "grad_norm"), norm_sums[k] / double(updates));
    const double update_seconds = seconds_since(updates_start);
    ++step;
    algo.after_optimizer_step(step);

    double tokens = 0;
    // Every rank loads `accumulation` micro-batches, so each knows the names from its own.
    std::vector<std::string> names;
    for (const auto& m : parts.front().metrics) names.push_back(m.name);
    auto values = reduce_metrics(dist, names, parts, &tokens);
    const double step_seconds = seconds_since(t0), tokens_per_s = tokens / std::max(step_seconds, 1e-9);
    values.insert(values.end(), shown.begin(), shown.end());
    // The GPU memory each rank has needed so far (their mean), unless the algorithm reports it.
    const at::Device device = leaves.front().device();
    const bool reported =
        std::any_of(values.begin(), values.end(), [](const auto& v) { return v.first == "peak_memory_gb"; });
    if (device.is_cuda() && !reported)
      values.emplace_back("peak_memory_gb", dist.sum({peak_memory_gb(device)})[0] / dist.world_size());
    if (main_rank) progress.update(step, values, tokens_per_s);
    values.emplace_back("tokens_per_s", tokens_per_s);
    values.emplace_back("step_seconds", step_seconds);
    values.emplace_back("update_seconds", update_seconds);
    if (step % opt.log_interval == 0 || step == total_steps) log_row("train", step, values);
    if (opt.val_interval > 0 && step % opt.val_interval == 0) validate(step);
    if (opt.save_interval > 0 && step % opt.save_interval == 0) save();
    profiler.after_step(step);
    // As a kill after the step's checkpoint is on disk (a real one may lose a checkpoint still
    // being written, never an older one).
    if (step == kill_at) {
      writer.wait();
      std::raise(kill_signal);
    }
  }
  progress.finish();
  if (step == 0)
    fail(
        "no step was trained: the training data gave no full global batch of {} (were its examples dropped "
        "or "
        "skipped?)",
        opt.global_batch_size);
  if (opt.val_interval <= 0 || step % opt.val_interval != 0) validate(step);
  std::vector<std::optional<Transformer>> copies;
  for (auto& r : modules) {
    std::optional<Transformer> copy;
    if (r.module.export_final && r.sharded_model) copy = r.sharded_model->host_copy();
    // Tensor parallel: the first data replica's slices put together over its tensor group.
    const bool root = r.sharded_model ? bool(copy) : dist.rank() == 0;
    if (r.module.export_final && split_of(r.module) && root)
      copy = gather_transformer(copy ? *copy : *r.module.model);
    copies.push_back(std::move(copy));
  }
  if (main_rank) {
    int64_t exported = 0;
    for (const auto& r : modules) exported += r.module.export_final;
    for (size_t k = 0; k < modules.size(); ++k) {
      const auto& r = modules[k];
      if (!r.module.export_final) continue;
      fs::path dir = fs::path(opt.output_dir) / "final";
      if (exported > 1) dir /= r.module.name;
      // The run owns output_dir (it holds the lock): final/ is replaced whatever it holds.
      const auto& mod = r.module;
      if (!mod.model) {
        mod.other.save(dir.string());
        log_info("wrote {} after {} steps", dir.string(), step);
        continue;
      }
      const Transformer& model = copies[k] ? *copies[k] : *mod.model;
      if (mod.lora.rank > 0 && !mod.merge_on_save)
        save_peft_adapter(model, mod.lora, dir.string(), mod.tokenizer_dir, mod.tokenizer_dir,
                          Replace::anything);
      else
        save_transformer(mod.lora.rank > 0 ? merged_copy(model) : model, dir.string(), std::nullopt, 0,
                         mod.tokenizer_dir, Replace::anything);
      log_info("wrote {} after {} steps", dir.string(), step);
    }
  }
  writer.wait();
  barrier();
  // The models leave the trainer whole, as they came.
  for (auto& r : modules)
    if (r.sharded_model) r.sharded_model->unshard();
}

}  // namespace aligner
