#include "algo/rollout.h"

#include <chrono>

#include "algo/data_stream.h"
#include "core/error.h"
#include "core/log.h"
#include "text/chat_template.h"

#ifdef ALIGNER_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

namespace aligner {
namespace {

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

at::Tensor at_least_float(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? t : t.to(at::kFloat);
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

Rollout make_rollout(const Transformer& policy, const std::vector<PromptExample>& prompts,
                     const GenerationOptions& opt, const Tokenizer& tok, Reward& reward, int32_t pad_id) {
  std::vector<std::vector<int32_t>> ids;
  ids.reserve(prompts.size());
  for (const auto& p : prompts) ids.push_back(p.input_ids);
  Rollout r;
  auto t0 = std::chrono::steady_clock::now();
  const GenerationResult result = generate(policy, ids, opt);
  r.generation_seconds = seconds_since(t0);
  r.generated_tokens = result.generated_tokens;
  r.batch = collate_generations(ids, result, pad_id, policy.embed.device());

  t0 = std::chrono::steady_clock::now();
  std::vector<RewardQuery> queries;
  queries.reserve(result.sequences.size());
  for (const auto& s : result.sequences) {
    const auto& p = prompts[size_t(s.prompt_index)];
    queries.push_back({p.input_ids, s.tokens, p.text, response_text(s, tok, opt.stop_strings, false).text});
    r.ended.push_back(s.finish == FinishReason::kStop);
    r.response_length.push_back(int64_t(s.tokens.size()));
    r.prompt_index.push_back(s.prompt_index);
  }
  r.scores = reward.score(queries);
  if (r.scores.size() != queries.size())
    fail("the reward gave {} scores for {} responses", r.scores.size(), queries.size());
  r.reward_seconds = seconds_since(t0);
  return r;
}

ForwardInput rollout_rows(const GenerationBatch& b, int64_t begin, int64_t n) {
  const int64_t T = b.attention_mask.narrow(0, begin, n).sum(1).max().item<int64_t>();
  auto cut = [&](const at::Tensor& t) { return t.narrow(0, begin, n).narrow(1, 0, T); };
  return ForwardInput{cut(b.input_ids), cut(b.attention_mask), cut(b.position_ids)};
}

at::Tensor rollout_slice(const at::Tensor& t, const GenerationBatch& b, int64_t begin, int64_t n) {
  const int64_t T = b.attention_mask.narrow(0, begin, n).sum(1).max().item<int64_t>();
  return t.narrow(0, begin, n).narrow(1, 0, T);
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

double peak_memory_gb(at::Device device) {
#ifdef ALIGNER_WITH_CUDA
  if (device.is_cuda()) {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
    return double(stats.allocated_bytes[size_t(c10::CachingAllocator::StatType::AGGREGATE)].peak) / 1e9;
  }
#endif
  return 0;
}

Reference::Reference(const Transformer& policy, bool offload) : offload_(offload) {
  at::NoGradGuard no_grad;
  if (!offload) {
    copy_ = std::make_unique<Transformer>(allocate_transformer(policy.cfg, policy.embed.options()));
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

}  // namespace aligner
