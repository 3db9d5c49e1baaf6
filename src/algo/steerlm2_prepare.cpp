// `aligner steerlm2 prepare`: SteerLM 2.0's training data from prompt lines. Per prompt x and
// attribute string a, gen.num_samples responses y_i sampled from the SteerLM model Q'(y|a,x)
// (model.path), and per response the three log-probabilities that the loss weighs it by:
//   log Q'(y|a,x)   model.path on the prompt with the attribute line, summed over the response's
//                   tokens, on exactly the tokens `aligner steerlm2` trains on (data.max_length,
//                   data.truncation), so that b' starts uniform
//   log P(y|x)      unconditional_model (the SFT model) on the prompt without the attribute line
//   log P(a|x,y)    the attribute model's predictions for the conversation, each label value
//                   scored by attribute_log_prob (algo/steerlm2.h)
// The models are loaded one after the other, each freed before the next.
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <optional>

#include "algo/data_stream.h"
#include "algo/dpo.h"
#include "algo/rm.h"
#include "algo/steerlm2.h"
#include "core/error.h"
#include "core/log.h"
#include "data/packing.h"
#include "data/steerlm2_data.h"
#include "dist/process_group.h"
#include "gen/engine.h"
#include "gen/generation_config.h"
#include "io/hf_checkpoint.h"
#include "model/config.h"
#include "text/utf8.h"
#include "train/run_setup.h"

namespace aligner {
namespace {

namespace fs = std::filesystem;

// NeMo's turn start, which ends a reply (text/chat_template.h render_nemo).
constexpr const char* kEndOfReply = "<extra_id_1>";

struct PromptLine {
  std::string where;
  nlohmann::json record;
  Steerlm2Prompt prompt;
  std::vector<int32_t> ids;  // the prompt with its attribute line, for sampling
};

// The attribute model's output names: attribute_model.attributes, else its config.json's id2label.
std::vector<std::string> attribute_names(const Config& cfg, const std::string& dir) {
  const ModelConfig c = load_model_config((fs::path(dir) / "config.json").string());
  if (c.num_labels == 0)
    fail("attribute_model.path {}: not a reward model (a sequence classifier with one output per attribute)",
         dir);
  auto names = cfg.get_string_list("attribute_model.attributes");
  if (names.empty()) return c.labels;
  if (int64_t(names.size()) != c.num_labels)
    fail("config key 'attribute_model.attributes' names {} attributes, but {} has {} outputs", names.size(),
         dir, c.num_labels);
  return names;
}

// Every line of the prompt file, parsed and rendered; bad lines are errors naming file:line and
// field, or with data.skip_bad_lines are skipped and counted.
std::vector<PromptLine> read_prompt_lines(const std::string& path, const Encoder& enc,
                                          const std::vector<std::string>& attributes, int64_t scale,
                                          int64_t max_prompt, const DataOptions& opt) {
  const JsonlFile file(path);
  std::vector<PromptLine> out;
  int64_t skipped = 0;
  std::string first_error;
  for (int64_t i = 0; i < file.size(); ++i) {
    PromptLine line{file.where(i), {}, {}, {}};
    try {
      line.record = file.read(i);
      line.prompt = parse_steerlm2_prompt(line.record, line.where, attributes);
      const auto& p = line.prompt;
      for (size_t k = 0; k < attributes.size(); ++k) {
        const float v = p.values[k];
        if (p.present[k] && (v != std::nearbyint(v) || v < 0 || v > float(scale)))
          fail(
              "{}: field \"label\": attribute \"{}\": {} is not one of the values 0..{} "
              "(attribute_model.scale)",
              line.where, attributes[k], v, scale);
      }
      line.ids = encode_chat(enc, p.conv, true).ids;
      if (int64_t(line.ids.size()) >= max_prompt)
        fail(
            "{}: the prompt has {} tokens, leaving no room for a response within {} (data.max_length, or the "
            "model's context)",
            line.where, line.ids.size(), max_prompt);
    } catch (const Error& e) {
      if (!opt.skip_bad_lines) throw;
      if (first_error.empty()) first_error = e.what();
      ++skipped;
      continue;
    }
    out.push_back(std::move(line));
  }
  if (skipped > 0) log_warn("{}: {} bad lines skipped (first: {})", path, skipped, first_error);
  if (out.empty()) fail("{}: no prompts to sample from", path);
  return out;
}

// Each sequence's log-probability of its loss tokens under `m`, `batch_size` sequences a pass.
std::vector<double> summed_logprobs(const Transformer& m, const std::vector<Sequence>& seqs,
                                    int64_t batch_size, int32_t pad_id) {
  at::NoGradGuard no_grad;
  std::vector<double> out;
  for (size_t start = 0; start < seqs.size(); start += size_t(batch_size)) {
    const std::vector<Sequence> batch(
        seqs.begin() + int64_t(start),
        seqs.begin() + int64_t(std::min(seqs.size(), start + size_t(batch_size))));
    const auto sums = response_logprobs(m, collate_padded(batch, pad_id)).sum.to(at::kDouble).cpu();
    for (int64_t k = 0; k < sums.size(0); ++k) out.push_back(sums[k].item<double>());
  }
  return out;
}

}  // namespace

void run_steerlm2_prepare(const Config& cfg) {
  const std::string model_dir = cfg.get_string("model.path"), rm_dir = cfg.get_string("attribute_model.path"),
                    sft_dir = cfg.get_string("unconditional_model"), data = cfg.get_string("data.prompts"),
                    out_path = cfg.get_string("out");
  if (model_dir.empty())
    fail("config key 'model.path' must be set: the SteerLM model that samples the responses");
  if (rm_dir.empty())
    fail("config key 'attribute_model.path' must be set: the attribute (regression reward) model");
  if (data.empty()) fail("config key 'data.prompts' must be set");
  if (out_path.empty()) fail("config key 'out' must be set");
  const double sigma = cfg.get_float("attribute_model.sigma");
  const int64_t scale = cfg.get_int("attribute_model.scale"), batch_size = cfg.get_int("batch_size");
  if (!(sigma > 0)) fail("config key 'attribute_model.sigma' must be positive, got {}", sigma);
  if (scale < 1) fail("config key 'attribute_model.scale' must be at least 1, got {}", scale);
  if (batch_size < 1) fail("config key 'batch_size' must be at least 1, got {}", batch_size);
  GenerationOptions gen = read_generation_options(cfg, "gen.max_new_tokens", "gen.num_samples");
  if (gen.num_samples < 2)
    fail(
        "config key 'gen.num_samples' must be at least 2: SteerLM 2.0 weighs a prompt's responses against "
        "each other, got {}",
        gen.num_samples);
  if (dist::read_dist_env().world_size > 1)
    fail("steerlm2 prepare runs as one process: start it without aligner launch");
  const at::Device device = parse_device_name(cfg.get_string("model.device"), "model.device");
  const auto dtype = parse_compute_dtype(cfg.get_string("model.dtype"), device, "model.dtype");
  const auto attributes = attribute_names(cfg, rm_dir);

  // Everything that can be checked without the weights is checked before loading them.
  const auto tok = load_tokenizer(model_dir);
  const ModelConfig policy_cfg = load_model_config((fs::path(model_dir) / "config.json").string());
  const DataOptions opt = read_data_options(cfg, policy_cfg);
  const Encoder enc{tok.get(), resolve_chat_template("steerlm", *tok), false};
  const auto lines = read_prompt_lines(data, enc, attributes, scale,
                                       std::min(opt.max_length, context_length(policy_cfg)), opt);
  gen.tokenizer = tok.get();
  gen.stop_strings.push_back(kEndOfReply);
  if (auto id = tok->token_to_id(kEndOfReply)) gen.stop_ids.push_back(*id);
  check_generation_options(gen);
  const int32_t pad_id = pad_id_for(*tok);
  const int64_t n = gen.num_samples;

  // Per line and sample: the response's text, and the prompt with it, with and without the label.
  struct Group {
    const PromptLine* line = nullptr;
    std::vector<std::string> values;
    std::vector<Sequence> labelled, plain;
  };
  std::vector<Group> groups;
  std::vector<double> logq, logp;
  int64_t dropped = 0;
  {
    std::optional<Policy> policy(load_policy(model_dir, "model.path", device, dtype));
    std::vector<std::vector<int32_t>> prompts;
    for (const auto& l : lines) prompts.push_back(l.ids);
    const auto t0 = std::chrono::steady_clock::now();
    const GenerationResult result = generate(policy->model, prompts, gen);
    log_info("sampled {} responses to {} prompts ({} tokens) in {:.1f} s", result.sequences.size(),
             lines.size(), result.generated_tokens,
             std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    for (size_t i = 0; i < lines.size(); ++i) {
      Group g{&lines[i], {}, {}, {}};
      int64_t prompt_length = 0;
      for (int64_t s = 0; s < n; ++s) {
        const auto& seq = result.sequences[i * size_t(n) + size_t(s)];
        // JSON holds valid UTF-8 only: the text is made so before it is tokenized, as training reads it.
        std::string text = utf8::lossy(response_text(seq, *tok, gen.stop_strings, false).text);
        // The template writes the reply's own "\n" before <extra_id_1>.
        if (seq.finish == FinishReason::kStop && !text.empty() && text.back() == '\n') text.pop_back();
        g.labelled.push_back(
            encode_steerlm2_response(enc, lines[i].prompt.conv, text, true, lines[i].where, &prompt_length));
        g.values.push_back(std::move(text));
      }
      // As the training run's reader fits the group, so that log Q' is on the tokens it trains on.
      std::vector<Sequence*> fit;
      for (auto& s : g.labelled) fit.push_back(&s);
      if (fit_length(fit, prompt_length, opt.max_length, opt.truncation, enc.tmpl.bos) ==
          ExampleStatus::kDropped) {
        ++dropped;
        continue;
      }
      for (const auto& v : g.values) {
        int64_t plain_prompt = 0;
        Sequence s =
            encode_steerlm2_response(enc, lines[i].prompt.conv, v, false, lines[i].where, &plain_prompt);
        fit_length({&s}, plain_prompt, opt.max_length, Truncation::kTruncateLeft, enc.tmpl.bos);
        g.plain.push_back(std::move(s));
      }
      groups.push_back(std::move(g));
    }
    if (groups.empty()) fail("{}: every prompt's responses were dropped for length (data.max_length)", data);
    std::vector<Sequence> labelled, plain;
    for (const auto& g : groups) {
      labelled.insert(labelled.end(), g.labelled.begin(), g.labelled.end());
      plain.insert(plain.end(), g.plain.begin(), g.plain.end());
    }
    logq = summed_logprobs(policy->model, labelled, batch_size, pad_id);
    if (sft_dir.empty()) {
      logp = summed_logprobs(policy->model, plain, batch_size, pad_id);
    } else {
      const int64_t vocab = policy->model.cfg.vocab_size;
      policy.reset();  // freed before the next model loads
      const Transformer sft = load_transformer(sft_dir, device, dtype);
      if (sft.cfg.num_labels > 0 || sft.cfg.vocab_size != vocab)
        fail("unconditional_model {} must be a causal LM with model.path's vocabulary ({})", sft_dir, vocab);
      logp = summed_logprobs(sft, plain, batch_size, pad_id);
    }
  }

  // The attribute model reads each conversation as it was trained to: its own tokenizer and
  // template, without the reply's attribute line.
  std::vector<double> log_attributes;
  {
    const Transformer rm = load_transformer(rm_dir, device, dtype);
    const auto rm_tok = load_tokenizer(rm_dir);
    Encoder rm_enc{rm_tok.get(), resolve_chat_template(cfg.get_string("attribute_model.template"), *rm_tok),
                   true};
    if (rm_enc.tmpl.format == ChatFormat::kSteerlm) rm_enc.tmpl.format = ChatFormat::kNemo;
    const int64_t context = rm.cfg.max_position_embeddings;
    // A conversation beyond the attribute model's context keeps its last tokens (the reply), as
    // steerlm label scores it, rather than failing after the sampling and both log-prob passes.
    int64_t truncated = 0;
    std::vector<std::vector<int32_t>> scored;
    std::vector<const Group*> owner;
    for (const auto& g : groups)
      for (size_t s = 0; s < g.values.size(); ++s) {
        Conversation c = g.line->prompt.conv;
        c.generation_label.clear();
        c.messages.push_back({"assistant", g.values[s], {}});
        Sequence seq{encode_chat(rm_enc, c, false).ids, {}};
        if (context > 0 && int64_t(seq.input_ids.size()) > context) {
          seq.loss_mask.assign(seq.input_ids.size(), 0);
          int64_t prompt_length = int64_t(seq.input_ids.size());
          fit_length({&seq}, prompt_length, context, Truncation::kTruncateLeft, rm_enc.tmpl.bos);
          ++truncated;
        }
        scored.push_back(std::move(seq.input_ids));
        owner.push_back(&g);
      }
    if (truncated > 0)
      log_warn(
          "{} responses made more tokens than the attribute model's context ({}) with their prompt: the "
          "attribute model read their last tokens",
          truncated, context);
    at::NoGradGuard no_grad;
    const auto predicted = score_token_sequences(rm, scored, batch_size, pad_id_for(*rm_tok));
    for (size_t k = 0; k < scored.size(); ++k) {
      const auto& p = owner[k]->line->prompt;
      const std::vector<float> values(predicted[k].begin(), predicted[k].end());
      log_attributes.push_back(attribute_log_prob(values, p.values, p.present, sigma, scale));
    }
  }

  // Written beside the target and renamed, so that out may be the file the prompts came from (the
  // next iteration's prepare reads the last one's output).
  const std::string tmp = out_path + ".tmp";
  {
    std::ofstream out(tmp);
    if (!out) fail("cannot write {}", tmp);
    size_t r = 0;
    for (const auto& g : groups) {
      nlohmann::json line = g.line->record;
      line["responses"] = nlohmann::json::array();
      for (size_t s = 0; s < g.values.size(); ++s, ++r)
        line["responses"].push_back({{"from", "Assistant"},
                                     {"value", g.values[s]},
                                     {kLogPAttributes, log_attributes[r]},
                                     {kLogPResponse, logp[r]},
                                     {kLogQResponse, logq[r]}});
      out << line.dump() << '\n';
    }
    out.close();
    if (!out) fail("error writing {}", tmp);
  }
  fs::rename(tmp, out_path);
  log_info("wrote {} prompts x {} responses to {}{}", groups.size(), n, out_path,
           dropped ? fmt::format(" ({} prompts dropped for length: data.max_length)", dropped) : "");
}

}  // namespace aligner
