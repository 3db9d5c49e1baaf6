// `aligner perplexity`: per-sequence log-likelihood under a model, the check that a model folder
// computes what it should (and the simplest user of the model code).
#include <algorithm>
#include <cmath>
#include <numeric>

#include "commands.h"
#include "core/error.h"
#include "data/sequence_data.h"
#include "io/hf_checkpoint.h"
#include "io/jsonl.h"
#include "text/tokenizer.h"

namespace aligner::cli {
namespace {

struct Options {
  std::string model, data, dtype = "float32", device = "cpu";
  int64_t batch_size = 8;
};

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

void run(const Options& o) {
  if (o.batch_size < 1) fail("--batch-size must be at least 1");
  const at::Device device = parse_device_name(o.device, "--device");
  const Transformer m = load_transformer(o.model, device, parse_compute_dtype(o.dtype, device, "--dtype"));
  const auto seqs = read_sequences(o.data, o.model, m.cfg.vocab_size);

  // Batches of similar lengths waste little on padding; results are printed in input order.
  std::vector<size_t> order(seqs.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return seqs[a].size() < seqs[b].size(); });
  std::vector<double> logprob(seqs.size());

  at::NoGradGuard no_grad;
  for (size_t start = 0; start < order.size(); start += o.batch_size) {
    const size_t n = std::min<size_t>(o.batch_size, order.size() - start);
    int64_t T = 0;
    for (size_t i = 0; i < n; ++i) T = std::max<int64_t>(T, seqs[order[start + i]].size());
    auto ids = at::zeros({(int64_t)n, T}, at::kLong);
    auto mask = at::zeros({(int64_t)n, T}, at::kLong);
    auto targets = at::full({(int64_t)n, T}, -100, at::kLong);
    for (size_t i = 0; i < n; ++i) {
      const auto& s = seqs[order[start + i]];
      const int64_t len = s.size();
      ids[i].narrow(0, 0, len).copy_(at::tensor(s));
      mask[i].narrow(0, 0, len).fill_(1);
      if (len > 1) targets[i].narrow(0, 0, len - 1).copy_(ids[i].narrow(0, 1, len - 1));
    }
    ForwardInput in{ids.to(device), mask.to(device)};
    auto lp = token_logprobs(m, forward_hidden(m, in), targets.to(device)).sum(1).to(at::kDouble).cpu();
    for (size_t i = 0; i < n; ++i) logprob[order[start + i]] = lp[i].item<double>();
  }

  double total = 0;
  int64_t predicted = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    fmt::print("{}\n",
               nlohmann::json{{"index", i}, {"tokens", seqs[i].size()}, {"logprob", logprob[i]}}.dump());
    total += logprob[i];
    predicted += seqs[i].size() - 1;
  }
  const double nll = predicted ? -total / predicted : 0.0;
  fmt::print("{}\n", nlohmann::json{{"summary", true},
                                    {"sequences", seqs.size()},
                                    {"predicted_tokens", predicted},
                                    {"mean_nll", nll},
                                    {"perplexity", std::exp(nll)}}
                         .dump());
}

}  // namespace

void add_perplexity(CLI::App& app) {
  auto o = std::make_shared<Options>();
  auto* cmd =
      app.add_subcommand("perplexity", "Log-likelihood of each sequence in a JSONL file under a model");
  cmd->add_option("--model", o->model, "Hugging Face model folder")->required();
  cmd->add_option("--data", o->data, "JSONL file: {\"input_ids\": [...]} or {\"text\": ...} per line")
      ->required();
  cmd->add_option("--batch-size", o->batch_size, "Sequences per forward pass");
  cmd->add_option("--dtype", o->dtype, "float32 | bfloat16");
  cmd->add_option("--device", o->device, "auto | cpu | cuda");
  cmd->callback([o] { run(*o); });
}

}  // namespace aligner::cli
