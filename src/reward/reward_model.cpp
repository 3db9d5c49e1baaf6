#include "reward/reward_model.h"

#include <fmt/ranges.h>

#include <algorithm>
#include <chrono>
#include <numeric>

#include "algo/rm.h"
#include "core/error.h"
#include "core/log.h"
#include "data/packing.h"
#include "io/hf_checkpoint.h"
#include "text/chat_template.h"

namespace aligner {
namespace {

// FNV-1a, 64 bits: stable across builds and machines, unlike std::hash.
struct Fnv1a {
  uint64_t h = 14695981039346656037ull;
  void add(int64_t v) {
    for (int i = 0; i < 8; ++i) {
      h ^= uint64_t(v >> (8 * i)) & 0xff;
      h *= 1099511628211ull;
    }
  }
};

class ModelReward final : public Reward {
 public:
  ModelReward(std::unique_ptr<RewardScorer> scorer, bool same_tokenizer)
      : s_(std::move(scorer)), same_tokenizer_(same_tokenizer) {}

  std::vector<double> score(const std::vector<RewardQuery>& queries) override {
    std::vector<std::vector<int32_t>> seqs;
    seqs.reserve(queries.size());
    for (size_t i = 0; i < queries.size(); ++i) {
      const RewardQuery& q = queries[i];
      if (!same_tokenizer_) {
        seqs.push_back(encode_for_scoring(*s_, q.prompt_text, q.response_text));
      } else {
        std::vector<int32_t> ids = q.prompt;
        ids.insert(ids.end(), q.response.begin(), q.response.end());
        for (const int32_t id : ids)
          if (id < 0 || id >= s_->model.cfg.vocab_size)
            fail("reward query {}: token id {} is outside the reward model's vocabulary [0, {}) ({})", i, id,
                 s_->model.cfg.vocab_size, s_->path);
        seqs.push_back(std::move(ids));
      }
      if (seqs.back().empty()) fail("reward query {}: nothing to score (no prompt or response tokens)", i);
    }
    return score_sequences(*s_, std::move(seqs)).rewards;
  }

 private:
  std::unique_ptr<RewardScorer> s_;
  bool same_tokenizer_;
};

}  // namespace

std::string tokenizer_fingerprint(const Tokenizer& tok) {
  static const char* const kProbe =
      "Hello, world! It's 2024-06-30: 3.14159 x 42 = 131.95\n\t  double  spaces, \"quotes\" & <tags>; "
      "naïve café, Größe, 東京タワー, Ελληνικά, 🙂👍 end.";
  Fnv1a f;
  f.add(tok.vocab_size());
  f.add(tok.special().bos.value_or(-1));
  f.add(tok.special().eos.value_or(-1));
  for (const int32_t id : tok.encode(kProbe, false)) f.add(id);
  return fmt::format("{:016x}", f.h);
}

std::unique_ptr<RewardScorer> load_reward_scorer(const RewardModelOptions& opt) {
  if (opt.path.empty()) fail("no reward model folder given");
  if (opt.batch_size < 1) fail("reward model batch size must be at least 1, got {}", opt.batch_size);
  auto s = std::make_unique<RewardScorer>();
  s->path = opt.path;
  s->model = load_transformer(opt.path, opt.device, opt.dtype);
  const ModelConfig& c = s->model.cfg;
  if (c.num_labels == 0)
    fail(
        "{} is a causal LM, not a reward model: its config.json names no XxxForSequenceClassification "
        "architecture",
        opt.path);
  if (opt.attribute_weights.empty()) {
    if (c.num_labels != 1)
      fail("{} has {} outputs ({}); reward.attribute_weights must give one weight per output to combine them",
           opt.path, c.num_labels, fmt::join(c.labels, ", "));
    s->weights = {1.0};
  } else {
    if (int64_t(opt.attribute_weights.size()) != c.num_labels)
      fail("reward.attribute_weights has {} weights but {} has {} outputs ({})", opt.attribute_weights.size(),
           opt.path, c.num_labels, fmt::join(c.labels, ", "));
    s->weights = opt.attribute_weights;
  }
  s->tok = load_tokenizer(opt.path);
  if (s->tok->vocab_size() > c.vocab_size)
    fail("{}: the tokenizer has {} tokens, more than the model's vocab_size {}", opt.path,
         s->tok->vocab_size(), c.vocab_size);
  s->encoder = Encoder{s->tok.get(), resolve_chat_template("plain", *s->tok), true};
  s->fingerprint = tokenizer_fingerprint(*s->tok);
  s->batch_size = opt.batch_size;
  // Padding is masked out and the score read before it, so any valid id will do.
  s->pad_id = int32_t(c.pad_token_id.value_or(0));
  return s;
}

std::vector<int32_t> encode_for_scoring(const RewardScorer& s, const std::string& prompt,
                                        const std::string& response) {
  return scoring_tokens({{"prompt", prompt}, {"response", response}}, "reward query", s.encoder);
}

RewardScores score_sequences(RewardScorer& s, std::vector<std::vector<int32_t>> seqs, int64_t max_tokens) {
  const size_t context = size_t(s.model.cfg.max_position_embeddings);
  for (auto& ids : seqs) {
    if (ids.size() <= context) continue;
    if (!s.warned_truncation.exchange(true))
      log_warn(
          "reward model {}: a sequence of {} tokens is longer than its context of {}; such sequences keep "
          "their last {} tokens",
          s.path, ids.size(), context, context);
    ids.erase(ids.begin(), ids.end() - std::ptrdiff_t(context));
  }
  // Sorted by length, so that a batch wastes little on padding.
  std::vector<size_t> order(seqs.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return seqs[a].size() < seqs[b].size(); });
  RewardScores out;
  out.rewards.resize(seqs.size());
  out.outputs.resize(seqs.size());
  at::NoGradGuard no_grad;
  for (size_t start = 0; start < order.size();) {
    size_t n = 1;
    while (start + n < order.size() && int64_t(n) < s.batch_size &&
           (max_tokens <= 0 || int64_t((n + 1) * seqs[order[start + n]].size()) <= max_tokens))
      ++n;
    std::vector<Sequence> batch;
    for (size_t i = 0; i < n; ++i) {
      const auto& ids = seqs[order[start + i]];
      batch.push_back({ids, std::vector<uint8_t>(ids.size(), 0)});
    }
    const auto t0 = std::chrono::steady_clock::now();
    const auto scores =
        score_batch(s.model, collate_padded(batch, s.pad_id)).to(at::kDouble).cpu().contiguous();
    log_debug("reward model: {} sequences x {} tokens in {:.1f} ms", n, batch.back().input_ids.size(),
              std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    const double* p = scores.data_ptr<double>();
    const size_t labels = s.weights.size();
    for (size_t i = 0; i < n; ++i) {
      const size_t k = order[start + i];
      out.outputs[k].assign(p + i * labels, p + (i + 1) * labels);
      out.rewards[k] = std::inner_product(s.weights.begin(), s.weights.end(), out.outputs[k].begin(), 0.0);
    }
    start += n;
  }
  return out;
}

std::unique_ptr<Reward> load_model_reward(const RewardModelOptions& opt, const Tokenizer& actor_tokenizer) {
  auto s = load_reward_scorer(opt);
  const bool same = s->fingerprint == tokenizer_fingerprint(actor_tokenizer);
  log_info("reward model {}: {} output{}, {}", opt.path, s->model.cfg.num_labels,
           s->model.cfg.num_labels == 1 ? "" : "s",
           same ? "the actor's tokenizer: its token ids are scored as generated"
                : "a tokenizer other than the actor's: prompt and response texts are encoded with its own");
  return std::make_unique<ModelReward>(std::move(s), same);
}

}  // namespace aligner
