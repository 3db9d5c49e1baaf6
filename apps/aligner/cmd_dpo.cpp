// `aligner dpo --config FILE key=value ...`
#include "algo/dpo.h"
#include "commands.h"
#include "core/builtin_configs.h"

namespace aligner::cli {

void add_dpo(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "dpo", "Direct preference optimisation against a frozen reference (dpo.loss: dpo, ipo, rpo_*)");
  auto file = std::make_shared<std::string>();
  auto overrides = std::make_shared<std::vector<std::string>>();
  cmd->add_option("--config", *file, "YAML config (keys and defaults: configs/dpo.yaml)");
  cmd->add_option("overrides", *overrides, "key=value overrides, e.g. trainer.max_steps=100 dpo.beta=0.05");
  cmd->callback([=] { run_dpo(Config::load(builtin_config("dpo"), *file, *overrides)); });
}

}  // namespace aligner::cli
