// `aligner rm-score`: a reward model's score of each line of a JSONL file, printed in input order
// as {"index", "reward"} (one output) or {"index", "rewards": {name: value}} (attributes). The
// check that a trained reward model ranks what it should, and the scorer for rejection sampling.
#include <algorithm>
#include <numeric>
#include <optional>

#include "algo/rm.h"
#include "commands.h"
#include "core/error.h"
#include "data/packing.h"
#include "data/sequence_data.h"
#include "io/hf_checkpoint.h"
#include "text/chat_template.h"
#include "text/tokenizer.h"

namespace aligner::cli {
namespace {

struct Options {
  std::string model, data, dtype = "float32", device = "auto", chat_template = "auto";
  int64_t batch_size = 8;
  bool no_eos = false;
};

// Each record's tokens: "input_ids" as given, else what scoring_tokens encodes with the model
// folder's tokenizer (loaded only when a record needs it).
std::vector<std::vector<int32_t>> read_sequences(const Options& o, int64_t vocab) {
  std::unique_ptr<Tokenizer> tok;
  std::optional<Encoder> enc;
  return read_token_sequences(o.data, vocab, [&](const nlohmann::json& record, const std::string& where) {
    if (!enc) {
      tok = load_tokenizer(o.model);
      enc = Encoder{tok.get(), resolve_chat_template(o.chat_template, *tok), !o.no_eos};
    }
    return scoring_tokens(record, where, *enc);
  });
}

void run(const Options& o) {
  if (o.batch_size < 1) fail("--batch-size must be at least 1");
  const at::Device device = parse_device_name(o.device, "--device");
  const Transformer m = load_transformer(o.model, device, parse_compute_dtype(o.dtype, device, "--dtype"));
  if (m.cfg.num_labels == 0)
    fail("{} is not a reward model: its config.json names no XxxForSequenceClassification architecture",
         o.model);
  const auto seqs = read_sequences(o, m.cfg.vocab_size);

  // Batches of similar lengths waste little on padding; results are printed in input order.
  std::vector<size_t> order(seqs.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return seqs[a].size() < seqs[b].size(); });
  std::vector<at::Tensor> scores(seqs.size());
  at::NoGradGuard no_grad;
  for (size_t start = 0; start < order.size(); start += size_t(o.batch_size)) {
    const size_t n = std::min<size_t>(size_t(o.batch_size), order.size() - start);
    std::vector<Sequence> batch;
    for (size_t i = 0; i < n; ++i) {
      const auto& ids = seqs[order[start + i]];
      batch.push_back({ids, std::vector<uint8_t>(ids.size(), 0)});
    }
    // Padding is masked out, so any id will do.
    const auto s =
        score_batch(m, collate_padded(batch, int32_t(m.cfg.pad_token_id.value_or(0)))).to(at::kDouble).cpu();
    for (size_t i = 0; i < n; ++i) scores[order[start + i]] = s[int64_t(i)];
  }
  for (size_t i = 0; i < seqs.size(); ++i) {
    nlohmann::ordered_json j = {{"index", i}};
    if (m.cfg.num_labels == 1) {
      j["reward"] = scores[i][0].item<double>();
    } else {
      nlohmann::ordered_json rewards;
      for (int64_t a = 0; a < m.cfg.num_labels; ++a) rewards[m.cfg.labels[a]] = scores[i][a].item<double>();
      j["rewards"] = rewards;
    }
    fmt::print("{}\n", j.dump());
  }
}

}  // namespace

void add_rm_score(CLI::App& app) {
  auto o = std::make_shared<Options>();
  auto* cmd = app.add_subcommand("rm-score", "A reward model's score of each line of a JSONL file");
  cmd->add_option("--model", o->model, "Reward model folder (XxxForSequenceClassification)")->required();
  cmd->add_option(
         "--data", o->data,
         "JSONL: {\"prompt\", \"response\"}, {\"messages\"}, NeMo {\"conversations\"}, {\"text\"} or "
         "{\"input_ids\"} per line")
      ->required();
  cmd->add_option("--batch-size", o->batch_size, "Sequences per forward pass");
  cmd->add_option("--dtype", o->dtype, "float32 | bfloat16");
  cmd->add_option("--device", o->device, "auto | cpu | cuda");
  cmd->add_option("--template", o->chat_template,
                  "Chat template: auto | plain | llama3 | llama2 | chatml | mistral | nemo | steerlm");
  cmd->add_flag("--no-eos", o->no_eos,
                "Do not end plain-string responses and texts with EOS (as data.add_eos=false in training)");
  cmd->callback([o] { run(*o); });
}

}  // namespace aligner::cli
