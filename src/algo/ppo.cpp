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

struct PpoOptions {
  int64_t prompts_per_step = 0, samples_per_prompt = 1, epochs = 1, minibatches = 1;
  double kl_coef = 0.01, target_kl = 0, kl_horizon = 10000, gamma = 1, lambda = 0.95;
  double clip_eps = 0.2, value_clip = 0.2, entropy_coef = 0;
  bool absolute_kl = true, whiten = true, mask_unfinished = true, sampler_logprobs = false;
  bool offload_optimizer = false;
  int64_t critic_warmup_steps = 0;
};

PpoOptions read_ppo_options(const Config& cfg) {
  PpoOptions o;
  o.prompts_per_step = cfg.get_int("rollout.prompts_per_step");
  o.samples_per_prompt = cfg.get_int("rollout.samples_per_prompt");
  o.sampler_logprobs = cfg.get_bool("rollout.sampler_logprobs");
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

class Ppo final : public OnlineAlgorithm {
 public:
  Ppo(const Config& cfg, const PpoOptions& o, const GenerationOptions& gen, const Tokenizer& tok,
      Transformer& actor, Transformer& critic, Reference& reference, Reward& reward, dist::Dist& dist)
      : OnlineAlgorithm(
            cfg, gen, {o.samples_per_prompt, "rollout.samples_per_prompt", o.minibatches, "ppo.minibatches"},
            tok, actor, reward, &reference, dist),
        critic_(critic),
        o_(o),
        kl_coef_(o.kl_coef) {}

  // The trainer's global batch: one update's responses on all ranks.
  int64_t update_batch_size() const { return o_.prompts_per_step * o_.samples_per_prompt / o_.minibatches; }

  int64_t updates_per_step() const override { return o_.epochs * o_.minibatches; }
  bool offload_optimizer_in_next_step() const override { return o_.offload_optimizer; }

  bool next_step(int64_t n) override {
    if (!next_rollout()) return false;
    const auto& b = rollout_.batch;
    const int64_t N = b.input_ids.size(0);
    if (N * o_.epochs != n * micro_batch_size_)
      fail("PPO: the rollout has {} responses, the step expects {}", N, n * micro_batch_size_ / o_.epochs);
    micro_batches_ =
        plan_micro_batches(N, o_.epochs, micro_batch_size_, step_seed(seed_, step_, dist_.rank(), 2));

    // Old log-probs, values and the reference's log-probs, batched as the first epoch's
    // micro-batches, so that the first update's forward repeats these exactly (its ratio is 1).
    const auto t0 = Clock::now();
    const std::vector<at::Tensor> first_epoch(micro_batches_.begin(),
                                              micro_batches_.begin() + N / micro_batch_size_);
    at::Tensor old_logprobs, ref_logprobs, values = at::zeros(b.labels.sizes(), b.response_mask.options());
    {
      at::NoGradGuard no_grad;
      old_logprobs = o_.sampler_logprobs ? b.logprobs : rollout_logprobs(policy_, b, first_epoch);
      for (const auto& rows : first_epoch) {
        const auto in = gather_rows(b, rows);
        values.narrow(1, 0, in.input_ids.size(1))
            .index_copy_(0, rows.to(values.device()), token_values(critic_, in));
      }
      reference_->with_model(
          policy_, [&](const Transformer& ref) { ref_logprobs = rollout_logprobs(ref, b, first_epoch); });
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
    // tokens, adv, adv^2, ret, ret^2, residual, residual^2
    const auto g = dist_.sum({mask.sum().item<double>(), advantages.sum().item<double>(),
                              advantages.pow(2).sum().item<double>(), returns.sum().item<double>(),
                              returns.pow(2).sum().item<double>(), residual.sum().item<double>(),
                              residual.pow(2).sum().item<double>()});
    const double tokens = std::max(g[0], 1.0);
    auto var = [&](double sum, double sq) {
      return std::max(sq / tokens - (sum / tokens) * (sum / tokens), 0.0);
    };
    const double adv_mean = g[1] / tokens, adv_var = var(g[1], g[2]);
    const double ret_var = var(g[3], g[4]), res_var = var(g[5], g[6]);

    t_.old_logprobs = old_logprobs;
    t_.old_values = values;
    t_.returns = returns.to(at::kFloat);
    t_.advantages = (o_.whiten ? whiten(advantages, mask, adv_mean, adv_var) : advantages).to(at::kFloat);
    t_.response_mask = mask;
    t_.actor_mask = o_.mask_unfinished ? mask * ended_t.unsqueeze(1) : mask;

    const auto kl_per_sequence = kl.sum(1);
    step_metrics_ = rollout_metrics(dist_, rollout_, kl_per_sequence);
    rollout_kl_ = dist_.sum({kl_per_sequence.sum().item<double>()})[0] / double(N * dist_.world_size());
    rollout_sequences_ = N * dist_.world_size();
    step_metrics_.push_back({"kl_coef", kl_coef_});
    step_metrics_.push_back({"advantage_mean", adv_mean});
    step_metrics_.push_back({"explained_variance", ret_var > 0 ? 1 - res_var / ret_var : 0.0});
    const auto per_rank = rank_metrics(rollout_, inference_seconds, policy_.embed.device());
    step_metrics_.insert(step_metrics_.end(), per_rank.begin(), per_rank.end());

    // Tokens the actor and the critic learn from in each update, over every rank, for the means.
    const int64_t per_update = int64_t(micro_batches_.size()) / updates_per_step();
    std::vector<double> counts(2 * updates_per_step(), 0.0);
    for (size_t i = 0; i < micro_batches_.size(); ++i) {
      const auto rows = micro_batches_[i].to(mask.device());
      counts[2 * (int64_t(i) / per_update)] += t_.actor_mask.index_select(0, rows).sum().item<double>();
      counts[2 * (int64_t(i) / per_update) + 1] += mask.index_select(0, rows).sum().item<double>();
    }
    update_counts_ = dist_.sum(counts);
    return true;
  }

  double units(int64_t i) const override {
    return t_.response_mask.index_select(0, micro_batches_.at(size_t(i)).to(t_.response_mask.device()))
        .sum()
        .item<double>();
  }

  LossSums loss(int64_t i) override {
    const auto& rows = micro_batches_.at(size_t(i));
    auto in = gather_rows(rollout_.batch, rows);
    in.checkpointed_layers = checkpointed_layers_;
    auto take = [&](const at::Tensor& t) { return take_rows(t, rows, in); };
    const auto actor_mask = take(t_.actor_mask), mask = take(t_.response_mask);
    const auto old_logprobs = take(t_.old_logprobs), advantages = take(t_.advantages);

    const auto lp = labelled_logprobs(policy_, in, take(rollout_.batch.labels), true);
    const auto actor_tokens = ppo_actor_loss(lp.logprobs, old_logprobs, advantages, actor_mask, o_.clip_eps);
    auto actor_sum = actor_tokens.sum();
    if (o_.entropy_coef > 0) actor_sum = actor_sum - o_.entropy_coef * (lp.entropy * actor_mask).sum();
    const auto values = token_values(critic_, in);
    const auto critic_sum =
        ppo_critic_loss(values, take(t_.old_values), take(t_.returns), mask, o_.value_clip).sum();

    // The trainer divides by the update's response tokens (the critic's mean); the actor's sum is
    // rescaled so that it becomes a mean over the tokens it learns from. During the critic's warm-up
    // the actor's gradient is zero (and so is its AdamW update: no moments yet, no weight decay).
    const int64_t u = i / (int64_t(micro_batches_.size()) / updates_per_step());
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
    };
    // The first micro-batch's largest ratio: exactly 1 when the old log-probs are recomputed.
    add_step_metrics(out.metrics,
                     {{"ratio_max", (ratio * actor_mask + (1 - actor_mask)).max().item<double>()}}, i);
    add_step_metrics(out.metrics, step_metrics_, i);
    return out;
  }

  void after_optimizer_step(int64_t step) override {
    step_ = step;
    if (o_.target_kl > 0)
      kl_coef_ = adapt_kl_coef(kl_coef_, rollout_kl_, o_.target_kl, o_.kl_horizon, rollout_sequences_);
  }

  nlohmann::json state() const override {
    auto s = OnlineAlgorithm::state();
    s["kl_coef"] = kl_coef_;
    return s;
  }
  void load_state(const nlohmann::json& s) override {
    OnlineAlgorithm::load_state(s);
    kl_coef_ = s.at("kl_coef").get<double>();
  }

 private:
  Transformer& critic_;
  PpoOptions o_;
  double kl_coef_ = 0.01;

  RolloutTensors t_;
  std::vector<at::Tensor> micro_batches_;  // the step's micro-batches: rows of the rollout (CPU)
  std::vector<double> update_counts_;      // per update: actor tokens, response tokens (all ranks)
  NamedValues step_metrics_;
  double rollout_kl_ = 0;
  int64_t rollout_sequences_ = 0;
};

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
  const std::string actor_dir = cfg.get_string("actor.path"), reward_dir = cfg.get_string("reward.model");
  if (actor_dir.empty()) fail("config key 'actor.path' must be set");
  check_reward_config(cfg);
  const std::string critic_dir =
      cfg.get_string("critic.path").empty() ? reward_dir : cfg.get_string("critic.path");
  if (critic_dir.empty())
    fail(
        "config key 'critic.path' must be set when there is no reward.model to start the critic from (a "
        "reward-model "
        "or causal LM folder)");
  const auto weights = reward_attribute_weights(cfg);
  // Every key is checked before the models load.
  const auto ppo = read_ppo_options(cfg);
  const auto gen = read_generation_options(cfg, "rollout.max_new_tokens", "rollout.samples_per_prompt");
  const auto offload = read_reference_offload(cfg);

  auto ctx = init_run(cfg);
  const auto dtype = parse_compute_dtype(cfg.get_string("model.dtype"), ctx.device, "model.dtype");
  Policy loaded = load_policy(actor_dir, "actor.path", ctx.device, dtype);
  Transformer& actor = loaded.model;
  auto& tok = loaded.tok;
  Transformer critic = load_critic(critic_dir, ctx.device, dtype, pad_id_for(*tok), weights,
                                   uint64_t(cfg.get_int("trainer.seed")));
  if (critic.cfg.vocab_size < tok->vocab_size())
    fail("critic.path {}: its vocabulary ({}) is smaller than the actor's tokenizer ({})", critic_dir,
         critic.cfg.vocab_size, tok->vocab_size());

  auto actor_module = trainable_model(actor, cfg, actor_optim, actor_dir, "actor");
  auto critic_module = whole_model(critic, critic_optim, critic_dir, "critic");
  if (cfg.get_bool("lora.critic")) {
    // The critic's own adapters, of the actor's settings (not lora.from's weights), and its value head.
    const auto lora = actor_module.lora;
    if (lora.rank == 0) fail("config key 'lora.critic' is true, but LoRA is off (lora.rank is 0)");
    add_adapters(critic, lora, uint64_t(cfg.get_int("trainer.seed")) + 1);
    critic_module =
        adapter_module(critic, lora, critic_optim, critic_dir, "critic", cfg.get_bool("lora.merge_on_save"));
  }
  auto reward = make_reward(cfg, *tok, ctx.device, dtype);
  Reference reference(actor, offload.value_or(ctx.device.is_cuda()));

  Ppo algo(cfg, ppo, gen, *tok, actor, critic, reference, *reward, ctx.dist);
  opt.global_batch_size = algo.update_batch_size();
  train(cfg, opt, {actor_module, critic_module}, algo, ctx.dist);
}

}  // namespace aligner
