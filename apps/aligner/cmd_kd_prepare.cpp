// `aligner kd-prepare --config FILE key=value ...`: the sft config (configs/sft.yaml), so that one
// file serves both commands.
#include "algo/kd_logits.h"
#include "commands.h"
#include "core/builtin_configs.h"

namespace aligner::cli {

void add_kd_prepare(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "kd-prepare",
      "Store a teacher's top-k logits at every loss token of SFT data (for sft kd.logits=FILE)");
  auto file = std::make_shared<std::string>();
  auto overrides = std::make_shared<std::vector<std::string>>();
  cmd->add_option("--config", *file, "YAML config of sft (keys and defaults: configs/sft.yaml)");
  cmd->add_option("overrides", *overrides, "key=value overrides, e.g. kd.teacher=DIR kd.top_k=32");
  cmd->callback([=] { run_kd_prepare(Config::load(builtin_config("sft"), *file, *overrides)); });
}

}  // namespace aligner::cli
