// `aligner reinforce --config FILE key=value ...`: RLOO, GRPO and Dr. GRPO with DAPO's options
// (algo/reinforce.h); configs/reinforce.yaml is the schema.
#include "algo/reinforce.h"
#include "command_config.h"
#include "commands.h"

namespace aligner::cli {

void add_reinforce(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "reinforce",
      "Critic-free online RL: RLOO, GRPO, Dr. GRPO (DAPO's options) on rollouts from the live policy");
  auto aliases = model_aliases(false);
  aliases.insert(aliases.end(), {{"--data", "data.train"}, {"--out", "output_dir"}});
  add_config_options(*cmd, "reinforce", aliases, run_reinforce);
}

}  // namespace aligner::cli
