#include "algo/steerlm_label.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <optional>

#include "algo/rm.h"
#include "core/error.h"
#include "core/log.h"
#include "core/progress.h"
#include "data/attribute_data.h"
#include "data/common.h"
#include "io/hf_checkpoint.h"
#include "io/jsonl.h"
#include "io/resumable_jsonl.h"

namespace aligner {

const char* const kNemoSteerlmSystemPrompt =
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.";

namespace {

// What the reward model reads for a reply.
enum class ScoredText {
  kNemo,  // NeMo's text: its system prompt, the turns up to the reply, then "<extra_id_2>"
  kChat,  // the line's own conversation up to the reply, as rm-score renders a chat
};

ScoredText parse_scored_text(const std::string& name) {
  if (name == "nemo") return ScoredText::kNemo;
  if (name == "chat") return ScoredText::kChat;
  fail("config key 'data.format' expects nemo or chat, got '{}'", name);
}

// A line to label: its record as read (key order kept, for writing it back) and its turns.
struct Line {
  std::string where;  // "path:line"
  nlohmann::ordered_json record;
  std::string field;            // "conversations" or "messages"
  Conversation conv;            // the turns, without a leading system turn
  std::vector<size_t> replies;  // conv.messages indices of the assistant turns
  size_t first_message = 0;     // index in record[field] of conv.messages[0]
};

Line read_line(const JsonlFile& file, int64_t i) {
  const std::string where = file.where(i);
  const nlohmann::json r = file.read(i);
  Line line;
  line.where = where;
  if (r.contains("conversations")) {
    line.field = "conversations";
    ChatFormat format = ChatFormat::kNemo;  // the labels are what is written, not read
    line.conv = parse_nemo_conversation(r, where, format, false);
  } else if (r.contains("messages")) {
    line.field = "messages";
    line.conv = parse_messages(r["messages"], where, "messages", false);
  } else {
    fail(
        "{}: nothing to label: expected NeMo's \"conversations\" (with \"system\" and \"mask\") or "
        "\"messages\"",
        where);
  }
  // The parsers drop only a leading system turn.
  line.first_message = r[line.field].size() - line.conv.messages.size();
  for (size_t m = 0; m < line.conv.messages.size(); ++m)
    if (line.conv.messages[m].role == "assistant") line.replies.push_back(m);
  if (line.replies.empty()) fail("{}: field \"{}\": no assistant turn to label", where, line.field);
  line.record = nlohmann::ordered_json::parse(file.read_text(i));
  return line;
}

// The line's record with its replies' labels set to `labels`, in order.
nlohmann::ordered_json with_labels(const Line& line, const std::vector<std::string>& labels) {
  nlohmann::ordered_json out = line.record;
  for (size_t k = 0; k < line.replies.size(); ++k)
    out[line.field][line.first_message + line.replies[k]]["label"] = labels[k];
  return out;
}

// What the reward model scores for reply `m` (an index into conv.messages), as a record that
// scoring_tokens reads: the conversation up to and including the reply.
nlohmann::json scored_record(const Conversation& conv, size_t m, ScoredText how) {
  if (how == ScoredText::kNemo) {
    // attribute_annotate.py's text, and the layout of the regression data that
    // process_to_regression_format.py makes from labelled SFT data: the reward model's score is
    // read where the reply's label would start.
    std::string text = "<extra_id_0>System\n" + std::string(kNemoSteerlmSystemPrompt) + "\n";
    for (size_t k = 0; k <= m; ++k) {
      const Message& msg = conv.messages[k];
      text += (msg.role == "user" ? "<extra_id_1>User\n" : "<extra_id_1>Assistant\n") + msg.content + "\n";
    }
    return {{"text", text + "<extra_id_2>"}};
  }
  nlohmann::json messages = nlohmann::json::array();
  if (conv.system) messages.push_back({{"role", "system"}, {"content", *conv.system}});
  for (size_t k = 0; k <= m; ++k)
    messages.push_back({{"role", conv.messages[k].role}, {"content", conv.messages[k].content}});
  return {{"messages", messages}};
}

// The names of the model's outputs: the `attributes` key, else the model's own. Each is written
// into labels, so it must be a name a label string can hold.
std::vector<std::string> output_names(const Config& cfg, const ModelConfig& c, const std::string& model_dir) {
  std::vector<std::string> names = cfg.get_string_list("attributes");
  std::string source = "config key 'attributes'";
  if (names.empty()) {
    names = c.labels;
    source = model_dir + "/config.json id2label";
    bool unnamed = true;
    for (size_t a = 0; a < names.size(); ++a) unnamed = unnamed && names[a] == fmt::format("LABEL_{}", a);
    if (unnamed) {
      std::string nemo;
      for (const auto& n : nemo_attributes()) nemo += (nemo.empty() ? "" : ",") + n;
      fail(
          "{}: the reward model's {} outputs have no attribute names (config.json id2label gives LABEL_0, "
          "...); name them in order with attributes=[...] (NeMo's nine: [{}])",
          model_dir, names.size(), nemo);
    }
  } else if (int64_t(names.size()) != c.num_labels) {
    fail("config key 'attributes': {} names for the {} outputs of the reward model {}", names.size(),
         c.num_labels, model_dir);
  }
  for (size_t a = 0; a < names.size(); ++a) {
    if (names[a].empty() || names[a].find_first_of(",: \t\r\n") != std::string::npos)
      fail("{}: attribute name \"{}\" cannot be written in a label (empty, or holds ',', ':' or a space)",
           source, names[a]);
    if (std::find(names.begin(), names.begin() + int64_t(a), names[a]) != names.begin() + int64_t(a))
      fail("{}: attribute \"{}\" is named twice", source, names[a]);
  }
  return names;
}

// How many lines of `out_path` a previous run of this input wrote, complete: a partial last line
// (the run stopped while writing it) is cut off the file. A line that is not what this input gives
// is an error, so that a different input's labels are never continued.
int64_t lines_done(const std::string& out_path, const JsonlFile& input) {
  return read_complete_lines(out_path, [&](int64_t number, const std::string& text) {
    const std::string where = fmt::format("{}:{}", out_path, number);
    const int64_t i = number - 1;
    if (i == input.size())
      fail("{}: more lines than the {} of {}: not this input's labels; remove it or give another --out",
           where, input.size(), input.path());
    const Line line = read_line(input, i);
    std::optional<nlohmann::ordered_json> written;
    try {
      written = nlohmann::ordered_json::parse(text);
    } catch (const nlohmann::json::exception&) {
    }
    // The labels it holds, put on the input's line, must give it back.
    std::vector<std::string> labels;
    if (written && written->is_object() && written->contains(line.field)) {
      const nlohmann::ordered_json& turns = written->at(line.field);
      for (size_t k = 0; k < line.replies.size(); ++k) {
        const size_t t = line.first_message + line.replies[k];
        if (!turns.is_array() || t >= turns.size() || !turns[t].is_object()) break;
        const auto label = turns[t].find("label");
        if (label == turns[t].end() || !label->is_string()) break;
        labels.push_back(label->get<std::string>());
      }
    }
    if (labels.size() != line.replies.size() || with_labels(line, labels) != *written)
      fail("{}: not the labelled {}: not this input's labels; remove it or give another --out", where,
           input.where(i));
  });
}

}  // namespace

std::string steerlm_label_of_scores(const std::vector<std::string>& attributes,
                                    const std::vector<double>& scores) {
  std::vector<float> values(attributes.size());
  for (size_t a = 0; a < attributes.size(); ++a) {
    if (!std::isfinite(scores.at(a))) fail("the reward model's \"{}\" score is {}", attributes[a], scores[a]);
    values[a] = float(std::nearbyint(std::clamp(scores[a], 0.0, 4.0)));  // half to even, as Python
  }
  return attribute_label_text(attributes, values, std::vector<uint8_t>(attributes.size(), 1));
}

void run_steerlm_label(const Config& cfg) {
  const std::string model_dir = cfg.get_string("model.path"), data = cfg.get_string("data.path"),
                    out_path = cfg.get_string("out");
  const ScoredText how = parse_scored_text(cfg.get_string("data.format"));
  const int64_t batch_size = cfg.get_int("batch_size");
  if (batch_size < 1) fail("config key 'batch_size' must be at least 1, got {}", batch_size);
  const std::string truncation = cfg.get_string("data.truncation");
  if (truncation != "truncate_left" && truncation != "error")
    fail("config key 'data.truncation' expects truncate_left or error, got '{}'", truncation);

  // Every line is read once before the model is loaded: a bad one is found now, not hours in.
  const JsonlFile input(data);
  if (std::filesystem::exists(out_path) && std::filesystem::equivalent(out_path, data))
    fail("--out {} is the input file; give another path", out_path);
  const int64_t done = lines_done(out_path, input);
  int64_t replies_total = 0;
  for (int64_t i = done; i < input.size(); ++i) replies_total += int64_t(read_line(input, i).replies.size());
  if (done == input.size()) {
    log_info("{}: all {} lines of {} are labelled already", out_path, done, data);
    return;
  }
  if (done > 0)
    log_info("{}: {} of {} lines labelled by a previous run; going on from there", out_path, done,
             input.size());

  const at::Device device = parse_device_name(cfg.get_string("model.device"), "model.device");
  const Transformer model = load_transformer(
      model_dir, device, parse_compute_dtype(cfg.get_string("model.dtype"), device, "model.dtype"));
  if (model.cfg.num_labels == 0)
    fail("{} is not a reward model: its config.json names no XxxForSequenceClassification architecture",
         model_dir);
  const std::vector<std::string> attributes = output_names(cfg, model.cfg, model_dir);
  const auto tok = load_tokenizer(model_dir);
  check_tokenizer_fits(*tok, model.cfg.vocab_size, model_dir);
  const Encoder enc{tok.get(), resolve_chat_template(cfg.get_string("data.template"), *tok),
                    cfg.get_bool("data.add_eos")};
  int64_t max_length = cfg.get_int("data.max_length");
  if (max_length == 0) max_length = model.cfg.max_position_embeddings;
  if (max_length < 2) fail("config key 'data.max_length' must be at least 2 (or 0), got {}", max_length);
  const int32_t pad_id = int32_t(model.cfg.pad_token_id.value_or(0));

  std::ofstream out(out_path, std::ios::binary | std::ios::app);
  if (!out) fail("cannot write {}", out_path);
  at::NoGradGuard no_grad;
  std::vector<Line> group;
  std::vector<std::vector<int32_t>> seqs;  // the group's replies' tokens, in order
  int64_t lines_written = done, replies_done = 0, truncated = 0;
  JobProgress progress(replies_total);
  auto report = [&](bool always) {
    progress.update(replies_done, always, [&](double s, double eta) {
      return fmt::format("labelled {}/{} lines, {}/{} replies, {:.1f} replies/s, ETA {}", lines_written,
                         input.size(), replies_done, replies_total, double(replies_done) / std::max(s, 1e-9),
                         format_duration(eta));
    });
  };
  auto flush = [&] {
    const auto scores = score_token_sequences(model, seqs, batch_size, pad_id);
    size_t next = 0;
    for (const Line& line : group) {
      std::vector<std::string> labels;
      for (size_t k = 0; k < line.replies.size(); ++k) {
        try {
          labels.push_back(steerlm_label_of_scores(attributes, scores[next++]));
        } catch (const Error& e) {
          fail("{}: reply {}: {}", line.where, k + 1, e.what());
        }
      }
      out << with_labels(line, labels).dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace)
          << '\n';
    }
    out.flush();
    if (!out) fail("error writing {}", out_path);
    lines_written += int64_t(group.size());
    replies_done += int64_t(seqs.size());
    group.clear();
    seqs.clear();
    report(false);
  };
  for (int64_t i = done; i < input.size(); ++i) {
    const std::string where = input.where(i);
    Line line = read_line(input, i);
    for (size_t k = 0; k < line.replies.size(); ++k) {
      Sequence seq{scoring_tokens(scored_record(line.conv, line.replies[k], how), where, enc), {}};
      if (int64_t(seq.input_ids.size()) > max_length) {
        if (truncation == "error")
          fail(
              "{}: reply {} (field \"{}[{}]\"): {} tokens up to it, more than data.max_length={}; "
              "data.truncation=truncate_left keeps its last tokens",
              where, k + 1, line.field, line.first_message + line.replies[k], seq.input_ids.size(),
              max_length);
        seq.loss_mask.assign(seq.input_ids.size(), 0);
        int64_t prompt_length = int64_t(seq.input_ids.size());
        fit_length({&seq}, prompt_length, max_length, Truncation::kTruncateLeft, enc.tmpl.bos);
        ++truncated;
      }
      seqs.push_back(std::move(seq.input_ids));
    }
    group.push_back(std::move(line));
    if (int64_t(seqs.size()) >= batch_size) flush();
  }
  if (!group.empty()) flush();
  report(true);
  if (truncated > 0)
    log_warn("{} replies had more than data.max_length={} tokens up to them: their first tokens were cut",
             truncated, max_length);
  log_info("wrote {} labelled lines to {}", input.size() - done, out_path);
}

}  // namespace aligner
