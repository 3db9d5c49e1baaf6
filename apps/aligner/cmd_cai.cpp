// `aligner cai critique` and `aligner cai compare`: Constitutional AI's data (algo/cai.h);
// configs/cai-critique.yaml and configs/cai-compare.yaml are their schemas.
#include "algo/cai.h"
#include "command_config.h"
#include "commands.h"

namespace aligner::cli {

void add_cai(CLI::App& app) {
  auto* cai = app.add_subcommand("cai", "Constitutional AI: critiques and revisions, AI preference pairs");
  cai->require_subcommand(1);

  auto* critique = cai->add_subcommand(
      "critique", "Answer, critique and revise each prompt by a principle of the constitution: SFT lines");
  auto aliases = model_aliases(true);
  aliases.insert(aliases.end(), {{"--prompts", "data.prompts", true},
                                 {"--constitution", "constitution", true},
                                 {"--few-shot", "few_shot"},
                                 {"--out", "out", true}});
  add_config_options(*critique, "cai-critique", aliases, run_cai_critique);

  auto* compare = cai->add_subcommand(
      "compare", "Answer each prompt at several temperatures and let a judge pick the better of each pair");
  aliases = model_aliases(true);
  aliases.insert(aliases.end(), {{"--judge", "judge.path"},
                                 {"--judge-url", "judge.url"},
                                 {"--prompts", "data.prompts", true},
                                 {"--constitution", "constitution", true},
                                 {"--out", "out", true}});
  add_config_options(*compare, "cai-compare", aliases, run_cai_compare);
}

}  // namespace aligner::cli
