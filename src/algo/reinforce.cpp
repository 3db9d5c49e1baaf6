#include "algo/reinforce.h"

#include <chrono>
#include <cmath>
#include <memory>

#include "algo/rollout.h"
#include "core/error.h"
#include "core/log.h"
#include "data/packing.h"
#include "gen/generation_config.h"
#include "io/hf_checkpoint.h"
#include "train/run_setup.h"
#include "train/trainer.h"

namespace aligner {

at::Tensor rloo_advantages(const at::Tensor& rewards, const at::Tensor& ended, int64_t group) {
  const auto r = rewards.to(at::kDouble).view({-1, group}), m = ended.to(at::kDouble).view({-1, group});
  const auto count = m.sum(1, true), sum = (r * m).sum(1, true);
  const auto baseline = (sum - r * m) / (count - 1).clamp_min(1);
  // Fewer than two ended responses: the baseline is the reward itself, as in NeMo-Aligner.
  return at::where(count > 1, r - baseline, at::zeros_like(r)).view({-1});
}

at::Tensor group_advantages(const at::Tensor& rewards, int64_t group, bool scale_by_std) {
  const auto r = rewards.to(at::kDouble).view({-1, group});
  auto a = r - r.mean(1, true);
  if (scale_by_std) a = a / (r.std(1, /*unbiased=*/true, true) + 1e-4);
  return a.view({-1});
}

double overlong_penalty(int64_t length, int64_t max_new_tokens, int64_t buffer, double factor) {
  const int64_t start = max_new_tokens - buffer;
  if (buffer <= 0 || length <= start) return 0.0;
  return -factor * double(std::min(length, max_new_tokens) - start) / double(buffer);
}

at::Tensor k3_kl(const at::Tensor& logprobs, const at::Tensor& ref_logprobs) {
  const auto d = ref_logprobs - logprobs;
  return at::exp(d) - d - 1;
}

at::Tensor reinforce_token_loss(const at::Tensor& logprobs, const at::Tensor& old_logprobs,
                                const at::Tensor& advantages, const at::Tensor& mask, bool clipped,
                                double eps_low, double eps_high) {
  if (!clipped) return -logprobs * advantages * mask;
  const auto ratio = at::exp((logprobs - old_logprobs) * mask);
  return at::maximum(-advantages * ratio, -advantages * ratio.clamp(1 - eps_low, 1 + eps_high)) * mask;
}

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

enum class Estimator { kRloo, kGrpo, kDrGrpo };
// What the per-token losses are averaged over: all tokens of the update (token), each response's
// mean then the responses (sequence), or responses x max_new_tokens (constant, Dr. GRPO).
enum class Aggregation { kToken, kSequence, kConstant };

struct Options {
  Estimator estimator = Estimator::kRloo;
  Aggregation aggregation = Aggregation::kToken;
  int64_t prompts_per_step = 0, samples_per_prompt = 4, epochs = 1, minibatches = 1;
  double kl_coef = 0.01, clip_eps = 0.2, clip_eps_high = 0.2;
  bool absolute_kl = true, mask_unfinished = true, sampler_logprobs = false;
  bool dynamic_sampling = false;
  int64_t max_sampling_rounds = 4, overlong_buffer = 0;
  double overlong_factor = 1.0;
};

Options read_options(const Config& cfg) {
  Options o;
  const std::string estimator = cfg.get_string("reinforce.advantage");
  if (estimator == "rloo")
    o.estimator = Estimator::kRloo;
  else if (estimator == "grpo")
    o.estimator = Estimator::kGrpo;
  else if (estimator == "dr_grpo")
    o.estimator = Estimator::kDrGrpo;
  else
    fail("config key 'reinforce.advantage' expects rloo, grpo or dr_grpo, got '{}'", estimator);
  const std::string aggregation = cfg.get_string("reinforce.loss_aggregation");
  if (aggregation == "auto")
    o.aggregation = o.estimator == Estimator::kDrGrpo ? Aggregation::kConstant
                    : o.estimator == Estimator::kGrpo ? Aggregation::kSequence
                                                      : Aggregation::kToken;
  else if (aggregation == "token")
    o.aggregation = Aggregation::kToken;
  else if (aggregation == "sequence")
    o.aggregation = Aggregation::kSequence;
  else if (aggregation == "constant")
    o.aggregation = Aggregation::kConstant;
  else
    fail("config key 'reinforce.loss_aggregation' expects auto, token, sequence or constant, got '{}'",
         aggregation);
  o.prompts_per_step = cfg.get_int("rollout.prompts_per_step");
  o.samples_per_prompt = cfg.get_int("rollout.samples_per_prompt");
  o.sampler_logprobs = cfg.get_bool("rollout.sampler_logprobs");
  o.epochs = cfg.get_int("reinforce.epochs");
  o.minibatches = cfg.get_int("reinforce.minibatches");
  o.kl_coef = cfg.get_float("reinforce.kl_coef");
  o.absolute_kl = cfg.get_bool("reinforce.absolute_kl");
  o.clip_eps = cfg.get_float("reinforce.clip_eps");
  o.clip_eps_high = cfg.get_float("reinforce.clip_eps_high");
  if (o.clip_eps_high == 0) o.clip_eps_high = o.clip_eps;
  o.mask_unfinished = cfg.get_bool("reinforce.mask_unfinished");
  o.dynamic_sampling = cfg.get_bool("reinforce.dynamic_sampling");
  o.max_sampling_rounds = cfg.get_int("reinforce.max_sampling_rounds");
  o.overlong_buffer = cfg.get_int("reinforce.overlong_buffer");
  o.overlong_factor = cfg.get_float("reinforce.overlong_penalty");
  for (const char* key : {"rollout.prompts_per_step", "reinforce.epochs", "reinforce.minibatches",
                          "reinforce.max_sampling_rounds"})
    if (cfg.get_int(key) < 1) fail("config key '{}' must be at least 1, got {}", key, cfg.get_int(key));
  if (o.samples_per_prompt < 2)
    fail(
        "config key 'rollout.samples_per_prompt' must be at least 2 (a baseline needs other samples of the "
        "prompt), "
        "got {}",
        o.samples_per_prompt);
  for (const char* key : {"reinforce.kl_coef", "reinforce.clip_eps_high", "reinforce.overlong_penalty"})
    if (!(cfg.get_float(key) >= 0))
      fail("config key '{}' must not be negative, got {}", key, cfg.get_float(key));
  if (!(o.clip_eps > 0 && o.clip_eps < 1))
    fail("config key 'reinforce.clip_eps' must be in (0, 1), got {}", o.clip_eps);
  if (o.overlong_buffer < 0 || o.overlong_buffer >= cfg.get_int("rollout.max_new_tokens"))
    fail("config key 'reinforce.overlong_buffer' must be in [0, rollout.max_new_tokens), got {}",
         o.overlong_buffer);
  if (o.estimator == Estimator::kRloo && o.epochs * o.minibatches > 1)
    fail(
        "reinforce.advantage=rloo makes one update per rollout (its loss has no ratio to clip): set "
        "reinforce.epochs and reinforce.minibatches to 1, or use grpo");
  return o;
}

class Reinforce final : public OnlineAlgorithm {
 public:
  Reinforce(const Config& cfg, const Options& o, const GenerationOptions& gen, const Tokenizer& tok,
            Transformer& policy, Reference* reference, Reward& reward, dist::Dist& dist)
      : OnlineAlgorithm(
            cfg, gen,
            {o.samples_per_prompt, "rollout.samples_per_prompt", o.minibatches, "reinforce.minibatches"}, tok,
            policy, reward, reference, dist),
        o_(o) {}

  int64_t update_batch_size() const { return o_.prompts_per_step * o_.samples_per_prompt / o_.minibatches; }

  int64_t updates_per_step() const override { return o_.epochs * o_.minibatches; }

  bool next_step(int64_t n) override {
    GroupFilter filter;
    if (o_.dynamic_sampling) {
      // All rewards equal: every advantage is 0 and the group teaches nothing.
      filter.keep = [](const std::vector<double>& s) {
        return std::any_of(s.begin(), s.end(), [&](double v) { return v != s.front(); });
      };
      filter.more = [this] { return prompts_.next(); };
      filter.max_rounds = o_.max_sampling_rounds;
    }
    if (!next_rollout(o_.dynamic_sampling ? &filter : nullptr)) return false;
    const auto& b = rollout_.batch;
    const int64_t N = b.input_ids.size(0), S = o_.samples_per_prompt;
    if (N * o_.epochs != n * micro_batch_size_)
      fail("reinforce: the rollout has {} responses, the step expects {}", N,
           n * micro_batch_size_ / o_.epochs);
    micro_batches_ =
        plan_micro_batches(N, o_.epochs, micro_batch_size_, step_seed(seed_, step_, dist_.rank(), 2));
    const std::vector<at::Tensor> first_epoch(micro_batches_.begin(),
                                              micro_batches_.begin() + N / micro_batch_size_);
    const auto& mask = b.response_mask;

    // The passes that must see the policy as it generated: the reference always (KL), the policy's
    // old log-probs when rloo puts the KL into the reward or a later minibatch needs them (else
    // the first update's own forward gives them).
    const auto t0 = Clock::now();
    const bool kl = o_.kl_coef > 0 && reference_;
    old_from_first_update_ = false;
    if (o_.sampler_logprobs)
      old_logprobs_ = b.logprobs;
    else if ((o_.estimator == Estimator::kRloo && kl) || o_.minibatches > 1)
      old_logprobs_ = rollout_logprobs(policy_, b, first_epoch);
    else {
      old_logprobs_ = at::zeros(b.labels.sizes(), mask.options());
      old_from_first_update_ = true;
    }
    ref_logprobs_ = at::Tensor();
    if (kl)
      reference_->with_model(
          policy_, [&](const Transformer& ref) { ref_logprobs_ = rollout_logprobs(ref, b, first_epoch); });
    const double inference_seconds = seconds_since(t0) + rollout_.reward_seconds;

    // Rewards (with DAPO's overlong penalty), then advantages per group.
    std::vector<double> rewards = rollout_.scores;
    double penalty_sum = 0;
    for (int64_t k = 0; k < N; ++k) {
      const double p = overlong_penalty(rollout_.response_length[size_t(k)], gen_.max_new_tokens,
                                        o_.overlong_buffer, o_.overlong_factor);
      rewards[size_t(k)] += p;
      penalty_sum += p;
    }
    auto rewards_t = at::tensor(rewards, at::TensorOptions().dtype(at::kDouble));
    const std::vector<float> ended_f(rollout_.ended.begin(), rollout_.ended.end());
    const auto ended = at::tensor(ended_f).to(at::kDouble);
    at::Tensor kl_per_sequence;
    if (kl && !old_from_first_update_) {
      kl_per_sequence = ((old_logprobs_ - ref_logprobs_) * mask).sum(1).to(at::kCPU, at::kDouble);
      if (o_.estimator == Estimator::kRloo)
        rewards_t = rewards_t -
                    o_.kl_coef *
                        (o_.absolute_kl
                             ? ((old_logprobs_ - ref_logprobs_) * mask).abs().sum(1).to(at::kCPU, at::kDouble)
                             : kl_per_sequence);
    }
    // The baseline counts the responses the loss learns from.
    const auto counted = o_.mask_unfinished ? ended : at::ones_like(ended);
    const auto adv = o_.estimator == Estimator::kRloo
                         ? rloo_advantages(rewards_t, counted, S)
                         : group_advantages(rewards_t, S, o_.estimator == Estimator::kGrpo);
    advantages_ = adv.to(at::kFloat).to(mask.device()).unsqueeze(1).expand_as(mask).contiguous();
    actor_mask_ = o_.mask_unfinished ? mask * ended.to(at::kFloat).to(mask.device()).unsqueeze(1) : mask;

    step_metrics_ = rollout_metrics(dist_, rollout_, kl_per_sequence);
    const auto g =
        dist_.sum({double(N), adv.abs().sum().item<double>(), penalty_sum, double(rollout_.dropped_groups)});
    step_metrics_.push_back({"advantage_abs_mean", g[1] / g[0]});
    if (o_.overlong_buffer > 0) step_metrics_.push_back({"overlong_penalty", g[2] / g[0]});
    if (o_.dynamic_sampling) step_metrics_.push_back({"dropped_groups", g[3]});
    const auto per_rank = rank_metrics(rollout_, inference_seconds, policy_.embed.device());
    step_metrics_.insert(step_metrics_.end(), per_rank.begin(), per_rank.end());

    // Per update over every rank: tokens and responses the loss learns from, and in all.
    const int64_t per_update = int64_t(micro_batches_.size()) / updates_per_step();
    std::vector<double> counts(4 * updates_per_step(), 0.0);
    for (size_t i = 0; i < micro_batches_.size(); ++i) {
      const auto rows = micro_batches_[i].to(mask.device());
      const auto am = actor_mask_.index_select(0, rows);
      double* c = &counts[4 * (int64_t(i) / per_update)];
      c[0] += am.sum().item<double>();
      c[1] += mask.index_select(0, rows).sum().item<double>();
      c[2] += (am.sum(1) > 0).sum().item<double>();
      c[3] += double(rows.size(0));
    }
    update_counts_ = dist_.sum(counts);
    return true;
  }

  // What the trainer divides an update's loss by: its response tokens, its responses, or
  // responses x max_new_tokens. loss() rescales token and sequence sums from the masked counts to
  // these, so that responses left out make no difference and an update with none trains nothing.
  double units(int64_t i) const override {
    const auto rows = micro_batches_.at(size_t(i)).to(actor_mask_.device());
    switch (o_.aggregation) {
      case Aggregation::kToken:
        return rollout_.batch.response_mask.index_select(0, rows).sum().item<double>();
      case Aggregation::kSequence:
        return double(rows.size(0));
      default:
        return double(rows.size(0) * gen_.max_new_tokens);
    }
  }

  LossSums loss(int64_t i) override {
    const auto& rows = micro_batches_.at(size_t(i));
    auto in = gather_rows(rollout_.batch, rows);
    in.checkpointed_layers = checkpointed_layers_;
    auto take = [&](const at::Tensor& t) { return take_rows(t, rows, in); };
    const auto mask = take(actor_mask_), advantages = take(advantages_);
    const auto lp = labelled_logprobs(policy_, in, take(rollout_.batch.labels), true);
    const int64_t u = i / (int64_t(micro_batches_.size()) / updates_per_step());
    at::Tensor old = take(old_logprobs_);
    if (old_from_first_update_ && u == 0) {
      // One pass over the rollout in its first update: the weights are those that generated it.
      old = lp.logprobs.detach();
      old_logprobs_.narrow(1, 0, in.input_ids.size(1)).index_copy_(0, rows.to(old.device()), old);
    }
    const bool clipped = o_.estimator != Estimator::kRloo;
    auto tokens =
        reinforce_token_loss(lp.logprobs, old, advantages, mask, clipped, o_.clip_eps, o_.clip_eps_high);
    at::Tensor kl_tokens;
    if (ref_logprobs_.defined() && o_.estimator != Estimator::kRloo) {
      kl_tokens = k3_kl(lp.logprobs, take(ref_logprobs_)) * mask;
      tokens = tokens + o_.kl_coef * kl_tokens;
    }
    const double* c = &update_counts_[4 * u];
    LossSums out;
    switch (o_.aggregation) {
      case Aggregation::kToken:
        out.loss = tokens.sum() * (c[0] > 0 ? c[1] / c[0] : 0.0);
        break;
      case Aggregation::kSequence:
        out.loss = (tokens.sum(1) / mask.sum(1).clamp_min(1)).sum() * (c[2] > 0 ? c[3] / c[2] : 0.0);
        break;
      default:
        out.loss = tokens.sum();
    }
    out.units = units(i);
    out.tokens = in.attention_mask.sum().item<int64_t>();

    at::NoGradGuard no_grad;
    const double n_tokens = mask.sum().item<double>();
    const auto log_ratio = (lp.logprobs.detach() - old) * mask;
    const auto ratio = log_ratio.exp();
    const auto clip_hit = ((ratio < 1 - o_.clip_eps) | (ratio > 1 + o_.clip_eps_high)).to(at::kFloat) * mask;
    out.metrics = {
        {"pg_loss",
         (tokens - (kl_tokens.defined() ? o_.kl_coef * kl_tokens : at::zeros_like(tokens)))
             .sum()
             .item<double>(),
         n_tokens},
        {"entropy", (lp.entropy * mask).sum().item<double>(), n_tokens},
        {"clip_fraction", clipped ? clip_hit.sum().item<double>() : 0.0, clipped ? n_tokens : 0.0},
        {"approx_kl", ((ratio - 1) - log_ratio).mul(mask).sum().item<double>(), n_tokens},
        {"kl_k3", kl_tokens.defined() ? kl_tokens.sum().item<double>() : 0.0,
         kl_tokens.defined() ? n_tokens : 0.0},
    };
    // Without an old-log-prob pass the rollout's KL per response comes from the first update.
    if (old_from_first_update_ && ref_logprobs_.defined()) {
      const auto kl = (lp.logprobs.detach() - take(ref_logprobs_)) * take(rollout_.batch.response_mask);
      out.metrics.push_back(
          {"kl", u == 0 ? kl.sum().item<double>() : 0.0, u == 0 ? double(rows.size(0)) : 0.0});
    }
    add_step_metrics(out.metrics, step_metrics_, i);
    return out;
  }

 private:
  Options o_;
  bool old_from_first_update_ = false;

  at::Tensor old_logprobs_, ref_logprobs_, advantages_, actor_mask_;  // [N, T]
  std::vector<at::Tensor> micro_batches_;
  std::vector<double> update_counts_;  // per update: masked tokens, tokens, masked responses, responses
  NamedValues step_metrics_;
};

}  // namespace

void run_reinforce(const Config& cfg) {
  auto opt = read_trainer_options(cfg);
  const auto optim = read_optimizer_settings(cfg, "optim", "trainer.grad_clip");
  const std::string model_dir = cfg.get_string("model.path");
  if (model_dir.empty()) fail("config key 'model.path' must be set");
  const auto o = read_options(cfg);
  check_reward_config(cfg);
  const auto gen = read_generation_options(cfg, "rollout.max_new_tokens", "rollout.samples_per_prompt");
  const auto offload = read_reference_offload(cfg);

  auto ctx = init_run(cfg);
  const auto dtype = parse_compute_dtype(cfg.get_string("model.dtype"), ctx.device, "model.dtype");
  Policy loaded = load_policy(model_dir, "model.path", ctx.device, dtype);
  Transformer& policy = loaded.model;
  auto& tok = loaded.tok;
  auto module = trainable_model(policy, cfg, optim, model_dir);
  auto reward = make_reward(cfg, *tok, ctx.device, dtype);
  // No KL, no reference (DAPO drops it): no copy of the weights at all.
  std::unique_ptr<Reference> reference;
  if (o.kl_coef > 0) reference = std::make_unique<Reference>(policy, offload.value_or(ctx.device.is_cuda()));

  Reinforce algo(cfg, o, gen, *tok, policy, reference.get(), *reward, ctx.dist);
  opt.global_batch_size = algo.update_batch_size();
  train(cfg, opt, {module}, algo, ctx.dist);
}

}  // namespace aligner
