// `aligner dpo --config FILE key=value ...`
#include "algo/dpo.h"
#include "command_config.h"
#include "commands.h"

namespace aligner::cli {

void add_dpo(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "dpo", "Direct preference optimisation against a frozen reference (dpo.loss: dpo, ipo, rpo_*)");
  add_config_options(*cmd, "dpo", model_aliases(false), run_dpo);
}

}  // namespace aligner::cli
