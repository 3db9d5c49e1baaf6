// `aligner rm --config FILE key=value ...`
#include "algo/rm.h"
#include "commands.h"
#include "core/builtin_configs.h"

namespace aligner::cli {

void add_rm(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "rm",
      "Train a reward model: pairwise (Bradley-Terry) or regression on attributes (rm.type=regression)");
  auto file = std::make_shared<std::string>();
  auto overrides = std::make_shared<std::vector<std::string>>();
  cmd->add_option("--config", *file, "YAML config (keys and defaults: configs/rm.yaml)");
  cmd->add_option("overrides", *overrides, "key=value overrides, e.g. trainer.max_steps=100 optim.lr=1e-5");
  cmd->callback([=] { run_rm(Config::load(builtin_config("rm"), *file, *overrides)); });
}

}  // namespace aligner::cli
