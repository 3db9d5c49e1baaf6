#include "algo/dpo.h"

#include <chrono>
#include <cmath>
#include <memory>
#include <optional>

#include "algo/data_stream.h"
#include "core/error.h"
#include "core/log.h"
#include "data/preference_data.h"
#include "data/sampler.h"
#include "io/hf_checkpoint.h"
#include "text/chat_template.h"
#include "train/run_setup.h"
#include "train/trainer.h"

namespace aligner {

PreferenceLoss parse_preference_loss(const std::string& name) {
  if (name == "dpo") return PreferenceLoss::kDpo;
  if (name == "ipo") return PreferenceLoss::kIpo;
  if (name == "rpo_sq") return PreferenceLoss::kRpoSq;
  if (name == "rpo_fwd_kl") return PreferenceLoss::kRpoFwdKl;
  if (name == "rpo_bwd_kl") return PreferenceLoss::kRpoBwdKl;
  fail("config key 'dpo.loss' expects dpo, ipo, rpo_sq, rpo_fwd_kl or rpo_bwd_kl, got '{}'", name);
}

// dpo is Rafailov et al.'s loss with the label smoothing of conservative DPO (as TRL's "sigmoid"
// loss); ipo is Azar et al.'s (IPO) on the same logits. The rpo losses are NeMo-Aligner's
// (MegatronGPTDPOModel.loss_func in nemo_aligner/models/nlp/gpt/megatron_gpt_dpo_model.py), where
// ref_policy_kl_penalty is beta, rewards_delta is `logits` and gt_rewards_delta is
// gt_reward_scale x (reward_chosen - reward_rejected): rpo_sq squares the gap between beta x logits
// and the data's reward gap; the KL pair compares Bernoulli distributions over which response wins,
// the policy's sigmoid(beta x logits) and the data's sigmoid(gt_rewards_delta).
at::Tensor preference_loss(const PreferenceLossOptions& o, const at::Tensor& policy_chosen,
                           const at::Tensor& policy_rejected, const at::Tensor& reference_chosen,
                           const at::Tensor& reference_rejected, const at::Tensor& reward_chosen,
                           const at::Tensor& reward_rejected) {
  const auto logits = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected);
  const double beta = o.beta, ls = o.label_smoothing;
  if (o.loss == PreferenceLoss::kDpo)
    return -(1 - ls) * at::log_sigmoid(beta * logits) - ls * at::log_sigmoid(-beta * logits);
  if (o.loss == PreferenceLoss::kIpo) return (logits - 1.0 / (2 * beta)).pow(2);
  if (!reward_chosen.defined() || !reward_rejected.defined())
    fail("the rpo losses need the data's chosen_reward and rejected_reward");
  const auto gt = o.gt_reward_scale * (reward_chosen - reward_rejected).to(logits.scalar_type());
  if (o.loss == PreferenceLoss::kRpoSq) return (beta * logits - gt).pow(2);
  const auto log_p = at::log_sigmoid(beta * logits), log_not_p = at::log_sigmoid(-beta * logits);
  const auto log_q = at::log_sigmoid(gt), log_not_q = at::log_sigmoid(-gt);
  if (o.loss == PreferenceLoss::kRpoFwdKl)
    return log_p.exp() * (log_p - log_q) + log_not_p.exp() * (log_not_p - log_not_q);
  return log_q.exp() * (log_q - log_p) + log_not_q.exp() * (log_not_q - log_not_p);
}

ResponseLogprobs response_logprobs(const Transformer& m, const Batch& b, int64_t checkpointed_layers) {
  const auto device = m.embed.device();
  ForwardInput in{b.input_ids.to(device), b.attention_mask.to(device), b.position_ids.to(device)};
  const bool packed = b.source_index.defined();
  if (packed) in.segment_ids = b.segment_ids;
  in.checkpointed_layers = checkpointed_layers;
  const auto labels = b.labels.to(device);
  const auto hidden = forward_hidden(m, in);
  // Only response positions go through the vocabulary projection: prompts and padding, often
  // most of a preference batch, would cost as much there as in the rest of the model.
  const int64_t rows = labels.size(0), T = labels.size(1);
  const auto trained = labels.reshape({-1}) != kIgnoreIndex;
  const auto positions = trained.nonzero().squeeze(1);
  const auto logprobs = token_logprobs(m, hidden.reshape({rows * T, -1}).index_select(0, positions),
                                       labels.reshape({-1}).index_select(0, positions));
  // Each token's sequence: its row, or in packed rows the sequence source_index names.
  const int64_t n = packed ? b.source_index.max().item<int64_t>() + 1 : rows;
  const auto owner =
      packed ? b.source_index.reshape({-1}).to(device).index_select(0, positions) : positions.div(T, "floor");
  const auto sum = at::zeros({n}, logprobs.options()).index_add(0, owner, logprobs);
  const auto count = at::zeros({n}, owner.options()).index_add(0, owner, at::ones_like(owner));
  return {sum, count};
}

namespace {

using Pairs = std::vector<Indexed<PreferenceExample>>;

// Pair `index` of `ds`, as data_stream.h reads it.
auto read(PreferenceDataset& ds) {
  return [&ds](int64_t index) { return preference_example(ds, index); };
}

class Dpo final : public SampledAlgorithm {
 public:
  Dpo(const Config& cfg, const Tokenizer& tok, Transformer& policy, int rank, int world)
      : policy_(policy), rank_(rank), world_(world) {
    loss_.loss = parse_preference_loss(cfg.get_string("dpo.loss"));
    loss_.beta = cfg.get_float("dpo.beta");
    loss_.label_smoothing = cfg.get_float("dpo.label_smoothing");
    loss_.gt_reward_scale = cfg.get_float("dpo.gt_reward_scale");
    sft_weight_ = cfg.get_float("dpo.sft_weight");
    average_ = cfg.get_bool("dpo.average_log_probs");
    if (loss_.beta <= 0) fail("config key 'dpo.beta' must be positive, got {}", loss_.beta);
    if (loss_.label_smoothing < 0 || loss_.label_smoothing >= 0.5)
      fail("config key 'dpo.label_smoothing' must be in [0, 0.5), got {}", loss_.label_smoothing);
    if (loss_.label_smoothing > 0 && loss_.loss != PreferenceLoss::kDpo)
      fail("config key 'dpo.label_smoothing' applies to dpo.loss=dpo only");
    if (sft_weight_ < 0) fail("config key 'dpo.sft_weight' must not be negative, got {}", sft_weight_);
    needs_rewards_ = loss_.loss != PreferenceLoss::kDpo && loss_.loss != PreferenceLoss::kIpo;

    options_ = read_data_options(cfg, policy.cfg);
    const auto tmpl = resolve_chat_template(cfg.get_string("data.template"), tok);
    std::tie(train_, val_, sampler_) = open_train_data<PreferenceDataset>(
        cfg, rank, world,
        [&](const std::string& path) { return open_preference_dataset(path, tok, tmpl, options_); });
    micro_batch_size_ = cfg.get_int("trainer.micro_batch_size");
    max_epochs_ = data_epochs(cfg);
    checkpointed_layers_ = checkpointed_layers(cfg);
    pad_id_ = pad_id_for(tok);
    if (cfg.get_bool("data.packing")) pack_length_ = options_.max_length;
  }

  // Computes the reference's log-probs of the pairs that this rank trains on in its first
  // `micro_batches` micro-batches (0: until max_epochs are done), batched as training will batch
  // them, and of this rank's validation pairs, so that training needs no reference model. The same
  // batches give the same numbers: with the policy still equal to the reference, every logit is 0.
  // A resumed run computes the cache again the same way and reads a suffix of the same order.
  void cache_reference(const Transformer& reference, int64_t micro_batches) {
    at::NoGradGuard no_grad;
    const auto t0 = std::chrono::steady_clock::now();
    int64_t computed = 0;
    auto fill = [&](std::vector<float>& cache, const Pairs& pairs) {
      bool missing = false;
      for (const auto& p : pairs) missing |= std::isnan(cache[2 * p.index]);
      if (!missing) return;  // a later epoch's micro-batch of pairs already computed
      const auto b = collate_preferences(examples_of(pairs), pad_id_, pack_length_);
      const auto sums = response_logprobs(reference, b.seqs).sum.to(at::kFloat).cpu();
      const int64_t B = int64_t(pairs.size());
      for (int64_t k = 0; k < B; ++k) {
        const int64_t i = pairs[k].index;
        if (!std::isnan(cache[2 * i])) continue;
        cache[2 * i] = sums[k].item<float>();
        cache[2 * i + 1] = sums[B + k].item<float>();
        ++computed;
      }
    };
    cache_train_.assign(2 * dataset_size(*train_), NAN);
    Sampler order = sampler_;
    for (int64_t k = 0; micro_batches <= 0 || k < micro_batches; ++k) {
      const auto pairs = next_examples(order, max_epochs_, micro_batch_size_, read(*train_));
      if (pairs.empty()) break;
      fill(cache_train_, pairs);
    }
    if (val_) {
      cache_val_.assign(2 * dataset_size(*val_), NAN);
      for (const auto& pairs :
           validation_batches(dataset_size(*val_), micro_batch_size_, rank_, world_, read(*val_)))
        fill(cache_val_, pairs);
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    log_info("reference log-probs of {} pairs computed in {:.1f} s", computed, s);
  }

  // Without a cache the reference model runs beside the policy at every step.
  void use_reference(const Transformer* reference) { reference_ = reference; }

  int64_t train_examples() const override { return dataset_size(*train_); }

  bool next_step(int64_t n) override {
    step_ = next_micro_batches(sampler_, max_epochs_, micro_batch_size_, n, read(*train_));
    return !step_.empty();
  }

  double units(int64_t i) const override { return double(step_.at(i).size()); }
  LossSums loss(int64_t i) override { return compute(step_.at(i), cache_train_, *train_); }

  ValidationSums validate() override {
    ValidationSums out;
    // compute()'s metrics, in its order.
    out.metric_names = {"rewards_chosen", "rewards_rejected", "reward_margin", "accuracy"};
    if (sft_weight_ > 0) out.metric_names.push_back("sft_loss");
    if (!val_) return out;
    for (const auto& pairs :
         validation_batches(dataset_size(*val_), micro_batch_size_, rank_, world_, read(*val_)))
      out.parts.push_back(compute(pairs, cache_val_, *val_));
    return out;
  }

 private:
  // The cached sums of the pairs, chosen rows then rejected rows as in the batch.
  static at::Tensor cached(const std::vector<float>& cache, const Pairs& pairs) {
    const size_t B = pairs.size();
    std::vector<float> sums(2 * B);
    for (size_t k = 0; k < B; ++k) {
      const int64_t i = pairs[k].index;
      if (cache.empty() || std::isnan(cache[2 * i])) fail("no cached reference log-probs for pair {}", i);
      sums[k] = cache[2 * i];
      sums[B + k] = cache[2 * i + 1];
    }
    return at::tensor(sums);
  }

  // The data's rewards of the pairs, which the rpo losses compare the policy's preference with.
  std::pair<at::Tensor, at::Tensor> data_rewards(const Pairs& pairs, const PreferenceDataset& ds) const {
    std::vector<double> chosen, rejected;
    for (const auto& p : pairs) {
      if (!p.example.chosen_reward || !p.example.rejected_reward)
        fail("{}: dpo.loss={} needs \"chosen_reward\" and \"rejected_reward\" on every pair",
             ds.file.where(p.index), loss_name());
      chosen.push_back(*p.example.chosen_reward);
      rejected.push_back(*p.example.rejected_reward);
    }
    return {at::tensor(chosen, at::TensorOptions().dtype(at::kDouble)),
            at::tensor(rejected, at::TensorOptions().dtype(at::kDouble))};
  }

  std::string loss_name() const {
    switch (loss_.loss) {
      case PreferenceLoss::kRpoSq:
        return "rpo_sq";
      case PreferenceLoss::kRpoFwdKl:
        return "rpo_fwd_kl";
      default:
        return "rpo_bwd_kl";
    }
  }

  LossSums compute(const Pairs& pairs, const std::vector<float>& cache, const PreferenceDataset& ds) {
    const int64_t B = int64_t(pairs.size());
    const auto b = collate_preferences(examples_of(pairs), pad_id_, pack_length_);
    const auto policy = response_logprobs(policy_, b.seqs, checkpointed_layers_);
    at::Tensor reference;
    if (reference_) {
      at::NoGradGuard no_grad;
      reference = response_logprobs(*reference_, b.seqs).sum;
    } else {
      reference = cached(cache, pairs);
    }
    const auto& sums = policy.sum;
    reference = reference.to(sums.device(), sums.scalar_type());
    // Per-token means divide by each response's own length, the same for policy and reference.
    const auto length = policy.count.clamp_min(1).to(sums.scalar_type());
    const auto pi = average_ ? sums / length : sums;
    const auto ref = average_ ? reference / length : reference;
    const auto pi_c = pi.narrow(0, 0, B), pi_r = pi.narrow(0, B, B);
    const auto ref_c = ref.narrow(0, 0, B), ref_r = ref.narrow(0, B, B);
    at::Tensor reward_c, reward_r;
    if (needs_rewards_) {
      std::tie(reward_c, reward_r) = data_rewards(pairs, ds);
      reward_c = reward_c.to(sums.device());
      reward_r = reward_r.to(sums.device());
    }
    LossSums out;
    out.loss = preference_loss(loss_, pi_c, pi_r, ref_c, ref_r, reward_c, reward_r).sum();
    out.units = double(B);
    out.tokens = b.seqs.attention_mask.sum().item<int64_t>();
    // The implicit rewards beta x log(pi / ref) of each response.
    const auto rc = loss_.beta * (pi_c - ref_c).detach(), rr = loss_.beta * (pi_r - ref_r).detach();
    // Means per pair.
    out.metrics = {{"rewards_chosen", rc.sum().item<double>(), out.units},
                   {"rewards_rejected", rr.sum().item<double>(), out.units},
                   {"reward_margin", (rc - rr).sum().item<double>(), out.units},
                   {"accuracy", (rc > rr).sum().item<double>(), out.units}};
    if (sft_weight_ > 0) {
      // NeMo-Aligner's sft_loss_func: the chosen response's negative log-likelihood, summed over
      // its tokens (their mean with average_log_probs), per pair.
      const auto sft = -pi_c.sum();
      out.loss = out.loss + sft_weight_ * sft;
      out.metrics.push_back({"sft_loss", sft.item<double>(), out.units});
    }
    return out;
  }

  Transformer& policy_;
  const Transformer* reference_ = nullptr;
  int rank_, world_;
  PreferenceLossOptions loss_;
  double sft_weight_ = 0;
  bool average_ = false, needs_rewards_ = false;
  int64_t checkpointed_layers_ = 0;
  DataOptions options_;
  std::unique_ptr<PreferenceDataset> train_, val_;
  int64_t micro_batch_size_ = 1, max_epochs_ = 1;
  int32_t pad_id_ = 0;
  int64_t pack_length_ = 0;  // data.packing: the micro-batch's responses packed into rows this long
  std::vector<Pairs> step_;
  std::vector<float> cache_train_, cache_val_;  // chosen, rejected per pair index; NaN: not computed
};

}  // namespace

void run_dpo(const Config& cfg) {
  const auto opt = read_trainer_options(cfg);
  const auto optim = read_optimizer_settings(cfg, "optim", "trainer.grad_clip");
  const std::string model_dir = cfg.get_string("model.path");
  if (model_dir.empty()) fail("config key 'model.path' must be set");
  auto ctx = init_run(cfg);
  const auto dtype = parse_compute_dtype(cfg.get_string("model.dtype"), ctx.device, "model.dtype");
  Policy loaded = load_policy(model_dir, "model.path", ctx.device, dtype);
  Transformer& policy = loaded.model;
  auto& tok = loaded.tok;
  const std::string reference_dir = cfg.get_string("dpo.reference");
  auto load_reference = [&] {
    Transformer ref = load_transformer(reference_dir, ctx.device, dtype);
    if (ref.cfg.vocab_size != policy.cfg.vocab_size || ref.cfg.num_labels > 0)
      fail("dpo.reference {} must be a causal LM with the policy's vocabulary ({})", reference_dir,
           policy.cfg.vocab_size);
    return ref;
  };
  auto module = trainable_model(policy, cfg, optim, model_dir);
  // With adapters the reference is the base with them off: no second model, and no cache needed.
  const bool adapters = module.lora.rank > 0;
  Dpo algo(cfg, *tok, policy, ctx.dist.rank(), ctx.dist.world_size());
  std::optional<Transformer> reference;
  if (cfg.get_bool("dpo.cache_reference")) {
    // What the run will read: max_steps global batches, else every epoch.
    const int64_t per_step = opt.micro_batch_size * ctx.dist.world_size();
    const int64_t micro_batches =
        opt.max_steps > 0 ? opt.max_steps * ((opt.global_batch_size + per_step - 1) / per_step) : 0;
    // Until training starts the policy is the reference when both come from one folder, so the
    // cache takes no second model at all; a separate reference is freed once it has run.
    if (reference_dir.empty())
      algo.cache_reference(without_adapters(policy), micro_batches);
    else
      algo.cache_reference(load_reference(), micro_batches);
  } else {
    if (!reference_dir.empty())
      reference = load_reference();
    else
      reference = adapters ? without_adapters(policy) : load_transformer(model_dir, ctx.device, dtype);
    algo.use_reference(&*reference);
  }
  train(cfg, opt, {module}, algo, ctx.dist);
}

}  // namespace aligner
