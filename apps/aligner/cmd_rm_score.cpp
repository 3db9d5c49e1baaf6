// `aligner rm-score`: a reward model's scores, printed in input order. Lines to score give
// {"index", "reward"} (one output) or {"index", "rewards": {name: value}} (attributes): the scorer
// for rejection sampling. Preference pairs, read as `aligner rm` reads them, give {"index",
// "chosen", "rejected"} per pair and a summary with the accuracy: how a reward model is evaluated.
// configs/rm-score.yaml is the schema.
#include <algorithm>
#include <optional>

#include "algo/data_stream.h"
#include "algo/rm.h"
#include "command_config.h"
#include "commands.h"
#include "core/error.h"
#include "core/log.h"
#include "data/packing.h"
#include "data/preference_data.h"
#include "data/sequence_data.h"
#include "io/hf_checkpoint.h"
#include "text/chat_template.h"
#include "text/tokenizer.h"
#include "train/run_setup.h"

namespace aligner::cli {
namespace {

struct Scoring {
  Transformer model;
  std::string model_dir, data;
  int64_t batch_size = 8;
  int32_t pad_id = 0;  // padding is masked out, so any id will do
  bool writes = true;  // tensor parallel: every rank scores, one prints
};

// A row of scores: the value for a single-output model, else {attribute: value}.
nlohmann::ordered_json by_label(const ModelConfig& c, const std::vector<double>& values) {
  if (c.num_labels == 1) return values[0];
  nlohmann::ordered_json out;
  for (int64_t a = 0; a < c.num_labels; ++a) out[c.labels[size_t(a)]] = values[size_t(a)];
  return out;
}

std::vector<double> row_values(const at::Tensor& row) {
  const auto r = row.to(at::kDouble).cpu().contiguous();
  return {r.data_ptr<double>(), r.data_ptr<double>() + r.numel()};
}

// Each line's tokens: "input_ids" as given, else what scoring_tokens encodes with the model
// folder's tokenizer (loaded only when a line needs it).
void score_sequences(const Scoring& s, const Config& cfg) {
  std::unique_ptr<Tokenizer> tok;
  std::optional<Encoder> enc;
  const auto seqs = read_token_sequences(
      s.data, s.model.cfg.vocab_size, [&](const nlohmann::json& record, const std::string& where) {
        if (!enc) {
          tok = load_tokenizer(s.model_dir);
          enc = Encoder{tok.get(), resolve_chat_template(cfg.get_string("data.template"), *tok),
                        cfg.get_bool("data.add_eos")};
        }
        return scoring_tokens(record, where, *enc);
      });

  const auto scores = score_token_sequences(s.model, seqs, s.batch_size, s.pad_id);
  for (size_t i = 0; i < seqs.size() && s.writes; ++i)
    fmt::print("{}\n", nlohmann::ordered_json{{"index", i},
                                              {s.model.cfg.num_labels == 1 ? "reward" : "rewards",
                                               by_label(s.model.cfg, scores[i])}}
                           .dump());
}

void score_pairs(const Scoring& s, const Config& cfg) {
  DataOptions opt = read_data_options(cfg, s.model.cfg);
  if (opt.max_length == 0) opt.max_length = s.model.cfg.max_position_embeddings;
  const auto tok = load_tokenizer(s.model_dir);
  PreferenceDataset ds = open_preference_dataset(
      s.data, *tok, resolve_chat_template(cfg.get_string("data.template"), *tok), opt);
  const size_t labels = size_t(s.model.cfg.num_labels);
  std::vector<double> chosen_sum(labels), rejected_sum(labels), correct(labels);
  int64_t pairs = 0;
  std::vector<int64_t> index;
  std::vector<PreferenceExample> batch;
  auto flush = [&] {
    if (batch.empty()) return;
    const auto out = score_batch(s.model, collate_preferences(batch, s.pad_id).seqs);
    const int64_t B = int64_t(batch.size());
    for (int64_t i = 0; i < B; ++i) {
      const auto c = row_values(out[i]), r = row_values(out[B + i]);
      for (size_t a = 0; a < labels; ++a) {
        chosen_sum[a] += c[a];
        rejected_sum[a] += r[a];
        correct[a] += c[a] > r[a];
      }
      if (s.writes)
        fmt::print("{}\n", nlohmann::ordered_json{{"index", index[size_t(i)]},
                                                  {"chosen", by_label(s.model.cfg, c)},
                                                  {"rejected", by_label(s.model.cfg, r)}}
                               .dump());
    }
    pairs += B;
    batch.clear();
    index.clear();
  };
  for (int64_t i = 0; i < dataset_size(ds); ++i) {
    auto ex = preference_example(ds, i);
    if (!ex) continue;  // dropped for length, or a bad line skipped
    batch.push_back(std::move(*ex));
    index.push_back(i);
    if (int64_t(batch.size()) == s.batch_size) flush();
  }
  flush();
  const auto report = data_report(ds.stats, s.data, opt.max_length);
  if (!report.empty()) log_info("{}", report);  // the report says "warning:" itself
  if (pairs == 0) fail("{}: no pairs left to score", s.data);

  // The metrics `aligner rm` reports for its validation data, under the same names.
  auto mean = [&](const std::vector<double>& sums) {
    std::vector<double> m;
    for (double v : sums) m.push_back(v / double(pairs));
    return by_label(s.model.cfg, m);
  };
  std::vector<double> margin_sum(labels);
  for (size_t a = 0; a < labels; ++a) margin_sum[a] = chosen_sum[a] - rejected_sum[a];
  if (s.writes)
    fmt::print("{}\n", nlohmann::ordered_json{{"summary", true},
                                              {"pairs", pairs},
                                              {"accuracy", mean(correct)},
                                              {"reward_chosen_mean", mean(chosen_sum)},
                                              {"reward_rejected_mean", mean(rejected_sum)},
                                              {"reward_margin", mean(margin_sum)}}
                           .dump());
}

// Lines to score or pairs, as data.format says; auto looks at the first line.
bool reads_pairs(const std::string& format, const std::string& path) {
  if (format == "sequences") return false;
  if (format != "auto") {
    if (format != "trl" && format != "nemo" && format != "hh" && format != "text_pairs")
      fail("config key 'data.format' expects auto, sequences, trl, nemo, hh or text_pairs, got '{}'", format);
    return true;
  }
  const auto first = JsonlFile(path).read(0);
  return first.contains("chosen") || first.contains("chosen_response");
}

void run(const Config& cfg) {
  Scoring s;
  s.model_dir = cfg.get_string("model.path");
  s.data = cfg.get_string("data.path");
  s.batch_size = cfg.get_int("batch_size");
  if (s.batch_size < 1) fail("config key 'batch_size' must be at least 1, got {}", s.batch_size);
  const bool pairs = reads_pairs(cfg.get_string("data.format"), s.data);
  at::Device device = parse_device_name(cfg.get_string("model.device"), "model.device");
  s.writes = init_inference_ranks(cfg, device);
  s.model = load_transformer(s.model_dir, device,
                             parse_compute_dtype(cfg.get_string("model.dtype"), device, "model.dtype"));
  if (s.model.cfg.num_labels == 0)
    fail("{} is not a reward model: its config.json names no XxxForSequenceClassification architecture",
         s.model_dir);
  s.pad_id = int32_t(s.model.cfg.pad_token_id.value_or(0));
  at::NoGradGuard no_grad;
  if (pairs)
    score_pairs(s, cfg);
  else
    score_sequences(s, cfg);
}

}  // namespace

void add_rm_score(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "rm-score", "A reward model's score of each line of a JSONL file, or its accuracy on preference pairs");
  auto aliases = model_aliases(true);
  aliases.insert(aliases.end(), {{"--data", "data.path", true},
                                 {"--batch-size", "batch_size"},
                                 {"--template", "data.template"},
                                 {"--no-eos", "data.add_eos", false, "false"},
                                 {"--tensor-parallel", "model.tensor_parallel"}});
  add_config_options(*cmd, "rm-score", aliases, run);
}

}  // namespace aligner::cli
