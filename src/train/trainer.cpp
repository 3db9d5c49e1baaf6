#include "train/trainer.h"

#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdlib>
#include <filesystem>

#include "core/error.h"
#include "core/log.h"
#include "core/metrics.h"
#include "core/progress.h"
#include "core/tensorboard.h"
#include "dist/ddp.h"
#include "io/hf_checkpoint.h"
#include "train/checkpoint.h"
#include "train/optimizer.h"
#include "train/schedule.h"

namespace aligner {
namespace fs = std::filesystem;
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// Sums over ranks of [units, loss, tokens, metric...] in one collective.
std::vector<double> sum_over_ranks(dist::Dist& dist, std::vector<double> values) {
  if (dist.world_size() == 1) return values;
  auto t = at::tensor(values, at::TensorOptions().dtype(at::kDouble)).to(dist.device());
  std::vector<at::Tensor> ts{t};
  dist.all_reduce_sum(ts);
  auto cpu = ts[0].cpu();
  return std::vector<double>(cpu.data_ptr<double>(), cpu.data_ptr<double>() + cpu.numel());
}

// Means per unit over the global batch of the given micro-batch results: "loss", then the metrics
// `names`, which every part must carry in that order. A rank without parts still sends zeros for
// each name, so that all ranks reduce vectors of one length.
std::vector<std::pair<std::string, double>> reduce_metrics(dist::Dist& dist,
                                                           const std::vector<std::string>& names,
                                                           const std::vector<LossSums>& parts,
                                                           double* tokens_out) {
  std::vector<double> sums(3 + names.size(), 0.0);  // units, loss, tokens, metric...
  for (const auto& p : parts) {
    sums[0] += p.units;
    sums[1] += p.loss.defined() ? p.loss.item<double>() : 0.0;
    sums[2] += double(p.tokens);
    bool same = p.metrics.size() == names.size();
    for (size_t k = 0; same && k < names.size(); ++k) same = p.metrics[k].first == names[k];
    if (!same) fail("a micro-batch reports metrics other than the [{}] declared", fmt::join(names, ", "));
    for (size_t k = 0; k < names.size(); ++k) sums[3 + k] += p.metrics[k].second;
  }
  sums = sum_over_ranks(dist, sums);
  if (tokens_out) *tokens_out = sums[2];
  const double units = std::max(sums[0], 1e-12);
  std::vector<std::pair<std::string, double>> out{{"loss", sums[1] / units}};
  for (size_t k = 0; k < names.size(); ++k) out.emplace_back(names[k], sums[3 + k] / units);
  return out;
}

void prepare_output_dir(const TrainerOptions& opt, bool main_rank) {
  if (!main_rank) return;
  const fs::path dir(opt.output_dir);
  const bool non_empty = fs::exists(dir) && !fs::is_empty(dir);
  if (opt.resume == "false" && non_empty) {
    if (!opt.overwrite)
      fail(
          "output_dir {} is not empty; resume=false refuses to write over it (set overwrite=true to clear "
          "it, "
          "or resume=auto to continue)",
          opt.output_dir);
    fs::remove_all(dir);
  }
  fs::create_directories(dir);
}

safetensors::NamedTensors read_named(const std::string& path) {
  auto f = safetensors::File::open(path);
  safetensors::NamedTensors out;
  for (const auto& info : f.tensors()) out.emplace_back(info.name, f.get(info.name));
  return out;
}

}  // namespace

TrainerOptions read_trainer_options(const Config& cfg) {
  TrainerOptions o;
  o.max_steps = cfg.get_int("trainer.max_steps");
  o.max_epochs = cfg.get_int("trainer.max_epochs");
  o.micro_batch_size = cfg.get_int("trainer.micro_batch_size");
  o.global_batch_size = cfg.get_int("trainer.global_batch_size");
  o.val_interval = cfg.get_int("trainer.val_interval");
  o.save_interval = cfg.get_int("trainer.save_interval");
  o.keep_last = cfg.get_int("trainer.keep_last");
  o.log_interval = std::max<int64_t>(1, cfg.get_int("trainer.log_interval"));
  o.seed = uint64_t(cfg.get_int("trainer.seed"));
  o.grad_clip = cfg.get_float("trainer.grad_clip");
  o.output_dir = cfg.get_string("output_dir");
  o.resume = cfg.get_string("resume");
  o.overwrite = cfg.get_bool("overwrite");
  if (o.output_dir.empty()) fail("config key 'output_dir' must be set");
  if (o.resume != "auto" && o.resume != "true" && o.resume != "false")
    fail("config key 'resume' expects auto, true or false, got '{}'", o.resume);
  if (o.micro_batch_size < 1 || o.global_batch_size < 1)
    fail("trainer.micro_batch_size and trainer.global_batch_size must be at least 1");
  if (o.max_steps <= 0 && o.max_epochs <= 0) fail("set trainer.max_steps or trainer.max_epochs");
  return o;
}

void train(const Config& cfg, const TrainerOptions& opt, Transformer& model, Algorithm& algo,
           dist::Dist& dist, const std::string& tokenizer_dir) {
  const bool main_rank = dist.is_main();
  const int64_t per_step = opt.micro_batch_size * dist.world_size();
  if (opt.global_batch_size % per_step != 0)
    fail("trainer.global_batch_size ({}) must be a multiple of micro_batch_size x ranks ({} x {})",
         opt.global_batch_size, opt.micro_batch_size, dist.world_size());
  const int64_t accumulation = opt.global_batch_size / per_step;
  const int64_t total_steps =
      opt.max_steps > 0 ? opt.max_steps
                        : std::max<int64_t>(1, algo.steps_per_epoch(opt.global_batch_size) * opt.max_epochs);

  prepare_output_dir(opt, main_rank);
  dist.barrier();
  if (main_rank) {
    cfg.save((fs::path(opt.output_dir) / "config.yaml").string());
    log_info("config:\n{}", cfg.to_yaml());
  }

  auto params = named_parameters(model);
  for (auto& [name, t] : params) t.requires_grad_(true);
  AdamWConfig adam;
  adam.lr = cfg.get_float("optim.lr");
  const auto betas = cfg.get_float_list("optim.betas");
  if (betas.size() != 2) fail("config key 'optim.betas' expects two numbers, got {}", betas.size());
  adam.beta1 = betas[0];
  adam.beta2 = betas[1];
  adam.eps = cfg.get_float("optim.eps");
  adam.weight_decay = cfg.get_float("optim.weight_decay");
  Schedule schedule{parse_schedule_kind(cfg.get_string("optim.scheduler")), adam.lr,
                    cfg.get_float("optim.min_lr"), cfg.get_int("optim.warmup_steps"), total_steps};
  check_schedule(schedule);

  // Resume: weights, optimizer moments, step and data position from the newest checkpoint.
  int64_t step = 0;
  const std::string ckpt = opt.resume == "false" ? "" : latest_checkpoint(opt.output_dir);
  if (opt.resume == "true" && ckpt.empty()) fail("resume=true but {} has no checkpoint", opt.output_dir);
  if (!ckpt.empty()) {
    auto saved = load_transformer((fs::path(ckpt) / "model").string(), at::kCPU, model.cfg.dtype);
    at::NoGradGuard no_grad;
    auto saved_params = named_parameters(saved);
    for (size_t i = 0; i < params.size(); ++i) params[i].second.copy_(saved_params[i].second);
  }
  AdamW optimizer(params, adam);
  if (!ckpt.empty()) {
    optimizer.load_state(read_named((fs::path(ckpt) / "optimizer.safetensors").string()));
    const auto state = read_checkpoint_state(ckpt);
    step = state.step;
    algo.load_state(state.trainer.at("data"));
    log_info("resuming from {} (step {})", ckpt, step);
  }

  std::vector<at::Tensor> leaves;
  for (auto& [name, t] : params) leaves.push_back(t);
  std::unique_ptr<dist::DataParallel> ddp;
  if (dist.world_size() > 1) {
    ddp = std::make_unique<dist::DataParallel>(
        dist, leaves, dist::DataParallelOptions{25 << 20, dist::GradReduction::kSum});
    ddp->broadcast_parameters();
  }

  std::unique_ptr<MetricsLog> metrics;
  std::unique_ptr<TensorBoardWriter> tensorboard;
  if (main_rank) {
    metrics = std::make_unique<MetricsLog>((fs::path(opt.output_dir) / "metrics.jsonl").string(), step > 0);
    if (step > 0) metrics->truncate_after(step);
    tensorboard = std::make_unique<TensorBoardWriter>((fs::path(opt.output_dir) / "tensorboard").string());
  }
  auto log_row = [&](const std::string& split, int64_t at_step,
                     const std::vector<std::pair<std::string, double>>& values, const nlohmann::json& extra) {
    if (!main_rank) return;
    nlohmann::json row = {{"step", at_step}, {"split", split}};
    std::vector<std::pair<std::string, double>> tb;
    for (const auto& [k, v] : values) {
      row[k] = v;
      tb.emplace_back(split + "/" + k, v);
    }
    for (const auto& [k, v] : extra.items()) {
      row[k] = v;
      if (v.is_number()) tb.emplace_back(split + "/" + k, v.get<double>());
    }
    metrics->write(row);
    tensorboard->add_scalars(at_step, tb);
  };

  auto validate = [&](int64_t at_step) -> std::optional<double> {
    at::NoGradGuard no_grad;
    const auto val = algo.validate();
    // Every rank must join the reduction, even one whose share of the validation set is empty.
    const bool any = sum_over_ranks(dist, {double(val.parts.size())})[0] > 0;
    if (!any) return std::nullopt;
    auto values = reduce_metrics(dist, val.metric_names, val.parts, nullptr);
    log_row("validation", at_step, values, {});
    if (main_rank) log_info("step {}: validation loss {:.4f}", at_step, values[0].second);
    return values[0].second;
  };

  // A real SIGKILL at a chosen step, so that tests can check that a killed run resumes to the
  // same weights as one never interrupted.
  const char* kill_env = std::getenv("ALIGNER_KILL_AT_STEP");
  const int64_t kill_at = kill_env ? std::atoll(kill_env) : -1;

  Progress progress(total_steps, main_rank && ::isatty(STDERR_FILENO), opt.log_interval, step);
  if (step == 0 && opt.val_interval > 0) validate(0);
  while (step < total_steps) {
    const auto t0 = Clock::now();
    if (!algo.next_step(accumulation)) break;
    double units = 0;
    for (int64_t i = 0; i < accumulation; ++i) units += algo.units(i);
    const double global_units = sum_over_ranks(dist, {units})[0];
    if (global_units <= 0)
      fail("step {}: the global batch has nothing to train on (every loss token masked)", step + 1);

    std::vector<LossSums> parts;
    for (int64_t i = 0; i < accumulation; ++i) {
      if (ddp && i == accumulation - 1) ddp->begin_final_backward();
      LossSums part = algo.loss(i);
      (part.loss / global_units).backward();
      part.loss = part.loss.detach();
      parts.push_back(std::move(part));
    }
    if (ddp) ddp->sync_gradients();
    const double grad_norm = clip_grad_norm(params, opt.grad_clip > 0 ? opt.grad_clip : INFINITY);
    const double lr = schedule_lr(schedule, step);
    if (std::isfinite(grad_norm)) {
      optimizer.step(lr);
    } else {
      log_warn("step {}: gradient norm is {}; step skipped", step + 1, grad_norm);
    }
    optimizer.zero_grad();
    ++step;

    double tokens = 0;
    // Every rank loads `accumulation` micro-batches, so each knows the names from its own.
    std::vector<std::string> names;
    for (const auto& m : parts.front().metrics) names.push_back(m.first);
    auto values = reduce_metrics(dist, names, parts, &tokens);
    const double tokens_per_s = tokens / std::max(seconds_since(t0), 1e-9);
    auto shown = values;
    shown.emplace_back("lr", lr);
    shown.emplace_back("grad_norm", grad_norm);
    if (main_rank) progress.update(step, shown, tokens_per_s);
    if (step % opt.log_interval == 0 || step == total_steps)
      log_row("train", step, values, {{"lr", lr}, {"grad_norm", grad_norm}, {"tokens_per_s", tokens_per_s}});
    if (opt.val_interval > 0 && step % opt.val_interval == 0) validate(step);
    if (opt.save_interval > 0 && step % opt.save_interval == 0) {
      if (main_rank)
        save_checkpoint(opt.output_dir, model, optimizer.state(),
                        {step, {{"data", algo.state()}, {"optimizer_steps", optimizer.step_count()}}},
                        opt.keep_last, tokenizer_dir);
      dist.barrier();
    }
    if (step == kill_at) std::raise(SIGKILL);
  }
  progress.finish();
  if (opt.val_interval <= 0 || step % opt.val_interval != 0) validate(step);
  if (main_rank) {
    const std::string final_dir = (fs::path(opt.output_dir) / "final").string();
    save_transformer(model, final_dir, std::nullopt, 0, tokenizer_dir);
    log_info("wrote {} after {} steps", final_dir, step);
  }
  dist.barrier();
}

}  // namespace aligner
