// `aligner perplexity`: per-sequence log-likelihood under a model, the check that a model folder
// computes what it should (and the simplest user of the model code). configs/perplexity.yaml is
// its schema.
#include <algorithm>
#include <cmath>
#include <numeric>

#include "command_config.h"
#include "commands.h"
#include "core/error.h"
#include "core/log.h"
#include "data/sequence_data.h"
#include "io/hf_checkpoint.h"
#include "io/jsonl.h"
#include "io/peft_adapter.h"
#include "text/tokenizer.h"
#include "train/run_setup.h"

namespace aligner::cli {
namespace {

// Each line holds `input_ids`, or `text` that the model folder's tokenizer encodes (with the
// special tokens its encode adds by default, BOS for Llama).
std::vector<std::vector<int32_t>> read_sequences(const std::string& path, const std::string& model_dir,
                                                 int64_t vocab) {
  std::unique_ptr<Tokenizer> tokenizer;
  return read_token_sequences(path, vocab, [&](const nlohmann::json& record, const std::string& where) {
    if (!record.contains("text")) fail("{}: missing field \"input_ids\" or \"text\"", where);
    if (!tokenizer) tokenizer = load_tokenizer(model_dir);
    return tokenizer->encode(get_field<std::string>(record, "text", where), true);
  });
}

// Tokens [begin, end) of sequence `seq` in one forward pass, of which those from `first_scored` on
// are scored (predicted from the window's tokens before them).
struct Window {
  size_t seq = 0;
  int64_t begin = 0, end = 0, first_scored = 1;
};

// A sequence that fits the context is one window. A longer one, with a stride, is cut as Hugging
// Face's perplexity guide cuts it: windows of `context` tokens starting every `stride` tokens, each
// scoring the tokens that the window before it did not reach.
std::vector<Window> windows(size_t seq, int64_t n, int64_t context, int64_t stride) {
  std::vector<Window> out;
  int64_t scored_to = 1;  // the first token has nothing to be predicted from
  for (int64_t begin = 0;; begin += stride) {
    const int64_t end = std::min(begin + context, n);
    out.push_back({seq, begin, end, scored_to});
    if (end == n) return out;
    scored_to = end;
  }
}

void run(const Config& cfg) {
  const std::string model_dir = cfg.get_string("model.path"), data = cfg.get_string("data.path");
  const int64_t batch_size = cfg.get_int("batch_size"), stride = cfg.get_int("stride");
  if (batch_size < 1) fail("config key 'batch_size' must be at least 1, got {}", batch_size);
  if (stride < 0) fail("config key 'stride' must be 0 (no windows) or positive, got {}", stride);
  at::Device device = parse_device_name(cfg.get_string("model.device"), "model.device");
  const bool writes = init_inference_ranks(cfg, device);
  const Transformer m =
      load_adapted_model(model_dir, cfg.get_string("model.adapter"), device,
                         parse_compute_dtype(cfg.get_string("model.dtype"), device, "model.dtype"));
  const int64_t context = m.cfg.max_position_embeddings;
  if (stride >= context)
    fail("config key 'stride' must be less than the model's max_position_embeddings ({}), got {}", context,
         stride);
  const auto seqs = read_sequences(data, model_dir, m.cfg.vocab_size);

  std::vector<Window> rows;
  for (size_t i = 0; i < seqs.size(); ++i) {
    const int64_t n = int64_t(seqs[i].size());
    if (n > context && stride == 0)
      fail(
          "{}: {} tokens, more than the model's max_position_embeddings ({}); --stride N (stride=N) scores "
          "it in windows",
          JsonlFile(data).where(int64_t(i)), n, context);
    const auto w = windows(i, n, context, stride);
    rows.insert(rows.end(), w.begin(), w.end());
  }
  // Batches of similar lengths waste little on padding; results are printed in input order.
  std::stable_sort(rows.begin(), rows.end(),
                   [](const Window& a, const Window& b) { return a.end - a.begin < b.end - b.begin; });
  std::vector<double> logprob(seqs.size(), 0.0);

  at::NoGradGuard no_grad;
  for (size_t start = 0; start < rows.size(); start += size_t(batch_size)) {
    const size_t n = std::min<size_t>(size_t(batch_size), rows.size() - start);
    int64_t T = 0;
    for (size_t i = 0; i < n; ++i) T = std::max(T, rows[start + i].end - rows[start + i].begin);
    auto ids = at::zeros({int64_t(n), T}, at::kLong);
    auto mask = at::zeros({int64_t(n), T}, at::kLong);
    auto targets = at::full({int64_t(n), T}, -100, at::kLong);
    for (size_t i = 0; i < n; ++i) {
      const Window& w = rows[start + i];
      const int64_t len = w.end - w.begin;
      const auto& s = seqs[w.seq];
      ids[int64_t(i)].narrow(0, 0, len).copy_(
          at::tensor(std::vector<int32_t>(s.begin() + w.begin, s.begin() + w.end)));
      mask[int64_t(i)].narrow(0, 0, len).fill_(1);
      // Position j predicts token begin + j + 1.
      const int64_t from = w.first_scored - w.begin - 1;
      targets[int64_t(i)]
          .narrow(0, from, len - 1 - from)
          .copy_(ids[int64_t(i)].narrow(0, from + 1, len - 1 - from));
    }
    ForwardInput in{ids.to(device), mask.to(device)};
    auto lp = token_logprobs(m, forward_hidden(m, in), targets.to(device)).sum(1).to(at::kDouble).cpu();
    for (size_t i = 0; i < n; ++i) logprob[rows[start + i].seq] += lp[int64_t(i)].item<double>();
  }

  if (!writes) return;
  double total = 0;
  int64_t predicted = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    fmt::print("{}\n",
               nlohmann::json{{"index", i}, {"tokens", seqs[i].size()}, {"logprob", logprob[i]}}.dump());
    total += logprob[i];
    predicted += int64_t(seqs[i].size()) - 1;
  }
  nlohmann::ordered_json summary = {
      {"summary", true}, {"sequences", seqs.size()}, {"predicted_tokens", predicted}};
  if (predicted > 0) {
    summary["mean_nll"] = -total / double(predicted);
    summary["perplexity"] = std::exp(-total / double(predicted));
  } else {
    // exp(0 / 0) is no number, and 1.0 would claim a perfect model.
    summary["mean_nll"] = nullptr;
    summary["perplexity"] = nullptr;
    log_warn("{}: every sequence is a single token, so no token is predicted and there is no perplexity",
             data);
  }
  fmt::print("{}\n", summary.dump());
}

}  // namespace

void add_perplexity(CLI::App& app) {
  auto* cmd =
      app.add_subcommand("perplexity", "Log-likelihood of each sequence in a JSONL file under a model");
  auto aliases = model_aliases(true);
  aliases.insert(aliases.end(), {{"--data", "data.path", true},
                                 {"--batch-size", "batch_size"},
                                 {"--stride", "stride"},
                                 {"--adapter", "model.adapter"},
                                 {"--tensor-parallel", "model.tensor_parallel"}});
  add_config_options(*cmd, "perplexity", aliases, run);
}

}  // namespace aligner::cli
