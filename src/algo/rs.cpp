#include "algo/rs.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <memory>
#include <numeric>
#include <optional>

#include "algo/data_stream.h"
#include "algo/rollout.h"
#include "core/error.h"
#include "core/log.h"
#include "core/progress.h"
#include "data/common.h"
#include "data/packing.h"
#include "gen/generation_config.h"
#include "io/hf_checkpoint.h"
#include "train/run_setup.h"
#include "train/trainer.h"

namespace aligner {
namespace fs = std::filesystem;

std::vector<int64_t> select_top_n(const std::vector<double>& rewards, int64_t group, int64_t top_n) {
  if (group < 1 || top_n < 1 || top_n > group || int64_t(rewards.size()) % group != 0)
    fail("select_top_n: {} rewards do not make groups of {} to keep {} of", rewards.size(), group, top_n);
  // NaN compares false both ways, which would break the ordering.
  auto key = [&](int64_t i) { return std::isnan(rewards[size_t(i)]) ? -INFINITY : rewards[size_t(i)]; };
  std::vector<int64_t> out;
  std::vector<int64_t> order(size_t(group), 0);
  for (int64_t start = 0; start < int64_t(rewards.size()); start += group) {
    std::iota(order.begin(), order.end(), start);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return key(a) > key(b); });
    out.insert(out.end(), order.begin(), order.begin() + top_n);
  }
  return out;
}

namespace {

struct RsOptions {
  int64_t prompts_per_step = 0, samples_per_prompt = 4, top_n = 1;
  std::optional<double> min_reward;
};

RsOptions read_rs_options(const Config& cfg) {
  RsOptions o;
  o.prompts_per_step = cfg.get_int("rollout.prompts_per_step");
  o.samples_per_prompt = cfg.get_int("rollout.samples_per_prompt");
  o.top_n = cfg.get_int("rs.top_n");
  for (const char* key : {"rollout.prompts_per_step", "rollout.samples_per_prompt", "rs.top_n"})
    if (cfg.get_int(key) < 1) fail("config key '{}' must be at least 1, got {}", key, cfg.get_int(key));
  if (o.top_n > o.samples_per_prompt)
    fail(
        "config key 'rs.top_n' ({}) must not exceed rollout.samples_per_prompt ({}), the responses it keeps "
        "from",
        o.top_n, o.samples_per_prompt);
  if (const std::string s = cfg.get_string("rs.min_reward"); !s.empty()) {
    size_t used = 0;
    double v = NAN;
    try {
      v = std::stod(s, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used == 0 || used != s.size() || !std::isfinite(v))
      fail("config key 'rs.min_reward' expects a number or null, got '{}'", s);
    o.min_reward = v;
  }
  return o;
}

class Rs final : public OnlineAlgorithm {
 public:
  Rs(const Config& cfg, const RsOptions& o, const GenerationOptions& gen, const Tokenizer& tok,
     Transformer& policy, Reward& reward, dist::Dist& dist)
      : OnlineAlgorithm(cfg, gen, {o.top_n, "rs.top_n", 1, ""}, tok, policy, reward, nullptr, dist), o_(o) {}

  // The trainer's global batch: the kept responses of one step on all ranks.
  int64_t global_batch_size() const { return o_.prompts_per_step * o_.top_n; }

  bool next_step(int64_t n) override {
    if (!next_rollout()) return false;
    const auto& scores = rollout_.scores;
    const int64_t N = int64_t(scores.size());
    const auto kept = select_top_n(scores, o_.samples_per_prompt, o_.top_n);
    if (int64_t(kept.size()) != n * micro_batch_size_)
      fail("rejection sampling: {} responses kept, the step expects {}", kept.size(), n * micro_batch_size_);

    // Which responses train: the kept ones, less those below min_reward. Those stay in their
    // micro-batches with weight 0, so that every rank runs the same micro-batches whatever passes.
    std::vector<float> weight(size_t(N), 0.0f);
    double trained = 0, trained_reward = 0;
    for (int64_t k : kept)
      if (!o_.min_reward || scores[size_t(k)] >= *o_.min_reward) {
        weight[size_t(k)] = 1;
        trained += 1;
        trained_reward += scores[size_t(k)];
      }
    const auto& b = rollout_.batch;
    weight_ = at::tensor(weight).to(b.response_mask.device());
    const auto tokens = (b.response_mask.sum(1) * weight_).to(at::kCPU, at::kDouble).contiguous();
    micro_rows_.clear();
    units_.clear();
    for (int64_t s = 0; s < int64_t(kept.size()); s += micro_batch_size_) {
      const std::vector<int64_t> rows(kept.begin() + s, kept.begin() + s + micro_batch_size_);
      double units = 0;
      for (int64_t r : rows) units += tokens.data_ptr<double>()[r];
      micro_rows_.push_back(at::tensor(rows, at::TensorOptions().dtype(at::kLong)));
      units_.push_back(units);
    }

    // One collective: the loss tokens of all ranks, and each rank's best reward at its own position.
    const int world = dist_.world_size();
    std::vector<double> sums(size_t(1 + world), 0.0);
    sums[0] = std::accumulate(units_.begin(), units_.end(), 0.0);
    sums[size_t(1 + dist_.rank())] = *std::max_element(scores.begin(), scores.end());
    sums = dist_.sum(sums);
    // When no response of any rank reaches min_reward the step has nothing to learn, but the trainer
    // divides by the global batch's loss tokens: one unit keeps that finite while the loss, every
    // weight 0, stays 0 (the update then moves the weights only by AdamW's momentum and decay).
    if (sums[0] == 0) units_[0] = 1;

    double length = 0, ended = 0;
    for (int64_t k = 0; k < N; ++k) {
      length += double(rollout_.response_length[size_t(k)]);
      ended += rollout_.ended[size_t(k)];
    }
    // Sums and counts over this rank's responses, which the trainer adds over the ranks.
    rollout_sums_ = {
        {"reward_mean", std::accumulate(scores.begin(), scores.end(), 0.0), double(N)},
        {"reward_kept_mean", trained_reward, trained},
        {"kept_fraction", trained, double(N)},
        {"response_length", length, double(N)},
        {"ended_fraction", ended, double(N)},
    };
    step_values_ = rank_metrics(rollout_, rollout_.reward_seconds, policy_.embed.device());
    step_values_.emplace_back("reward_max", *std::max_element(sums.begin() + 1, sums.end()));
    return true;
  }

  double units(int64_t i) const override { return units_.at(size_t(i)); }

  // The SFT loss: the negative log-likelihood summed over the response tokens of the rows that train.
  LossSums loss(int64_t i) override {
    const auto& rows = micro_rows_.at(size_t(i));
    auto in = gather_rows(rollout_.batch, rows);
    in.checkpointed_layers = checkpointed_layers_;
    auto take = [&](const at::Tensor& t) { return take_rows(t, rows, in); };
    const auto mask =
        take(rollout_.batch.response_mask) * weight_.index_select(0, rows.to(weight_.device())).unsqueeze(1);
    const auto lp = labelled_logprobs(policy_, in, take(rollout_.batch.labels), false).logprobs;
    LossSums out;
    out.loss = -(lp * mask).sum();
    out.units = units(i);
    out.tokens = in.attention_mask.sum().item<int64_t>();
    // The rollout's numbers, once per rank per step.
    for (const auto& m : rollout_sums_) out.metrics.push_back(i == 0 ? m : Metric{m.name, 0, 0});
    add_step_metrics(out.metrics, step_values_, i);
    return out;
  }

 private:
  RsOptions o_;
  at::Tensor weight_;                   // [N]: 1 for the responses that train, else 0
  std::vector<at::Tensor> micro_rows_;  // per micro-batch: its rows of the rollout (CPU)
  std::vector<double> units_;           // per micro-batch: its loss tokens
  std::vector<Metric> rollout_sums_;
  NamedValues step_values_;  // the same on every rank, or this rank's (timings)
};

// ---- rs.generate_only ----

// Passes the queries through and keeps them: make_rollout scores the texts that selected.jsonl needs.
class RecordingReward final : public Reward {
 public:
  explicit RecordingReward(Reward& inner) : inner_(inner) {}
  std::vector<double> score(const std::vector<RewardQuery>& queries) override {
    queries_ = queries;
    return inner_.score(queries);
  }
  const std::vector<RewardQuery>& queries() const { return queries_; }

 private:
  Reward& inner_;
  std::vector<RewardQuery> queries_;
};

// A kept response as `aligner sft` reads it: {"input": the prompt as the line gave it (the fields
// that data/prompt_data.h reads, in its order), "output": the response}. A chat prompt is the list of
// its messages up to the last user turn, which sft renders with the same template as the rollout
// did, and trains on the response alone (in a "messages" line sft would train on the earlier replies
// too); a text prompt is the string, tokenized by sft as the prompt reader tokenizes it.
nlohmann::ordered_json sft_line(const nlohmann::json& record, const std::string& response,
                                const std::string& where, ChatFormat format) {
  std::optional<Conversation> chat;
  if (record.contains("messages")) {
    chat = parse_messages(record["messages"], where, "messages", false);
  } else if (record.contains("conversations")) {
    chat = parse_nemo_conversation(record, where, format, false);
  } else {
    for (const char* key : {"prompt", "text", "input"}) {
      if (!record.contains(key)) continue;
      TextOrChat p = parse_text_or_chat(record[key], where, key, false);
      if (!p.is_chat) return {{"input", p.text}, {"output", response}};
      chat = std::move(p.chat);
      break;
    }
  }
  if (!chat) fail("{}: not a prompt record", where);
  while (!chat->messages.empty() && chat->messages.back().role == "assistant") chat->messages.pop_back();
  auto messages = nlohmann::ordered_json::array();
  if (chat->system) messages.push_back({{"role", "system"}, {"content", *chat->system}});
  for (const Message& m : chat->messages) {
    nlohmann::ordered_json j = {{"role", m.role}, {"content", m.content}};
    if (!m.label.empty()) j["label"] = m.label;
    messages.push_back(std::move(j));
  }
  return {{"input", std::move(messages)}, {"output", response}};
}

// Every prompt of data.train sampled and scored once, rollout.prompts_per_step prompts at a time;
// each prompt's kept responses go to OUTPUT_DIR/selected.jsonl, written under another name and
// renamed when whole.
void generate_selected(const Config& cfg) {
  const auto o = read_rs_options(cfg);
  GenerationOptions gen =
      read_generation_options(cfg, "rollout.max_new_tokens", "rollout.samples_per_prompt");
  if (cfg.get_string("model.path").empty()) fail("config key 'model.path' must be set");
  const std::string out_dir = cfg.get_string("output_dir");
  if (out_dir.empty()) fail("config key 'output_dir' must be set");
  const fs::path out_path = fs::path(out_dir) / "selected.jsonl";
  if (fs::exists(out_path) && !cfg.get_bool("overwrite"))
    fail("{} exists; overwrite=true replaces it", out_path.string());
  check_reward_config(cfg);
  auto ctx = init_run(cfg);
  if (ctx.dist.world_size() > 1 || process_tensor_parallel())
    fail(
        "rs.generate_only runs in one process, not {} ranks: start it without aligner launch, torchrun or "
        "srun (and trainer.tensor_parallel=1)",
        ctx.dist.world_size() * (process_tensor_parallel() ? process_tensor_parallel()->size() : 1));
  const auto dtype = parse_compute_dtype(cfg.get_string("model.dtype"), ctx.device, "model.dtype");
  const Policy policy = load_policy(cfg.get_string("model.path"), "model.path", ctx.device, dtype);
  gen.tokenizer = policy.tok.get();
  check_generation_options(gen);
  PromptDataset ds =
      open_rollout_prompts(cfg, "data.train", *policy.tok, policy.model.cfg, gen.max_new_tokens);
  if (ds.stats.layouts.count("input_ids"))
    fail(
        "data.train {}: {} prompts are token ids (input_ids), which aligner sft cannot read back; give them "
        "as text, prompt or messages for rs.generate_only",
        ds.file.path(), ds.stats.layouts.at("input_ids"));
  auto reward = make_reward(cfg, *policy.tok, ctx.device, dtype);
  RecordingReward recorder(*reward);
  const int32_t pad_id = pad_id_for(*policy.tok);

  fs::create_directories(out_dir);
  fs::path partial = out_path;
  partial += ".partial";
  std::ofstream out(partial);
  if (!out) fail("cannot write {}", partial.string());

  const int64_t size = dataset_size(ds);
  const int64_t total = (size - ds.stats.dropped - ds.stats.bad_lines) * o.samples_per_prompt;
  JobProgress progress(total);
  int64_t finished = 0, tokens = 0;
  auto report = [&](int64_t done, int64_t generated, bool always) {
    report_generation(progress, done, total, generated, always);
  };

  int64_t prompts = 0, written = 0, blank = 0, below = 0, chunk_index = 0;
  double reward_sum = 0, written_sum = 0;
  std::vector<Indexed<PromptExample>> chunk;
  auto flush = [&] {
    if (chunk.empty()) return;
    GenerationOptions g = gen;
    g.seed = step_seed(gen.seed, chunk_index++, 0, 0);
    g.on_step = [&](int64_t n, int64_t t) { report(finished + n, tokens + t, false); };
    const Rollout r = make_rollout(policy.model, examples_of(chunk), g, *policy.tok, recorder, pad_id);
    finished += int64_t(r.scores.size());
    tokens += r.generated_tokens;
    for (double s : r.scores) reward_sum += s;
    for (int64_t k : select_top_n(r.scores, o.samples_per_prompt, o.top_n)) {
      const double score = r.scores[size_t(k)];
      if (o.min_reward && !(score >= *o.min_reward)) {
        ++below;
        continue;
      }
      // sft refuses an empty response.
      const std::string& text = recorder.queries()[size_t(k)].response_text;
      if (is_blank(text)) {
        ++blank;
        continue;
      }
      const auto& prompt = chunk[size_t(r.prompt_index[size_t(k)])];
      auto line = sft_line(prompt.example.record, text, ds.file.where(prompt.index), ds.tmpl.format);
      line["reward"] = score;
      line["prompt_index"] = prompt.index;
      // A response cut inside a UTF-8 sequence decodes to invalid UTF-8, which JSON cannot hold.
      out << line.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace) << '\n';
      ++written;
      written_sum += score;
    }
    prompts += int64_t(chunk.size());
    chunk.clear();
  };
  for (int64_t i = 0; i < size; ++i) {
    if (auto ex = prompt_example(ds, i)) chunk.push_back({i, std::move(*ex)});
    if (int64_t(chunk.size()) == o.prompts_per_step) flush();
  }
  flush();
  report(finished, tokens, true);
  out.close();
  if (!out) fail("error writing {}", partial.string());
  fs::rename(partial, out_path);
  if (below > 0) log_info("{} kept responses below rs.min_reward ({}) left out", below, *o.min_reward);
  if (blank > 0)
    log_warn("{} kept responses were empty and left out: aligner sft cannot train on them", blank);
  log_info(
      "wrote {} responses to {} prompts to {}: mean reward {:.4f} of all {} samples, {:.4f} of those written",
      written, prompts, out_path.string(), finished > 0 ? reward_sum / double(finished) : 0.0, finished,
      written > 0 ? written_sum / double(written) : 0.0);
}

}  // namespace

void run_rs(const Config& cfg) {
  if (cfg.get_bool("rs.generate_only")) return generate_selected(cfg);
  auto opt = read_trainer_options(cfg);
  const auto optim = read_optimizer_settings(cfg, "optim", "trainer.grad_clip");
  if (cfg.get_string("model.path").empty()) fail("config key 'model.path' must be set");
  // Every key is checked before the models load.
  const auto o = read_rs_options(cfg);
  const auto gen = read_generation_options(cfg, "rollout.max_new_tokens", "rollout.samples_per_prompt");
  check_reward_config(cfg);

  auto ctx = init_run(cfg);
  const auto dtype = parse_compute_dtype(cfg.get_string("model.dtype"), ctx.device, "model.dtype");
  Policy policy = load_policy(cfg.get_string("model.path"), "model.path", ctx.device, dtype);
  auto module = trainable_model(policy.model, cfg, optim, cfg.get_string("model.path"));
  auto reward = make_reward(cfg, *policy.tok, ctx.device, dtype);
  Rs algo(cfg, o, gen, *policy.tok, policy.model, *reward, ctx.dist);
  opt.global_batch_size = algo.global_batch_size();
  train(cfg, opt, {module}, algo, ctx.dist);
}

}  // namespace aligner
