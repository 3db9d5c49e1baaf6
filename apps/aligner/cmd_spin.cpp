// `aligner spin --config FILE key=value ...`: self-play fine-tuning (algo/spin.h); configs/spin.yaml
// is the schema.
#include "algo/spin.h"
#include "command_config.h"
#include "commands.h"

namespace aligner::cli {

void add_spin(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "spin", "Self-play fine-tuning: SFT data's real responses preferred over the previous iteration's own");
  add_config_options(*cmd, "spin", model_aliases(false), run_spin);
}

}  // namespace aligner::cli
