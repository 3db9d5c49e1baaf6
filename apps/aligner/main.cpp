#include <c10/util/Exception.h>
#include <fmt/ranges.h>

#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "commands.h"
#include "core/error.h"

namespace {

// CLI11 answers a first word that names no command with "A subcommand is required", which hides
// the mistake: the error for `word`, listing the commands, or "" when it names one.
std::string unknown_command(const CLI::App& app, const std::string& word) {
  std::vector<std::string> names;
  for (const CLI::App* sub : app.get_subcommands([](const CLI::App* s) { return !s->get_name().empty(); })) {
    if (sub->check_name(word)) return "";
    names.push_back(sub->get_name());
  }
  return fmt::format("unknown command '{}' (commands: {})", word, fmt::join(names, ", "));
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"aligner: align large language models (SFT, knowledge distillation, reward models, DPO, PPO)"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "aligner 0.1.0");
  aligner::cli::add_perplexity(app);
  aligner::cli::add_convert(app);
  aligner::cli::add_merge_lora(app);
  aligner::cli::add_tokenize(app);
  aligner::cli::add_chat_template(app);
  aligner::cli::add_init(app);
  aligner::cli::add_sft(app);
  aligner::cli::add_kd_prepare(app);
  aligner::cli::add_rm(app);
  aligner::cli::add_rm_score(app);
  aligner::cli::add_dpo(app);
  aligner::cli::add_launch(app);
  aligner::cli::add_generate(app);
  aligner::cli::add_serve_reward(app);
  aligner::cli::add_ppo(app);
  aligner::cli::add_reinforce(app);
  aligner::cli::add_rs(app);
  aligner::cli::add_spin(app);
  aligner::cli::add_cai(app);
  aligner::cli::add_steerlm2(app);
  aligner::cli::add_steerlm(app);
  aligner::cli::add_draftp(app);
  aligner::cli::add_pickscore(app);
  aligner::cli::add_diffuse(app);
  aligner::cli::add_shapes(app);
  aligner::cli::add_diffusion_train(app);
  if (argc > 1 && argv[1][0] != '-') {
    if (const std::string error = unknown_command(app, argv[1]); !error.empty()) {
      std::fprintf(stderr, "error: %s\n", error.c_str());
      return 1;
    }
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const aligner::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what_without_backtrace());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
