// `aligner diffusion-train --config FILE key=value ...`
#include "algo/diffusion_train.h"
#include "command_config.h"
#include "commands.h"

namespace aligner::cli {

void add_diffusion_train(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "diffusion-train",
      "Trains a Stable-Diffusion-shaped model on captioned images: its VAE or its UNet (train.part)");
  add_config_options(*cmd, "diffusion-train", model_aliases(false), run_diffusion_train);
}

}  // namespace aligner::cli
