// `aligner pickscore --config FILE key=value ...`
#include "algo/pickscore.h"
#include "command_config.h"
#include "commands.h"

namespace aligner::cli {

void add_pickscore(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "pickscore",
      "PickScore: train a CLIPModel reward from preference pairs of images (the reward draftp scores with)");
  add_config_options(*cmd, "pickscore", model_aliases(false), run_pickscore);
}

}  // namespace aligner::cli
