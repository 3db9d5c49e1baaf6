// `aligner rm --config FILE key=value ...`
#include "algo/rm.h"
#include "command_config.h"
#include "commands.h"

namespace aligner::cli {

void add_rm(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "rm",
      "Train a reward model: pairwise (Bradley-Terry) or regression on attributes (rm.type=regression)");
  add_config_options(*cmd, "rm", model_aliases(false), run_rm);
}

}  // namespace aligner::cli
