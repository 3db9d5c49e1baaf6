#include "algo/ppo.h"

#include <chrono>
#include <cmath>
#include <memory>
#include <optional>

#include "algo/data_stream.h"
#include "algo/rollout.h"
#include "core/error.h"
#include "core/log.h"
#include "data/packing.h"
#include "gen/generation_config.h"
#include "io/hf_checkpoint.h"
#include "train/run_setup.h"
#include "train/trainer.h"

namespace aligner {

at::Tensor token_rewards(const at::Tensor& scores, const at::Tensor& kl, const at::Tensor& mask,
                         double kl_coef) {
  const int64_t T = mask.size(1);
  auto rewards = -kl_coef * kl * mask;
  // The last response token: the highest masked position of each row.
  const auto positions = at::arange(T, mask.options().dtype(at::kLong));
  const auto last = (positions * (mask > 0).to(at::kLong)).argmax(1);
  const auto rows = at::arange(mask.size(0), last.options());
  return rewards.index_put({rows, last}, rewards.index({rows, last}) + scores.to(rewards.scalar_type()));
}

Gae gae(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask, double gamma,
        double lambda) {
  // A few hundred steps over [N] columns: cheap, and exact to follow on the CPU in double.
  const auto r = rewards.to(at::kCPU, at::kDouble).contiguous(),
             v = values.to(at::kCPU, at::kDouble).contiguous();
  const auto m = mask.to(at::kCPU, at::kDouble).contiguous();
  const int64_t N = r.size(0), T = r.size(1);
  auto adv = at::zeros({N, T}, r.options());
  auto ra = r.accessor<double, 2>(), va = v.accessor<double, 2>(), ma = m.accessor<double, 2>();
  auto aa = adv.accessor<double, 2>();
  for (int64_t n = 0; n < N; ++n) {
    double next_value = 0, next_adv = 0;  // after the last response token: the episode has ended
    for (int64_t t = T - 1; t >= 0; --t) {
      if (ma[n][t] == 0) continue;
      const double delta = ra[n][t] + gamma * next_value - va[n][t];
      next_adv = delta + gamma * lambda * next_adv;
      aa[n][t] = next_adv;
      next_value = va[n][t];
    }
  }
  const auto advantages = adv.to(values.device(), values.scalar_type());
  return {advantages, (advantages + values) * mask};
}

at::Tensor whiten(const at::Tensor& x, const at::Tensor& mask, double mean, double var) {
  return (x - mean) * (1.0 / std::sqrt(var + 1e-8)) * mask;
}

at::Tensor ppo_actor_loss(const at::Tensor& logprobs, const at::Tensor& old_logprobs,
                          const at::Tensor& advantages, const at::Tensor& mask, double clip_eps) {
  const auto ratio = at::exp((logprobs - old_logprobs) * mask);
  const auto unclipped = -advantages * ratio;
  const auto clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps);
  return at::maximum(unclipped, clipped) * mask;
}

at::Tensor ppo_critic_loss(const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns,
                           const at::Tensor& mask, double value_clip) {
  const auto clipped = old_values + (values - old_values).clamp(-value_clip, value_clip);
  return 0.5 * at::maximum((values - returns).pow(2), (clipped - returns).pow(2)) * mask;
}

double adapt_kl_coef(double coef, double kl, double target, double horizon, int64_t sequences) {
  const double error = std::clamp(kl / target - 1, -0.2, 0.2);
  return coef * (1 + error * double(sequences) / horizon);
}

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// Sums over ranks, in one collective.
std::vector<double> sum_over_ranks(dist::Dist& dist, std::vector<double> values) {
  if (dist.world_size() == 1) return values;
  std::vector<at::Tensor> ts{at::tensor(values, at::TensorOptions().dtype(at::kDouble)).to(dist.device())};
  dist.all_reduce_sum(ts);
  const auto cpu = ts[0].cpu();
  return std::vector<double>(cpu.data_ptr<double>(), cpu.data_ptr<double>() + cpu.numel());
}

// A seed for one rank's draws at one step: the same on a resumed run, different across steps.
uint64_t mix_seed(uint64_t seed, int64_t step, int64_t rank, int64_t salt) {
  uint64_t h = seed ^ 0x9e3779b97f4a7c15ULL;
  for (uint64_t v : {uint64_t(step), uint64_t(rank), uint64_t(salt)}) {
    h ^= v + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
    h *= 0xff51afd7ed558ccdULL;
  }
  return h >> 1;  // a config int is signed
}

struct PpoOptions {
  int64_t prompts_per_step = 0, samples_per_prompt = 1, epochs = 1, minibatches = 1;
  double kl_coef = 0.01, target_kl = 0, kl_horizon = 10000, gamma = 1, lambda = 0.95;
  double clip_eps = 0.2, value_clip = 0.2, entropy_coef = 0;
  bool absolute_kl = true, whiten = true, mask_unfinished = true, sampler_logprobs = false;
  bool offload_optimizer = false, val_greedy = true;
  int64_t critic_warmup_steps = 0;
};

PpoOptions read_ppo_options(const Config& cfg) {
  PpoOptions o;
  o.prompts_per_step = cfg.get_int("rollout.prompts_per_step");
  o.samples_per_prompt = cfg.get_int("rollout.samples_per_prompt");
  o.sampler_logprobs = cfg.get_bool("rollout.sampler_logprobs");
  o.val_greedy = cfg.get_bool("rollout.val_greedy");
  o.epochs = cfg.get_int("ppo.epochs");
  o.minibatches = cfg.get_int("ppo.minibatches");
  o.kl_coef = cfg.get_float("ppo.kl_coef");
  o.absolute_kl = cfg.get_bool("ppo.absolute_kl");
  o.target_kl = cfg.get_float("ppo.target_kl");
  o.kl_horizon = double(cfg.get_int("ppo.kl_horizon"));
  o.gamma = cfg.get_float("ppo.gamma");
  o.lambda = cfg.get_float("ppo.lambda");
  o.whiten = cfg.get_bool("ppo.whiten_advantages");
  o.clip_eps = cfg.get_float("ppo.clip_eps");
  o.value_clip = cfg.get_float("ppo.value_clip");
  o.entropy_coef = cfg.get_float("ppo.entropy_coef");
  o.mask_unfinished = cfg.get_bool("ppo.mask_unfinished");
  o.critic_warmup_steps = cfg.get_int("ppo.critic_warmup_steps");
  o.offload_optimizer = cfg.get_bool("ppo.offload_optimizer_during_generation");
  for (const char* key :
       {"rollout.prompts_per_step", "rollout.samples_per_prompt", "ppo.epochs", "ppo.minibatches"})
    if (cfg.get_int(key) < 1) fail("config key '{}' must be at least 1, got {}", key, cfg.get_int(key));
  if (o.critic_warmup_steps < 0)
    fail("config key 'ppo.critic_warmup_steps' must not be negative, got {}", o.critic_warmup_steps);
  for (const char* key : {"ppo.kl_coef", "ppo.target_kl", "ppo.entropy_coef"})
    if (!(cfg.get_float(key) >= 0))
      fail("config key '{}' must not be negative, got {}", key, cfg.get_float(key));
  for (const char* key : {"ppo.gamma", "ppo.lambda"})
    if (!(cfg.get_float(key) >= 0 && cfg.get_float(key) <= 1))
      fail("config key '{}' must be in [0, 1], got {}", key, cfg.get_float(key));
  for (const char* key : {"ppo.clip_eps", "ppo.value_clip"})
    if (!(cfg.get_float(key) > 0)) fail("config key '{}' must be positive, got {}", key, cfg.get_float(key));
  if (o.kl_horizon < 1) fail("config key 'ppo.kl_horizon' must be at least 1, got {}", o.kl_horizon);
  return o;
}

// The rollout's per-token tensors, [N, T] on the actor's device: what the updates read.
struct RolloutTensors {
  at::Tensor old_logprobs, old_values, advantages, returns;
  at::Tensor response_mask, actor_mask;  // actor_mask: response tokens of responses the actor learns from
};

class Ppo final : public Algorithm {
 public:
  Ppo(const Config& cfg, const PpoOptions& o, const GenerationOptions& gen, const Tokenizer& tok,
      Transformer& actor, Transformer& critic, Reference& reference, Reward& reward, dist::Dist& dist)
      : tok_(tok),
        actor_(actor),
        critic_(critic),
        reference_(reference),
        reward_(reward),
        dist_(dist),
        o_(o),
        gen_(gen) {
    kl_coef_ = o_.kl_coef;
    gen_.tokenizer = &tok;
    check_generation_options(gen_);
    seed_ = uint64_t(cfg.get_int("trainer.seed"));
    micro_batch_size_ = cfg.get_int("trainer.micro_batch_size");
    checkpoint_layers_ = cfg.get_bool("model.activation_checkpointing");
    pad_id_ = pad_id_for(tok);
    const int world = dist.world_size();
    if (o_.prompts_per_step % world != 0)
      fail("config key 'rollout.prompts_per_step' ({}) must be a multiple of the {} ranks",
           o_.prompts_per_step, world);
    const int64_t sequences = o_.prompts_per_step / world * o_.samples_per_prompt;
    if (sequences % (o_.minibatches * micro_batch_size_) != 0)
      fail(
          "a rank's {} responses per step (rollout.prompts_per_step / ranks x rollout.samples_per_prompt) "
          "must "
          "split into ppo.minibatches ({}) of whole micro-batches (trainer.micro_batch_size {})",
          sequences, o_.minibatches, micro_batch_size_);
    train_ = std::make_unique<PromptDataset>(
        open_rollout_prompts(cfg, "data.train", tok, actor.cfg, gen_.max_new_tokens));
    if (!cfg.get_string("data.validation").empty())
      val_ = std::make_unique<PromptDataset>(
          open_rollout_prompts(cfg, "data.validation", tok, actor.cfg, gen_.max_new_tokens));
    sampler_ = make_sampler(dataset_size(*train_), dist.rank(), world, cfg.get_bool("data.shuffle"), seed_);
    max_epochs_ = data_epochs(cfg);
  }

  // The trainer's global batch: one update's responses on all ranks.
  int64_t update_batch_size() const { return o_.prompts_per_step * o_.samples_per_prompt / o_.minibatches; }

  int64_t train_examples() const override { return dataset_size(*train_); }
  StepExamples examples_per_step(int64_t) const override {
    return {o_.prompts_per_step, "rollout.prompts_per_step"};
  }
  int64_t updates_per_step() const override { return o_.epochs * o_.minibatches; }
  bool offload_optimizer_in_next_step() const override { return o_.offload_optimizer; }

  bool next_step(int64_t n) override {
    const auto prompts = next_examples(sampler_, max_epochs_, o_.prompts_per_step / dist_.world_size(),
                                       [&](int64_t i) { return prompt_example(*train_, i); });
    if (prompts.empty()) return false;
    GenerationOptions g = gen_;
    g.seed = mix_seed(gen_.seed, step_, dist_.rank(), 0);
    rollout_ = make_rollout(actor_, examples_of(prompts), g, tok_, reward_, pad_id_);
    const auto& b = rollout_.batch;
    const int64_t N = b.input_ids.size(0);
    if (N * o_.epochs != n * micro_batch_size_)
      fail("PPO: the rollout has {} responses, the step expects {}", N, n * micro_batch_size_ / o_.epochs);
    plan_updates(N);

    // Old log-probs, values and the reference's log-probs, batched as the first epoch's micro-batches
    // so that the first update's forward repeats these exactly (its ratio is 1 to the bit).
    const auto t0 = Clock::now();
    auto zeros = [&] { return at::zeros(b.labels.sizes(), b.response_mask.options()); };
    auto old_logprobs = zeros(), ref_logprobs = zeros(), values = zeros();
    const int64_t first_epoch = o_.minibatches * (int64_t(micro_rows_.size()) / updates_per_step());
    {
      at::NoGradGuard no_grad;
      for (int64_t i = 0; i < first_epoch; ++i) {
        const auto rows = rows_tensor(i);
        const auto in = gather_rows(rows);
        const int64_t T = in.input_ids.size(1);
        const auto labels = b.labels.index_select(0, rows).narrow(1, 0, T);
        const auto lp = o_.sampler_logprobs ? b.logprobs.index_select(0, rows).narrow(1, 0, T)
                                            : labelled_logprobs(actor_, in, labels, false).logprobs;
        old_logprobs.narrow(1, 0, T).index_copy_(0, rows, lp.to(at::kFloat));
        values.narrow(1, 0, T).index_copy_(0, rows, token_values(critic_, in).to(at::kFloat));
      }
      reference_.with_model(actor_, [&](const Transformer& ref) {
        for (int64_t i = 0; i < first_epoch; ++i) {
          const auto rows = rows_tensor(i);
          const auto in = gather_rows(rows);
          const auto labels = b.labels.index_select(0, rows).narrow(1, 0, in.input_ids.size(1));
          ref_logprobs.narrow(1, 0, in.input_ids.size(1))
              .index_copy_(0, rows, labelled_logprobs(ref, in, labels, false).logprobs.to(at::kFloat));
        }
      });
    }
    const double inference_seconds = seconds_since(t0) + rollout_.reward_seconds;

    // Rewards, advantages and the rollout's statistics over every rank.
    const auto& mask = b.response_mask;
    const auto kl = (old_logprobs - ref_logprobs) * mask;
    const auto scores = at::tensor(rollout_.scores, at::TensorOptions().dtype(at::kDouble)).to(mask.device());
    const auto rewards = token_rewards(scores, o_.absolute_kl ? kl.abs() : kl, mask, kl_coef_);
    auto [advantages, returns] = gae(rewards, values, mask, o_.gamma, o_.lambda);
    const std::vector<float> ended(rollout_.ended.begin(), rollout_.ended.end());
    const auto ended_t = at::tensor(ended).to(mask.device());
    const auto residual = (returns - values) * mask;
    double len_sum = 0;
    for (auto l : rollout_.response_length) len_sum += double(l);
    const double peak_gb = peak_memory_gb(actor_.embed.device());
    // sequences, score, score^2, kl per sequence, length, ended, tokens, adv, adv^2, ret, ret^2,
    // residual, residual^2, generated tokens
    const auto g_sums =
        sum_over_ranks(dist_, {double(N), scores.sum().item<double>(), scores.pow(2).sum().item<double>(),
                               kl.sum().item<double>(), len_sum, ended_t.sum().item<double>(),
                               mask.sum().item<double>(), advantages.sum().item<double>(),
                               advantages.pow(2).sum().item<double>(), returns.sum().item<double>(),
                               returns.pow(2).sum().item<double>(), residual.sum().item<double>(),
                               residual.pow(2).sum().item<double>(), double(rollout_.generated_tokens)});
    const double seqs = g_sums[0], tokens = std::max(g_sums[6], 1.0);
    auto var = [&](double sum, double sq, double count) {
      return std::max(sq / count - (sum / count) * (sum / count), 0.0);
    };
    const double adv_mean = g_sums[7] / tokens, adv_var = var(g_sums[7], g_sums[8], tokens);
    const double ret_var = var(g_sums[9], g_sums[10], tokens), res_var = var(g_sums[11], g_sums[12], tokens);
    rollout_kl_ = g_sums[3] / seqs;
    rollout_sequences_ = int64_t(seqs);

    t_.old_logprobs = old_logprobs;
    t_.old_values = values;
    t_.returns = returns.to(at::kFloat);
    t_.advantages = (o_.whiten ? whiten(advantages, mask, adv_mean, adv_var) : advantages).to(at::kFloat);
    t_.response_mask = mask;
    t_.actor_mask = o_.mask_unfinished ? mask * ended_t.unsqueeze(1) : mask;

    // The step's metrics, the same on every rank: reported once per rank (count 1).
    step_metrics_ = {
        {"reward_mean", g_sums[1] / seqs},
        {"reward_std", std::sqrt(var(g_sums[1], g_sums[2], seqs))},
        {"kl", rollout_kl_},
        {"kl_coef", kl_coef_},
        {"response_length", g_sums[4] / seqs},
        {"ended_fraction", g_sums[5] / seqs},
        {"advantage_mean", adv_mean},
        {"explained_variance", ret_var > 0 ? 1 - res_var / ret_var : 0.0},
    };
    // Per rank, averaged over the ranks.
    rank_metrics_ = {
        {"time_generation", rollout_.generation_seconds},
        {"time_inference", inference_seconds},
        {"time_reward", rollout_.reward_seconds},
        {"gen_tokens_per_s", double(rollout_.generated_tokens) / std::max(rollout_.generation_seconds, 1e-9)},
        {"peak_memory_gb", peak_gb}};

    // Tokens the actor and the critic learn from in each update, over every rank, for the means.
    std::vector<double> counts(2 * updates_per_step(), 0.0);
    for (size_t i = 0; i < micro_rows_.size(); ++i) {
      const int64_t u = int64_t(i) / (int64_t(micro_rows_.size()) / updates_per_step());
      const auto rows = rows_tensor(int64_t(i));
      counts[2 * u] += t_.actor_mask.index_select(0, rows).sum().item<double>();
      counts[2 * u + 1] += t_.response_mask.index_select(0, rows).sum().item<double>();
    }
    update_counts_ = sum_over_ranks(dist_, counts);
    return true;
  }

  double units(int64_t i) const override {
    return t_.response_mask.index_select(0, rows_tensor(i)).sum().item<double>();
  }

  LossSums loss(int64_t i) override {
    const auto rows = rows_tensor(i);
    auto in = gather_rows(rows);
    in.checkpoint_layers = checkpoint_layers_;
    const int64_t T = in.input_ids.size(1);
    auto take = [&](const at::Tensor& t) { return t.index_select(0, rows).narrow(1, 0, T); };
    const auto labels = take(rollout_.batch.labels);
    const auto actor_mask = take(t_.actor_mask), mask = take(t_.response_mask);
    const auto old_logprobs = take(t_.old_logprobs), advantages = take(t_.advantages);

    const auto lp = labelled_logprobs(actor_, in, labels, true);
    const auto actor_tokens = ppo_actor_loss(lp.logprobs, old_logprobs, advantages, actor_mask, o_.clip_eps);
    auto actor_sum = actor_tokens.sum();
    if (o_.entropy_coef > 0) actor_sum = actor_sum - o_.entropy_coef * (lp.entropy * actor_mask).sum();
    const auto values = token_values(critic_, in);
    const auto critic_sum =
        ppo_critic_loss(values, take(t_.old_values), take(t_.returns), mask, o_.value_clip).sum();

    // The trainer divides by the update's response tokens (the critic's mean); the actor's sum is
    // rescaled so that it becomes a mean over the tokens it learns from. During the critic's warm-up
    // the actor's gradient is zero (and so is its AdamW update: no moments yet, no weight decay).
    const int64_t u = i / (int64_t(micro_rows_.size()) / updates_per_step());
    const double actor_tokens_all = update_counts_[2 * u], critic_tokens_all = update_counts_[2 * u + 1];
    const bool warmup = step_ < o_.critic_warmup_steps;
    const double actor_scale = warmup || actor_tokens_all == 0 ? 0.0 : critic_tokens_all / actor_tokens_all;
    LossSums out;
    out.loss = actor_sum * actor_scale + critic_sum;
    out.units = mask.sum().item<double>();
    out.tokens = in.attention_mask.sum().item<int64_t>();

    at::NoGradGuard no_grad;
    const double n_actor = actor_mask.sum().item<double>();
    const auto log_ratio = (lp.logprobs.detach() - old_logprobs) * actor_mask;
    const auto ratio = log_ratio.exp();
    const auto clipped = ((ratio - 1).abs() > o_.clip_eps).to(at::kFloat) * actor_mask;
    // k3 estimator of KL(old || new) (Schulman): unbiased and never negative.
    const auto approx_kl = ((ratio - 1) - log_ratio) * actor_mask;
    out.metrics = {
        {"actor_loss", actor_tokens.detach().sum().item<double>(), n_actor},
        {"value_loss", critic_sum.detach().item<double>(), out.units},
        {"entropy", (lp.entropy.detach() * mask).sum().item<double>(), out.units},
        {"clip_fraction", clipped.sum().item<double>(), n_actor},
        {"approx_kl", approx_kl.sum().item<double>(), n_actor},
        {"ratio_max", i == 0 ? (ratio * actor_mask + (1 - actor_mask)).max().item<double>() : 0.0,
         i == 0 ? 1.0 : 0.0},
    };
    // The rollout's numbers, once per rank per step.
    for (const auto& [name, value] : step_metrics_)
      out.metrics.push_back({name, i == 0 ? value : 0.0, i == 0 ? 1.0 : 0.0});
    for (const auto& [name, value] : rank_metrics_)
      out.metrics.push_back({name, i == 0 ? value : 0.0, i == 0 ? 1.0 : 0.0});
    return out;
  }

  void after_optimizer_step(int64_t step) override {
    step_ = step;
    if (o_.target_kl > 0)
      kl_coef_ = adapt_kl_coef(kl_coef_, rollout_kl_, o_.target_kl, o_.kl_horizon, rollout_sequences_);
  }

  // The mean reward (and KL to the reference, response length, ended share) on this rank's share
  // of the held-out prompts, greedy by default so that validations compare like with like.
  ValidationSums validate() override {
    ValidationSums out;
    out.metric_names = {"reward", "kl", "response_length", "ended_fraction"};
    if (!val_) return out;
    std::vector<PromptExample> prompts;
    for (const auto& batch :
         validation_batches(dataset_size(*val_), micro_batch_size_, dist_.rank(), dist_.world_size(),
                            [&](int64_t i) { return prompt_example(*val_, i); }))
      for (auto& p : batch) prompts.push_back(std::move(p.example));
    if (prompts.empty()) return out;
    GenerationOptions g = gen_;
    g.num_samples = 1;
    g.sampling.greedy = o_.val_greedy || g.sampling.greedy;
    g.seed = mix_seed(gen_.seed, -1, dist_.rank(), 1);
    const Rollout r = make_rollout(actor_, prompts, g, tok_, reward_, pad_id_);
    const int64_t N = r.batch.input_ids.size(0);
    std::vector<at::Tensor> policy_lp, ref_lp;
    for (int64_t s = 0; s < N; s += micro_batch_size_) {
      const int64_t n = std::min(micro_batch_size_, N - s);
      policy_lp.push_back(labelled_logprobs(actor_, rollout_rows(r.batch, s, n),
                                            rollout_slice(r.batch.labels, r.batch, s, n), false)
                              .logprobs.sum(1));
    }
    reference_.with_model(actor_, [&](const Transformer& ref) {
      for (int64_t s = 0; s < N; s += micro_batch_size_) {
        const int64_t n = std::min(micro_batch_size_, N - s);
        ref_lp.push_back(labelled_logprobs(ref, rollout_rows(r.batch, s, n),
                                           rollout_slice(r.batch.labels, r.batch, s, n), false)
                             .logprobs.sum(1));
      }
    });
    const auto kl = (at::cat(policy_lp) - at::cat(ref_lp)).to(at::kDouble).cpu();
    double reward = 0, length = 0, ended = 0;
    for (int64_t k = 0; k < N; ++k) {
      reward += r.scores[size_t(k)];
      length += double(r.response_length[size_t(k)]);
      ended += r.ended[size_t(k)];
    }
    LossSums part;
    part.units = double(N);
    part.metrics = {{"reward", reward, double(N)},
                    {"kl", kl.sum().item<double>(), double(N)},
                    {"response_length", length, double(N)},
                    {"ended_fraction", ended, double(N)}};
    out.parts.push_back(std::move(part));
    return out;
  }

  nlohmann::json state() const override {
    return {{"position", sampler_.position}, {"step", step_}, {"kl_coef", kl_coef_}};
  }
  void load_state(const nlohmann::json& s) override {
    sampler_.position = s.at("position").get<int64_t>();
    step_ = s.at("step").get<int64_t>();
    kl_coef_ = s.at("kl_coef").get<double>();
  }

 private:
  // Each epoch visits the rollout's responses in a new order, cut into minibatches (one update
  // each) of whole micro-batches.
  void plan_updates(int64_t N) {
    micro_rows_.clear();
    for (int64_t e = 0; e < o_.epochs; ++e) {
      auto gen = make_generator(at::kCPU, mix_seed(seed_, step_, dist_.rank(), 2 + e));
      const auto order = at::randperm(N, gen, at::TensorOptions().dtype(at::kLong));
      for (int64_t s = 0; s < N; s += micro_batch_size_)
        micro_rows_.push_back(order.narrow(0, s, micro_batch_size_));
    }
  }

  at::Tensor rows_tensor(int64_t i) const {
    return micro_rows_.at(size_t(i)).to(rollout_.batch.input_ids.device());
  }

  // The rows' sequences, cut to the longest of them.
  ForwardInput gather_rows(const at::Tensor& rows) const {
    const auto& b = rollout_.batch;
    const int64_t T = b.attention_mask.index_select(0, rows).sum(1).max().item<int64_t>();
    auto take = [&](const at::Tensor& t) { return t.index_select(0, rows).narrow(1, 0, T); };
    return ForwardInput{take(b.input_ids), take(b.attention_mask), take(b.position_ids)};
  }

  const Tokenizer& tok_;
  Transformer& actor_;
  Transformer& critic_;
  Reference& reference_;
  Reward& reward_;
  dist::Dist& dist_;
  PpoOptions o_;
  GenerationOptions gen_;
  double kl_coef_ = 0.01;
  uint64_t seed_ = 0;
  int64_t micro_batch_size_ = 1, max_epochs_ = 1, step_ = 0;
  bool checkpoint_layers_ = false;
  int32_t pad_id_ = 0;
  std::unique_ptr<PromptDataset> train_, val_;
  Sampler sampler_;

  Rollout rollout_;
  RolloutTensors t_;
  std::vector<at::Tensor> micro_rows_;  // per micro-batch of the step: its rows of the rollout (CPU)
  std::vector<double> update_counts_;   // per update: actor tokens, response tokens (all ranks)
  std::vector<std::pair<std::string, double>> step_metrics_, rank_metrics_;
  double rollout_kl_ = 0;
  int64_t rollout_sequences_ = 0;
};

std::vector<double> float_list(const Config& cfg, const std::string& key) {
  std::vector<double> out;
  for (const auto& s : cfg.get_string_list(key)) {
    size_t used = 0;
    double v = 0;
    try {
      v = std::stod(s, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used == 0 || used != s.size()) fail("config key '{}' expects a list of numbers, got '{}'", key, s);
    out.push_back(v);
  }
  return out;
}

// The critic: a reward model's transformer with its score head as the value head (a regression
// model's outputs combined with reward.attribute_weights), or a causal LM with a new value head.
Transformer load_critic(const std::string& dir, at::Device device, at::ScalarType dtype, int32_t pad_id,
                        const std::vector<double>& weights, uint64_t seed) {
  const ModelConfig c = load_model_config((std::filesystem::path(dir) / "config.json").string());
  if (c.num_labels <= 1) return load_reward_model(dir, device, dtype, {"value"}, pad_id, seed);
  if (int64_t(weights.size()) != c.num_labels)
    fail(
        "critic.path {} has {} outputs ({}): set reward.attribute_weights to one weight each to make its "
        "value head",
        dir, c.num_labels, fmt::join(c.labels, ", "));
  Transformer m = load_transformer(dir, device, dtype);
  at::NoGradGuard no_grad;
  const auto w = at::tensor(weights, at::TensorOptions().dtype(at::kDouble)).unsqueeze(0);
  const auto head = at::matmul(w, m.score.weight.to(at::kDouble)).to(m.score.weight.scalar_type());
  m.score.weight = head.contiguous();
  m.cfg = sequence_classifier_config(m.cfg, {"value"}, pad_id);
  return m;
}

}  // namespace

void run_ppo(const Config& cfg) {
  auto opt = read_trainer_options(cfg);
  const auto actor_optim = read_optimizer_settings(cfg, "actor.optim", "trainer.grad_clip");
  const auto critic_optim = read_optimizer_settings(cfg, "critic.optim", "trainer.grad_clip");
  const std::string actor_dir = cfg.get_string("actor.path"), reward_dir = cfg.get_string("reward.model"),
                    reward_url = cfg.get_string("reward.url");
  if (actor_dir.empty()) fail("config key 'actor.path' must be set");
  if (reward_dir.empty() == reward_url.empty())
    fail(
        "set one of the config keys 'reward.model' (a reward-model folder) and 'reward.url' (aligner "
        "serve-reward)");
  const std::string critic_dir =
      cfg.get_string("critic.path").empty() ? reward_dir : cfg.get_string("critic.path");
  if (critic_dir.empty())
    fail(
        "config key 'critic.path' must be set when the reward is served (reward.url): the critic starts from "
        "a "
        "reward-model or causal LM folder");
  const auto weights = float_list(cfg, "reward.attribute_weights");
  // Every key is checked before the models load.
  const auto ppo = read_ppo_options(cfg);
  const auto gen = read_generation_options(cfg, "rollout.max_new_tokens", "rollout.samples_per_prompt");
  const std::string offload = cfg.get_string("reference.offload");
  if (offload != "auto" && offload != "true" && offload != "false")
    fail("config key 'reference.offload' expects auto, true or false, got '{}'", offload);

  auto ctx = init_run(cfg);
  const auto dtype = parse_compute_dtype(cfg.get_string("model.dtype"), ctx.device, "model.dtype");
  Transformer actor = load_transformer(actor_dir, ctx.device, dtype);
  if (actor.cfg.num_labels > 0)
    fail("actor.path {} is a reward model (a sequence classifier), not a causal LM", actor_dir);
  auto tok = load_tokenizer(actor_dir);
  if (tok->vocab_size() > actor.cfg.vocab_size)
    fail("{}: the tokenizer has {} tokens but the model's vocabulary is {}", actor_dir, tok->vocab_size(),
         actor.cfg.vocab_size);
  Transformer critic = load_critic(critic_dir, ctx.device, dtype, pad_id_for(*tok), weights,
                                   uint64_t(cfg.get_int("trainer.seed")));
  if (critic.cfg.vocab_size < tok->vocab_size())
    fail("critic.path {}: its vocabulary ({}) is smaller than the actor's tokenizer ({})", critic_dir,
         critic.cfg.vocab_size, tok->vocab_size());

  std::unique_ptr<Reward> reward;
  if (!reward_dir.empty()) {
    RewardModelOptions ro;
    ro.path = reward_dir;
    ro.device = ctx.device;
    ro.dtype = dtype;
    ro.attribute_weights = weights;
    ro.batch_size = cfg.get_int("reward.batch_size");
    reward = load_model_reward(ro, *tok);
  } else {
    reward = connect_reward_server(reward_url, *tok, cfg.get_float("reward.timeout"));
  }
  Reference reference(actor, offload == "true" || (offload == "auto" && ctx.device.is_cuda()));

  Ppo algo(cfg, ppo, gen, *tok, actor, critic, reference, *reward, ctx.dist);
  opt.global_batch_size = algo.update_batch_size();
  auto actor_module = whole_model(actor, actor_optim, actor_dir, "actor");
  auto critic_module = whole_model(critic, critic_optim, critic_dir, "critic");
  train(cfg, opt, {actor_module, critic_module}, algo, ctx.dist);
}

}  // namespace aligner
