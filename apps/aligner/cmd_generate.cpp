// `aligner generate --model DIR --data FILE --out FILE [--config FILE] [key=value ...]`: completions
// of the prompts in a JSONL file, one output line per completion:
//   {"prompt_index", "sample_index", "prompt", "output_ids", "text", "logprobs", "finish_reason"}
// prompt_index is the record's index in the file (0-based, blank lines not counted), so a dropped
// prompt leaves a gap rather than shifting the others. prompt is the prompt's text as the model
// got it (rendered with the chat template, or decoded from ids). text is output_ids decoded without
// special tokens, ending before a stop string that ended it (after it with gen.include_stop_str);
// output_ids are the fewest generated tokens whose text covers `text` (gen/engine.h response_text).
// logprobs[i] is log p(output_ids[i]) under the model's own distribution (temperature 1, no
// top-k/top-p), whatever was sampled from. finish_reason: "stop" (EOS, a stop id or string) or
// "length" (max_new_tokens or the model's context). configs/generate.yaml is the schema.
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>

#include "command_config.h"
#include "commands.h"
#include "core/config.h"
#include "core/error.h"
#include "core/log.h"
#include "core/progress.h"
#include "data/attribute_data.h"
#include "data/prompt_data.h"
#include "gen/engine.h"
#include "gen/generation_config.h"
#include "io/hf_checkpoint.h"
#include "io/peft_adapter.h"
#include "train/run_setup.h"

namespace aligner::cli {
namespace {

struct Prompts {
  std::vector<std::vector<int32_t>> ids;
  std::vector<std::string> text;  // as rendered, or decoded
  std::vector<int64_t> record;    // index of each prompt's record in the file
};

// SteerLM: the attributes asked of every reply, and the names they and the prompts' labels may use.
struct Steering {
  std::vector<std::string> names = nemo_attributes();
  std::string label;
};

Steering read_steering(const Config& cfg, const Tokenizer& tok) {
  Steering s;
  if (auto names = cfg.get_string_list("gen.attribute_names"); !names.empty()) s.names = std::move(names);
  const std::string attributes = cfg.get_string("gen.attributes");
  if (attributes.empty()) return s;
  const ChatFormat format = resolve_chat_template(cfg.get_string("data.template"), tok).format;
  if (format != ChatFormat::kSteerlm)
    fail("config key 'gen.attributes' needs data.template=steerlm (the template that writes them), got {}",
         chat_format_name(format));
  try {
    s.label = steerlm_label(attributes, s.names);
  } catch (const Error& e) {
    fail("config key 'gen.attributes': {}", e.what());
  }
  return s;
}

// Prompts no longer than `limit`: longer ones are an error naming the line, or truncated or
// dropped by the reader, as data.truncation says.
Prompts read_prompts(const Config& cfg, const std::string& path, const Tokenizer& tok, int64_t context,
                     const Steering& steering) {
  const int64_t max_length = cfg.get_int("data.max_length");
  if (max_length < 1) fail("config key 'data.max_length' must be positive, got {}", max_length);
  const int64_t limit = std::min(max_length, context - 1);
  const std::string truncation = cfg.get_string("data.truncation");
  DataOptions opt;
  opt.skip_bad_lines = cfg.get_bool("data.skip_bad_lines");
  if (truncation == "error") {
    opt.max_length = std::numeric_limits<int64_t>::max();
  } else if (truncation == "truncate_left" || truncation == "drop") {
    opt.truncation = parse_truncation(truncation);
    opt.max_length = limit;
  } else {
    fail("config key 'data.truncation' expects error, truncate_left or drop, got '{}'", truncation);
  }
  PromptDataset ds =
      open_prompt_dataset(path, tok, resolve_chat_template(cfg.get_string("data.template"), tok), opt);
  ds.attribute_names = steering.names;
  ds.generation_label = steering.label;
  Prompts p;
  for (int64_t i = 0; i < dataset_size(ds); ++i) {
    auto ex = prompt_example(ds, i);
    if (!ex) continue;
    const int64_t n = int64_t(ex->input_ids.size());
    if (n > limit) {
      const std::string bound =
          limit == max_length ? fmt::format("data.max_length={}", max_length)
                              : fmt::format("the model's context of {} tokens less one to generate", context);
      fail(
          "{}: the prompt has {} tokens, more than {} ({}); data.truncation=truncate_left or drop shortens "
          "or "
          "skips such prompts",
          ds.file.where(i), n, limit, bound);
    }
    p.ids.push_back(std::move(ex->input_ids));
    p.text.push_back(std::move(ex->text));
    p.record.push_back(i);
  }
  const auto report = data_report(ds.stats, path, limit);
  if (!report.empty()) log_warn("{}", report);
  if (p.ids.empty()) fail("{}: no prompts left to generate from", path);
  return p;
}

void run(const Config& cfg) {
  const std::string model_dir = cfg.get_string("model.path"), data = cfg.get_string("data.path"),
                    out_path = cfg.get_string("out");
  // Everything that can be checked without the weights is checked before loading them.
  GenerationOptions opt = read_generation_options(cfg, "gen.max_new_tokens", "gen.num_samples");
  const bool include_stop = cfg.get_bool("gen.include_stop_str");
  const auto tok = load_tokenizer(model_dir);
  opt.tokenizer = tok.get();
  check_generation_options(opt);
  const Steering steering = read_steering(cfg, *tok);
  at::Device device = parse_device_name(cfg.get_string("model.device"), "model.device");
  const bool writes = init_inference_ranks(cfg, device);
  const auto dtype = parse_compute_dtype(cfg.get_string("model.dtype"), device, "model.dtype");
  const Transformer m = load_adapted_model(model_dir, cfg.get_string("model.adapter"), device, dtype);
  check_tokenizer_fits(*tok, m.cfg.vocab_size, model_dir);
  const Prompts prompts = read_prompts(cfg, data, *tok, context_length(m.cfg), steering);
  // Every rank generates the same tokens (the same logits, the same draws); one writes them.
  std::ofstream out;
  if (writes) out.open(out_path);
  if (writes && !out) fail("cannot write {}", out_path);

  const int64_t total = int64_t(prompts.ids.size()) * opt.num_samples;
  JobProgress progress(total);
  opt.on_step = [&](int64_t finished, int64_t tokens) {
    report_generation(progress, finished, total, tokens, false);
  };
  const GenerationResult result = generate(m, prompts.ids, opt);
  report_generation(progress, total, total, result.generated_tokens, true);
  if (!writes) return;

  for (const auto& s : result.sequences) {
    const ResponseText response = response_text(s, *tok, opt.stop_strings, include_stop);
    nlohmann::ordered_json line = {
        {"prompt_index", prompts.record[s.prompt_index]},
        {"sample_index", s.sample_index},
        {"prompt", prompts.text[s.prompt_index]},
        {"output_ids", std::vector<int32_t>(s.tokens.begin(), s.tokens.begin() + int64_t(response.tokens))},
        {"text", response.text},
        {"logprobs", std::vector<float>(s.logprobs.begin(), s.logprobs.begin() + int64_t(response.tokens))},
        {"finish_reason", finish_reason_name(s.finish)}};
    // A response cut inside a UTF-8 sequence decodes to invalid UTF-8, which JSON cannot hold.
    out << line.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace) << '\n';
  }
  out.close();
  if (!out) fail("error writing {}", out_path);
  log_info("wrote {} completions to {}", result.sequences.size(), out_path);
}

}  // namespace

void add_generate(CLI::App& app) {
  auto* cmd = app.add_subcommand("generate", "Complete the prompts of a JSONL file with a model");
  auto aliases = model_aliases(true);
  aliases.insert(aliases.end(), {{"--data", "data.path", true},
                                 {"--out", "out", true},
                                 {"--batch-size", "gen.batch_size"},
                                 {"--adapter", "model.adapter"},
                                 {"--tensor-parallel", "model.tensor_parallel"}});
  add_config_options(*cmd, "generate", aliases, run);
}

}  // namespace aligner::cli
