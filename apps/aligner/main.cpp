#include <c10/util/Exception.h>

#include <cstdio>
#include <exception>

#include "commands.h"
#include "core/error.h"

int main(int argc, char** argv) {
  CLI::App app{"aligner: align large language models (SFT, reward models, DPO, PPO, ...)"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "aligner 0.1.0");
  aligner::cli::add_perplexity(app);
  aligner::cli::add_convert(app);
  aligner::cli::add_tokenize(app);
  aligner::cli::add_init(app);
  aligner::cli::add_sft(app);
  aligner::cli::add_kd_prepare(app);
  aligner::cli::add_rm(app);
  aligner::cli::add_rm_score(app);
  aligner::cli::add_dpo(app);
  aligner::cli::add_launch(app);
  aligner::cli::add_generate(app);
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
