#include "algo/rollout.h"

#include "train/run_setup.h"

#include <chrono>
#include <map>

#include "algo/data_stream.h"
#include "core/error.h"
#include "core/log.h"
#include "data/packing.h"
#include "model/layers.h"
#include "text/chat_template.h"

namespace aligner {
namespace {

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

}  // namespace

PromptDataset open_rollout_prompts(const Config& cfg, const std::string& key, const Tokenizer& tok,
                                   const ModelConfig& model, int64_t max_new_tokens) {
  DataOptions opt;
  opt.max_length = cfg.get_int("data.max_length");
  opt.truncation = parse_truncation(cfg.get_string("data.truncation"));
  opt.skip_bad_lines = cfg.get_bool("data.skip_bad_lines");
  if (opt.max_length < 1) fail("config key 'data.max_length' must be positive, got {}", opt.max_length);
  // A prompt and its response must fit the context together.
  const int64_t context = context_length(model);
  if (max_new_tokens >= context)
    fail("config key 'rollout.max_new_tokens' ({}) leaves no room for a prompt in the model's context ({})",
         max_new_tokens, context);
  if (opt.max_length + max_new_tokens > context) {
    if (!cfg.is_default("data.max_length"))
      fail(
          "config keys 'data.max_length' ({}) and 'rollout.max_new_tokens' ({}) add up to more than the "
          "model's "
          "context ({})",
          opt.max_length, max_new_tokens, context);
    opt.max_length = context - max_new_tokens;
    log_info("data.max_length: {}, the model's context less rollout.max_new_tokens", opt.max_length);
  }
  const std::string path = cfg.get_string(key);
  if (path.empty()) fail("config key '{}' must be set", key);
  PromptDataset ds =
      open_prompt_dataset(path, tok, resolve_chat_template(cfg.get_string("data.template"), tok), opt);
  check_and_describe(ds, key);
  return ds;
}

std::vector<PromptExample> OnlinePrompts::next() {
  return examples_of(
      next_examples(sampler, max_epochs, per_rank, [&](int64_t i) { return prompt_example(*train, i); }));
}

OnlinePrompts open_online_prompts(const Config& cfg, const Tokenizer& tok, const ModelConfig& model,
                                  int64_t max_new_tokens, const StepShape& shape, const dist::Dist& dist) {
  const int64_t prompts = cfg.get_int("rollout.prompts_per_step"),
                micro = cfg.get_int("trainer.micro_batch_size");
  const int world = dist.world_size();
  if (prompts % world != 0)
    fail("config key 'rollout.prompts_per_step' ({}) must be a multiple of the {} ranks", prompts, world);
  const int64_t sequences = prompts / world * shape.per_prompt;
  if (sequences % (shape.updates * micro) != 0) {
    const std::string groups =
        shape.updates_key.empty() ? "" : fmt::format(" {} ({}) of", shape.updates_key, shape.updates);
    fail(
        "a rank's {} responses per step (rollout.prompts_per_step / ranks x {}) must split into{} whole "
        "micro-batches (trainer.micro_batch_size {})",
        sequences, shape.per_prompt_key, groups, micro);
  }
  OnlinePrompts p;
  p.train =
      std::make_unique<PromptDataset>(open_rollout_prompts(cfg, "data.train", tok, model, max_new_tokens));
  if (!cfg.get_string("data.validation").empty())
    p.val = std::make_unique<PromptDataset>(
        open_rollout_prompts(cfg, "data.validation", tok, model, max_new_tokens));
  p.sampler = make_sampler(dataset_size(*p.train), dist.rank(), world, cfg.get_bool("data.shuffle"),
                           uint64_t(cfg.get_int("trainer.seed")));
  p.max_epochs = data_epochs(cfg);
  p.per_rank = prompts / world;
  return p;
}

Rollout make_rollout(const Transformer& policy, const std::vector<PromptExample>& prompts,
                     const GenerationOptions& opt, const Tokenizer& tok, Reward& reward, int32_t pad_id,
                     const GroupFilter* filter) {
  const size_t want = prompts.size();
  const int64_t S = opt.num_samples;
  Rollout r;
  // The groups kept, and the dropped ones that may fill in.
  struct Group {
    const PromptExample* prompt;
    std::vector<GeneratedSequence> seqs;
    std::vector<double> scores;
  };
  std::vector<Group> kept, spare;
  std::vector<std::vector<PromptExample>> rounds{prompts};  // owns every round's prompts
  for (int64_t round = 0;; ++round) {
    const auto& cur = rounds.back();
    std::vector<std::vector<int32_t>> ids;
    for (const auto& p : cur) ids.push_back(p.input_ids);
    GenerationOptions o = opt;
    if (round > 0) o.seed = step_seed(opt.seed, round, 0, 3);
    auto t0 = std::chrono::steady_clock::now();
    GenerationResult result = generate(policy, ids, o);
    r.generation_seconds += seconds_since(t0);
    r.generated_tokens += result.generated_tokens;

    t0 = std::chrono::steady_clock::now();
    std::vector<RewardQuery> queries;
    queries.reserve(result.sequences.size());
    for (const auto& s : result.sequences) {
      const auto& p = cur[size_t(s.prompt_index)];
      queries.push_back({p.input_ids, s.tokens, p.text, response_text(s, tok, opt.stop_strings, false).text,
                         s.finish == FinishReason::kStop, p.record});
    }
    const auto scores = reward.score(queries);
    if (scores.size() != queries.size())
      fail("the reward gave {} scores for {} responses", scores.size(), queries.size());
    r.reward_seconds += seconds_since(t0);

    for (size_t k = 0; k < cur.size(); ++k) {
      Group g{&cur[k], {}, {}};
      for (int64_t j = 0; j < S; ++j) {
        g.seqs.push_back(std::move(result.sequences[k * S + j]));
        g.scores.push_back(scores[k * S + j]);
      }
      const bool keep = !filter || filter->keep(g.scores);
      if (keep && kept.size() < want)
        kept.push_back(std::move(g));
      else
        spare.push_back(std::move(g));
    }
    if (kept.size() == want || !filter || round + 1 >= filter->max_rounds) break;
    auto more = filter->more();
    if (more.empty()) break;
    rounds.push_back(std::move(more));
  }
  r.dropped_groups = int64_t(spare.size());
  for (size_t k = 0; kept.size() < want && k < spare.size(); ++k) kept.push_back(std::move(spare[k]));

  std::vector<std::vector<int32_t>> ids;
  GenerationResult all;
  for (size_t k = 0; k < kept.size(); ++k) {
    ids.push_back(kept[k].prompt->input_ids);
    for (int64_t j = 0; j < S; ++j) {
      auto& s = kept[k].seqs[size_t(j)];
      s.prompt_index = int64_t(k);
      r.scores.push_back(kept[k].scores[size_t(j)]);
      r.ended.push_back(s.finish == FinishReason::kStop);
      r.response_length.push_back(int64_t(s.tokens.size()));
      r.prompt_index.push_back(int64_t(k));
      all.sequences.push_back(std::move(s));
    }
  }
  r.batch = collate_generations(ids, all, pad_id, policy.embed.device());
  return r;
}

uint64_t step_seed(uint64_t seed, int64_t step, int64_t rank, int64_t salt) {
  uint64_t h = seed ^ 0x9e3779b97f4a7c15ULL;
  for (uint64_t v : {uint64_t(step), uint64_t(rank), uint64_t(salt)}) {
    h ^= v + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
    h *= 0xff51afd7ed558ccdULL;
  }
  return h >> 1;  // a config int is signed
}

std::vector<at::Tensor> plan_micro_batches(int64_t N, int64_t epochs, int64_t micro, uint64_t seed) {
  std::vector<at::Tensor> out;
  for (int64_t e = 0; e < epochs; ++e) {
    auto gen = make_generator(at::kCPU, step_seed(seed, e, 0, 0));
    const auto order = at::randperm(N, gen, at::TensorOptions().dtype(at::kLong));
    for (int64_t s = 0; s + micro <= N; s += micro) out.push_back(order.narrow(0, s, micro));
  }
  return out;
}

ForwardInput gather_rows(const GenerationBatch& b, const at::Tensor& rows) {
  const auto r = rows.to(b.input_ids.device());
  const int64_t T = b.attention_mask.index_select(0, r).sum(1).max().item<int64_t>();
  auto take = [&](const at::Tensor& t) { return t.index_select(0, r).narrow(1, 0, T); };
  return ForwardInput{take(b.input_ids), take(b.attention_mask), take(b.position_ids)};
}

at::Tensor take_rows(const at::Tensor& t, const at::Tensor& rows, const ForwardInput& in) {
  return t.index_select(0, rows.to(t.device())).narrow(1, 0, in.input_ids.size(1));
}

at::Tensor rollout_logprobs(const Transformer& m, const GenerationBatch& b,
                            const std::vector<at::Tensor>& micro_batches) {
  at::NoGradGuard no_grad;
  auto out = at::zeros(b.labels.sizes(), b.response_mask.options());
  for (const auto& rows : micro_batches) {
    const auto in = gather_rows(b, rows);
    const auto lp = labelled_logprobs(m, in, take_rows(b.labels, rows, in), false).logprobs;
    out.narrow(1, 0, in.input_ids.size(1)).index_copy_(0, rows.to(out.device()), lp.to(at::kFloat));
  }
  return out;
}

TokenLogprobs labelled_logprobs(const Transformer& m, const ForwardInput& in, const at::Tensor& labels,
                                bool entropy) {
  const auto hidden = forward_hidden(m, in);
  const int64_t B = labels.size(0), T = labels.size(1);
  const auto flat = labels.reshape({-1});
  // Prompts and padding never reach the vocabulary projection.
  const auto positions = (flat >= 0).nonzero().squeeze(1);
  const auto h = hidden.reshape({B * T, -1}).index_select(0, positions);
  const auto targets = flat.index_select(0, positions);
  auto scatter = [&](const at::Tensor& v) {
    return at::zeros({B * T}, v.options()).index_copy(0, positions, v).view({B, T});
  };
  if (!entropy) return {scatter(token_logprobs(m, h, targets)), at::Tensor()};
  const auto logp = at::log_softmax(at_least_float(lm_logits(m, h)), -1);
  const auto picked = logp.gather(1, targets.unsqueeze(1)).squeeze(1);
  const auto ent = -(logp.exp() * logp).sum(-1);
  return {scatter(picked), scatter(ent)};
}

at::Tensor token_values(const Transformer& critic, const ForwardInput& in) {
  if (!critic.score.weight.defined() || critic.score.weight.size(0) != 1)
    fail("the critic needs a value head with one output");
  return at_least_float(apply(critic.score, forward_hidden(critic, in))).select(-1, 0);
}

std::optional<bool> read_reference_offload(const Config& cfg) {
  const std::string offload = cfg.get_string("reference.offload");
  if (offload == "auto") return std::nullopt;
  if (offload != "true" && offload != "false")
    fail("config key 'reference.offload' expects auto, true or false, got '{}'", offload);
  return offload == "true";
}

Reference::Reference(const Transformer& policy, bool offload)
    : adapters_(has_adapters(policy)), offload_(offload) {
  at::NoGradGuard no_grad;
  if (adapters_) return;
  if (!offload) {
    copy_ = std::make_unique<Transformer>(allocate_like(policy, policy.embed.options()));
    const auto from = named_parameters(policy), to = named_parameters(*copy_);
    for (size_t i = 0; i < from.size(); ++i) to[i].second.copy_(from[i].second);
    return;
  }
  const bool pin = at::hasCUDA() && policy.embed.is_cuda();
  for (const auto& [name, t] : named_parameters(policy)) {
    auto host = at::empty(t.sizes(), t.options().device(at::kCPU).pinned_memory(pin).requires_grad(false));
    host.copy_(t);
    host_.push_back(host);
    stash_.push_back(at::empty_like(host, host.options().pinned_memory(pin)));
  }
}

Transformer Reference::adapted_reference(const Transformer& policy) const {
  if (assigned_adapters_.empty()) return without_adapters(policy);
  Transformer ref = policy;
  const std::map<std::string, at::Tensor> by_name(assigned_adapters_.begin(), assigned_adapters_.end());
  for (auto& [module, l] : layer_linears(ref)) {
    if (!l->lora.a.defined()) continue;
    const auto a = by_name.find(module + ".lora_A.weight"), b = by_name.find(module + ".lora_B.weight");
    if (a == by_name.end() || b == by_name.end()) fail("the reference has no adapter for {}", module);
    l->lora.a = a->second;
    l->lora.b = b->second;
  }
  return ref;
}

void Reference::assign(const std::vector<std::pair<std::string, at::Tensor>>& weights) {
  at::NoGradGuard no_grad;
  if (adapters_) {
    assigned_adapters_.clear();
    for (const auto& [name, t] : weights) assigned_adapters_.emplace_back(name, t.detach().clone());
    return;
  }
  std::vector<at::Tensor> to = host_;
  if (copy_)
    for (const auto& [name, t] : named_parameters(*copy_)) to.push_back(t);
  if (weights.size() != to.size())
    fail("the reference has {} tensors, the weights given {}", to.size(), weights.size());
  for (size_t i = 0; i < to.size(); ++i) {
    // copy_ would broadcast a smaller tensor into a larger one.
    if (!weights[i].second.sizes().equals(to[i].sizes()))
      fail("the weights given for reference tensor '{}' have another shape", weights[i].first);
    to[i].copy_(weights[i].second);
  }
}

void Reference::swap_in(Transformer& policy) {
  at::NoGradGuard no_grad;
  const auto params = named_parameters(policy);
  for (size_t i = 0; i < params.size(); ++i) {
    stash_[i].copy_(params[i].second);
    params[i].second.copy_(host_[i]);
  }
}

void Reference::swap_out(Transformer& policy) {
  at::NoGradGuard no_grad;
  const auto params = named_parameters(policy);
  for (size_t i = 0; i < params.size(); ++i) params[i].second.copy_(stash_[i]);
}

NamedValues rollout_metrics(dist::Dist& dist, const Rollout& r, const at::Tensor& kl_per_sequence) {
  double score = 0, score_sq = 0, length = 0, ended = 0;
  for (size_t k = 0; k < r.scores.size(); ++k) {
    score += r.scores[k];
    score_sq += r.scores[k] * r.scores[k];
    length += double(r.response_length[k]);
    ended += r.ended[k];
  }
  const double kl = kl_per_sequence.defined() ? kl_per_sequence.sum().item<double>() : 0.0;
  const auto g = dist.sum({double(r.scores.size()), score, score_sq, kl, length, ended});
  const double n = std::max(g[0], 1.0), mean = g[1] / n;
  NamedValues out = {{"reward_mean", mean}, {"reward_std", std::sqrt(std::max(g[2] / n - mean * mean, 0.0))}};
  if (kl_per_sequence.defined()) out.push_back({"kl", g[3] / n});
  out.push_back({"response_length", g[4] / n});
  out.push_back({"ended_fraction", g[5] / n});
  return out;
}

NamedValues rank_metrics(const Rollout& r, double inference_seconds, at::Device device) {
  return {{"time_generation", r.generation_seconds},
          {"time_inference", inference_seconds},
          {"time_reward", r.reward_seconds},
          {"gen_tokens_per_s", double(r.generated_tokens) / std::max(r.generation_seconds, 1e-9)},
          {"peak_memory_gb", peak_memory_gb(device)}};
}

void add_step_metrics(std::vector<Metric>& out, const NamedValues& values, int64_t i) {
  for (const auto& [name, value] : values) out.push_back({name, i == 0 ? value : 0.0, i == 0 ? 1.0 : 0.0});
}

ValidationSums validate_policy(const PolicyValidation& v, Transformer& policy, Reference* reference,
                               const Tokenizer& tok, Reward& reward, dist::Dist& dist) {
  ValidationSums out;
  out.metric_names = {"reward", "kl", "response_length", "ended_fraction"};
  if (!v.prompts) return out;
  std::vector<PromptExample> prompts;
  for (const auto& batch :
       validation_batches(dataset_size(*v.prompts), v.micro_batch_size, dist.rank(), dist.world_size(),
                          [&](int64_t i) { return prompt_example(*v.prompts, i); }))
    for (auto& p : batch) prompts.push_back(std::move(p.example));
  if (prompts.empty()) return out;
  GenerationOptions g = v.gen;
  g.num_samples = 1;
  g.sampling.greedy = v.greedy || g.sampling.greedy;
  g.seed = step_seed(v.gen.seed, -1, dist.rank(), 1);  // the same draws at every validation
  const Rollout r = make_rollout(policy, prompts, g, tok, reward, v.pad_id);
  const int64_t N = r.batch.input_ids.size(0);
  std::vector<at::Tensor> micro_batches;
  for (int64_t s = 0; s < N; s += v.micro_batch_size)
    micro_batches.push_back(
        at::arange(s, std::min(N, s + v.micro_batch_size), at::TensorOptions().dtype(at::kLong)));
  at::Tensor kl;  // only with a reference to compare with
  if (reference) {
    kl = rollout_logprobs(policy, r.batch, micro_batches).sum(1);
    reference->with_model(policy, [&](const Transformer& ref) {
      kl = kl - rollout_logprobs(ref, r.batch, micro_batches).sum(1);
    });
  }
  double reward_sum = 0, length = 0, ended = 0;
  for (int64_t k = 0; k < N; ++k) {
    reward_sum += r.scores[size_t(k)];
    length += double(r.response_length[size_t(k)]);
    ended += r.ended[size_t(k)];
  }
  LossSums part;
  part.units = double(N);
  part.metrics = {{"reward", reward_sum, double(N)},
                  {"kl", reference ? kl.sum().item<double>() : 0.0, reference ? double(N) : 0.0},
                  {"response_length", length, double(N)},
                  {"ended_fraction", ended, double(N)}};
  out.parts.push_back(std::move(part));
  return out;
}

OnlineAlgorithm::OnlineAlgorithm(const Config& cfg, const GenerationOptions& gen, const StepShape& shape,
                                 const Tokenizer& tok, Transformer& policy, Reward& reward,
                                 Reference* reference, dist::Dist& dist)
    : tok_(tok), policy_(policy), reward_(reward), reference_(reference), dist_(dist), gen_(gen) {
  gen_.tokenizer = &tok;
  check_generation_options(gen_);
  // Rollouts of one shape reuse their KV cache and captured decoding graphs step after step;
  // validation (greedy, other prompts) keeps its own.
  gen_.session = make_decode_session();
  val_session_ = make_decode_session();
  seed_ = uint64_t(cfg.get_int("trainer.seed"));
  prompts_per_step_ = cfg.get_int("rollout.prompts_per_step");
  micro_batch_size_ = cfg.get_int("trainer.micro_batch_size");
  checkpointed_layers_ = checkpointed_layers(cfg);
  val_greedy_ = cfg.get_bool("rollout.val_greedy");
  pad_id_ = pad_id_for(tok);
  prompts_ = open_online_prompts(cfg, tok, policy.cfg, gen_.max_new_tokens, shape, dist);
}

bool OnlineAlgorithm::next_rollout(const GroupFilter* filter) {
  const auto prompts = prompts_.next();
  if (prompts.empty()) return false;
  GenerationOptions gen = gen_;
  gen.seed = step_seed(gen_.seed, step_, dist_.rank(), 0);
  rollout_ = make_rollout(policy_, prompts, gen, tok_, reward_, pad_id_, filter);
  // Dynamic sampling that ran out of prompts before the step was full: the data is done.
  return int64_t(rollout_.prompt_index.empty() ? 0 : rollout_.prompt_index.back() + 1) ==
         int64_t(prompts.size());
}

ValidationSums OnlineAlgorithm::validate() {
  GenerationOptions gen = gen_;
  gen.session = val_session_;
  return validate_policy({prompts_.val.get(), gen, val_greedy_, micro_batch_size_, pad_id_}, policy_,
                         reference_, tok_, reward_, dist_);
}

nlohmann::json OnlineAlgorithm::state() const {
  return {{"position", prompts_.position()}, {"step", step_}};
}

void OnlineAlgorithm::load_state(const nlohmann::json& s) {
  prompts_.sampler.position = s.at("position").get<int64_t>();
  step_ = s.at("step").get<int64_t>();
}

}  // namespace aligner
