// `aligner shapes --out DIR [--count N] [--size S] [--seed N]`: the synthetic captioned image set that
// the diffusion demo trains on (coloured shapes on coloured backgrounds, "a red circle on a blue
// background"), written as diffusion-train reads it.
#include "commands.h"
#include "diffusion/shapes_data.h"

namespace aligner::cli {

void add_shapes(CLI::App& app) {
  auto* cmd = app.add_subcommand("shapes",
                                 "Write the synthetic captioned image set of the diffusion demo (images/, "
                                 "captions.jsonl, prompts.jsonl)");
  auto out = std::make_shared<std::string>();
  auto count = std::make_shared<int64_t>(2000);
  auto size = std::make_shared<int64_t>(32);
  auto seed = std::make_shared<uint64_t>(1);
  cmd->add_option("--out", *out, "Output folder")->required();
  cmd->add_option("--count", *count, "Images");
  cmd->add_option("--size", *size, "Image side in pixels (>= 16)");
  cmd->add_option("--seed", *seed, "Seed of the shapes, colours and positions");
  cmd->callback([=] {
    write_shapes_dataset(*out, *count, *size, *seed);
    fmt::print("wrote {} images of {} x {} to {}\n", *count, *size, *size, *out);
  });
}

}  // namespace aligner::cli
