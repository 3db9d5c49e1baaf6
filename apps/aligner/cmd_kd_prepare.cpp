// `aligner kd-prepare --config FILE key=value ...`: the sft config (configs/sft.yaml), so that one
// file serves both commands.
#include "algo/kd_logits.h"
#include "command_config.h"
#include "commands.h"

namespace aligner::cli {

void add_kd_prepare(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "kd-prepare",
      "Store a teacher's top-k logits at every loss token of SFT data (for sft kd.logits=FILE)");
  add_config_options(*cmd, "sft", model_aliases(false), run_kd_prepare);
}

}  // namespace aligner::cli
