// `aligner sft --config FILE key=value ...`
#include "algo/sft.h"
#include "command_config.h"
#include "commands.h"

namespace aligner::cli {

void add_sft(CLI::App& app) {
  auto* cmd =
      app.add_subcommand("sft", "Supervised fine-tuning (and knowledge distillation with kd.teacher=DIR)");
  add_config_options(*cmd, "sft", model_aliases(false), run_sft);
}

}  // namespace aligner::cli
