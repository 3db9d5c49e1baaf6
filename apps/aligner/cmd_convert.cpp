// `aligner convert`: rewrite a model folder in another dtype or shard size (and check that it
// loads), e.g. to make a bf16 copy or to reshard for a loader with a file-size limit.
#include <cmath>

#include "commands.h"
#include "core/error.h"
#include "io/hf_checkpoint.h"

namespace aligner::cli {
namespace {

int64_t parse_size(const std::string& s) {
  if (s.empty() || s == "0") return 0;
  size_t pos = 0;
  double v = 0;
  try {
    v = std::stod(s, &pos);
  } catch (const std::exception&) {
    fail("--shard-size: expected a size like 5GB or 500MB, got '{}'", s);
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
    fail("--shard-size: unknown unit '{}' (use B, KB, MB or GB)", unit);
  return (int64_t)std::llround(v * mult);
}

}  // namespace

void add_convert(CLI::App& app) {
  auto* cmd =
      app.add_subcommand("convert", "Rewrite a Hugging Face model folder in another dtype or shard size");
  auto model = std::make_shared<std::string>();
  auto out = std::make_shared<std::string>();
  auto dtype = std::make_shared<std::string>();
  auto shard = std::make_shared<std::string>("0");
  auto overwrite = std::make_shared<bool>(false);
  cmd->add_option("--model", *model, "Input model folder")->required();
  cmd->add_option("--out", *out, "Output model folder")->required();
  cmd->add_option("--dtype", *dtype, "float32 | bfloat16 | float16 (default: as stored)");
  cmd->add_option("--shard-size", *shard, "Largest shard, e.g. 5GB (default: one file)");
  cmd->add_flag("--overwrite", *overwrite,
                "Replace --out whatever it holds (without it, only a model folder aligner wrote)");
  cmd->callback([=] {
    std::optional<at::ScalarType> dt;
    if (!dtype->empty()) dt = parse_dtype_name(*dtype, "--dtype");
    const int64_t shard_bytes = parse_size(*shard);
    const Replace replace = *overwrite ? Replace::anything : Replace::ours;
    check_model_folder_target(*out, replace, *model);
    auto m = load_transformer(*model, at::kCPU, dt);
    save_transformer(m, *out, dt, shard_bytes, *model, replace);
    fmt::print("wrote {}\n", *out);
  });
}

}  // namespace aligner::cli
