// `aligner sft --config FILE key=value ...`
#include "algo/sft.h"
#include "commands.h"
#include "core/builtin_configs.h"

namespace aligner::cli {

void add_sft(CLI::App& app) {
  auto* cmd =
      app.add_subcommand("sft", "Supervised fine-tuning (and knowledge distillation with kd.teacher=DIR)");
  auto file = std::make_shared<std::string>();
  auto overrides = std::make_shared<std::vector<std::string>>();
  cmd->add_option("--config", *file, "YAML config (keys and defaults: configs/sft.yaml)");
  cmd->add_option("overrides", *overrides, "key=value overrides, e.g. trainer.max_steps=100 optim.lr=1e-5");
  cmd->callback([=] { run_sft(Config::load(builtin_config("sft"), *file, *overrides)); });
}

}  // namespace aligner::cli
