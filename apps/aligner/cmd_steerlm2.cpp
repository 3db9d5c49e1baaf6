// `aligner steerlm2 --config FILE key=value ...` trains (configs/steerlm2.yaml); `aligner steerlm2
// prepare --config FILE key=value ...` samples and scores its data (configs/steerlm2-prepare.yaml).
#include "algo/steerlm2.h"
#include "command_config.h"
#include "commands.h"

namespace aligner::cli {

void add_steerlm2(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "steerlm2",
      "SteerLM 2.0: train a SteerLM model towards P(y|a,x) on responses sampled from it (see prepare)");
  auto* prepare = cmd->add_subcommand(
      "prepare", "Sample responses from a SteerLM model and compute the log-probs that steerlm2 trains with");
  auto aliases = model_aliases(false);
  aliases.insert(
      aliases.end(),
      {{"--attribute-model", "attribute_model.path"}, {"--data", "data.prompts"}, {"--out", "out"}});
  add_config_options(*prepare, "steerlm2-prepare", aliases, run_steerlm2_prepare);
  // CLI11 runs a command's callback after its subcommand's: training runs only without `prepare`.
  add_config_options(*cmd, "steerlm2", model_aliases(false), [prepare](const Config& cfg) {
    if (!prepare->parsed()) run_steerlm2(cfg);
  });
}

}  // namespace aligner::cli
