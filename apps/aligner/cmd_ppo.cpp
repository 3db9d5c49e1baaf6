// `aligner ppo --config FILE key=value ...`: RLHF with PPO (algo/ppo.h); configs/ppo.yaml is the schema.
#include "algo/ppo.h"
#include "command_config.h"
#include "commands.h"

namespace aligner::cli {

void add_ppo(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "ppo",
      "RLHF with PPO: actor and critic trained on rollouts from the live actor, scored by a reward model");
  add_config_options(*cmd, "ppo",
                     {{"--actor", "actor.path"},
                      {"--critic", "critic.path"},
                      {"--reward-model", "reward.model"},
                      {"--reward-url", "reward.url"},
                      {"--data", "data.train"},
                      {"--out", "output_dir"},
                      {"--dtype", "model.dtype"},
                      {"--device", "model.device"}},
                     run_ppo);
}

}  // namespace aligner::cli
