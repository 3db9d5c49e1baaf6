// Each subcommand lives in its own cmd_<name>.cpp and registers itself on the CLI here.
#pragma once
#include <CLI/CLI.hpp>

namespace aligner::cli {

void add_perplexity(CLI::App& app);
void add_convert(CLI::App& app);
void add_merge_lora(CLI::App& app);
void add_tokenize(CLI::App& app);
void add_chat_template(CLI::App& app);
void add_sft(CLI::App& app);
void add_kd_prepare(CLI::App& app);
void add_init(CLI::App& app);
void add_launch(CLI::App& app);
void add_rm(CLI::App& app);
void add_rm_score(CLI::App& app);
void add_dpo(CLI::App& app);
void add_generate(CLI::App& app);
void add_serve_reward(CLI::App& app);
void add_ppo(CLI::App& app);
void add_reinforce(CLI::App& app);
void add_rs(CLI::App& app);
void add_spin(CLI::App& app);
void add_cai(CLI::App& app);
void add_steerlm2(CLI::App& app);
void add_steerlm(CLI::App& app);
void add_draftp(CLI::App& app);
void add_pickscore(CLI::App& app);
void add_diffuse(CLI::App& app);
void add_shapes(CLI::App& app);
void add_diffusion_train(CLI::App& app);

}  // namespace aligner::cli
