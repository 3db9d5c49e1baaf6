// `aligner draftp --config FILE key=value ...`
#include "algo/draftp.h"
#include "command_config.h"
#include "commands.h"

namespace aligner::cli {

void add_draftp(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "draftp",
      "DRaFT+: reward fine-tuning of a Stable Diffusion model through its sampler (LoRA on the UNet)");
  add_config_options(*cmd, "draftp", model_aliases(false), run_draftp);
}

}  // namespace aligner::cli
