// `aligner rs --config FILE key=value ...`: rejection sampling (algo/rs.h); configs/rs.yaml is the
// schema. `--generate-only` (rs.generate_only=true) writes OUTPUT_DIR/selected.jsonl for aligner sft
// instead of training.
#include "algo/rs.h"
#include "command_config.h"
#include "commands.h"

namespace aligner::cli {

void add_rs(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "rs", "Rejection sampling: fine-tune on the best of several responses from the live policy, by reward");
  auto aliases = model_aliases(false);
  aliases.insert(aliases.end(), {{"--reward-model", "reward.model"},
                                 {"--reward-url", "reward.url"},
                                 {"--data", "data.train"},
                                 {"--out", "output_dir"},
                                 {"--generate-only", "rs.generate_only", false, "true"}});
  add_config_options(*cmd, "rs", aliases, run_rs);
}

}  // namespace aligner::cli
