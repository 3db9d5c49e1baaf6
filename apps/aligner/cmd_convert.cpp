// `aligner convert`: rewrite a model folder in another dtype or shard size (and check that it
// loads), e.g. to make a bf16 copy or to reshard for a loader with a file-size limit.
#include <cmath>

#include "command_config.h"
#include "commands.h"
#include "core/error.h"
#include "io/hf_checkpoint.h"
#include "io/peft_adapter.h"

namespace aligner::cli {
namespace {

int64_t parse_size(const std::string& s) {
  if (s.empty() || s == "0") return 0;
  size_t pos = 0;
  double v = 0;
  try {
    v = std::stod(s, &pos);
  } catch (const std::exception&) {
    fail("config key 'shard_size' expects a size like 5GB or 500MB, got '{}'", s);
  }
  const std::string unit = s.substr(pos);
  double mult = 1;
  if (unit == "KB")
    mult = 1e3;
  else if (unit == "MB")
    mult = 1e6;
  else if (unit == "GB")
    mult = 1e9;
  else if (!unit.empty() && unit != "B")
    fail("config key 'shard_size': unknown unit '{}' in '{}' (use B, KB, MB or GB)", unit, s);
  return (int64_t)std::llround(v * mult);
}

void run(const Config& cfg) {
  const std::string model = cfg.get_string("model.path"), out = cfg.get_string("out");
  std::optional<at::ScalarType> dt;
  if (const std::string name = cfg.get_string("model.dtype"); !name.empty())
    dt = parse_dtype_name(name, "model.dtype");
  const int64_t shard_bytes = parse_size(cfg.get_string("shard_size"));
  const Replace replace = cfg.get_bool("overwrite") ? Replace::anything : Replace::ours;
  check_model_folder_target(out, replace, model);
  const std::string adapter = cfg.get_string("model.adapter");
  if (!adapter.empty()) check_model_folder_target(out, replace, adapter);
  auto m = load_adapted_model(model, adapter, at::kCPU, dt);
  save_transformer(has_adapters(m) ? merged_copy(m) : m, out, dt, shard_bytes, model, replace);
  fmt::print("wrote {}\n", out);
}

}  // namespace

void add_convert(CLI::App& app) {
  auto* cmd =
      app.add_subcommand("convert", "Rewrite a Hugging Face model folder in another dtype or shard size");
  add_config_options(*cmd, "convert",
                     {{"--model", "model.path", true},
                      {"--out", "out", true},
                      {"--dtype", "model.dtype"},
                      {"--shard-size", "shard_size"},
                      {"--overwrite", "overwrite", false, "true"}},
                     run);
}

void add_merge_lora(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "merge-lora", "Fold a PEFT LoRA adapter into its base model: a Hugging Face folder of merged weights");
  add_config_options(*cmd, "convert",
                     {{"--base", "model.path", true},
                      {"--adapter", "model.adapter", true},
                      {"--out", "out", true},
                      {"--dtype", "model.dtype"},
                      {"--shard-size", "shard_size"},
                      {"--overwrite", "overwrite", false, "true"}},
                     run);
}

}  // namespace aligner::cli
