// `aligner steerlm label --model RM_DIR --data SFT.jsonl --out LABELLED.jsonl [key=value ...]`:
// SteerLM's attribute labels written into every assistant turn of an SFT file by a regression
// reward model (algo/steerlm_label.h). configs/steerlm-label.yaml is the schema.
#include "algo/steerlm_label.h"
#include "command_config.h"
#include "commands.h"

namespace aligner::cli {

void add_steerlm(CLI::App& app) {
  auto* cmd = app.add_subcommand("steerlm", "SteerLM: attribute-conditioned SFT data");
  cmd->require_subcommand(1);
  auto* label = cmd->add_subcommand(
      "label", "Label every assistant turn of an SFT file with a regression reward model's attributes");
  auto aliases = model_aliases(true);
  aliases.insert(aliases.end(),
                 {{"--data", "data.path", true}, {"--out", "out", true}, {"--batch-size", "batch_size"}});
  add_config_options(*label, "steerlm-label", aliases, run_steerlm_label);
}

}  // namespace aligner::cli
