// `aligner init`: a randomly initialised model folder from a config.json and a tokenizer (a causal LM
// or a CLIPModel), or a diffusion model's from its folder of configs: the starting point for training
// a model from scratch (the demo models are made this way).

#include <filesystem>

#include "commands.h"
#include "core/error.h"
#include "core/json.h"
#include "diffusion/clip.h"
#include "diffusion/pipeline.h"
#include "io/hf_checkpoint.h"
#include "text/tokenizer.h"

namespace aligner::cli {

void add_init(CLI::App& app) {
  auto* cmd =
      app.add_subcommand("init", "Write a randomly initialised model folder (config.json + tokenizer)");
  auto config = std::make_shared<std::string>();
  auto tokenizer = std::make_shared<std::string>();
  auto out = std::make_shared<std::string>();
  auto seed = std::make_shared<uint64_t>(1234);
  auto overwrite = std::make_shared<bool>(false);
  cmd->add_option(
         "--config", *config,
         "A Hugging Face config.json describing the model (a causal LM or a CLIPModel), or a diffusion "
         "model's folder of configs "
         "(unet/, vae/ and text_encoder/ config.json, tokenizer/, scheduler/)")
      ->required();
  cmd->add_option(
      "--tokenizer", *tokenizer,
      "Folder with tokenizer.json / tokenizer_config.json (a diffusion model's is in its folder)");
  cmd->add_option("--out", *out, "Output model folder")->required();
  cmd->add_option("--seed", *seed, "Seed of the random weights");
  cmd->add_flag("--overwrite", *overwrite,
                "Replace --out whatever it holds (without it, only a model folder aligner wrote)");
  cmd->callback([=] {
    if (std::filesystem::is_directory(*config)) {
      if (!tokenizer->empty()) fail("--tokenizer: a diffusion model's tokenizer is its folder's tokenizer/");
      const DiffusionPipeline p = init_pipeline(*config, *seed);
      save_pipeline(p, *out, *overwrite ? Replace::anything : Replace::ours);
      int64_t n = 0;
      for (const auto& [name, t] : named_parameters(p.unet)) n += t.numel();
      fmt::print("wrote {} (UNet {:.2f}M parameters)\n", *out, n / 1e6);
      return;
    }
    if (tokenizer->empty()) fail("--tokenizer must be given for a language model or a CLIP model");
    const Replace replace = *overwrite ? Replace::anything : Replace::ours;
    check_model_folder_target(*out, replace, *tokenizer);
    if (read_json_file(*config).value("model_type", std::string()) == "clip") {
      // A CLIP reward model to train from scratch with `aligner pickscore`.
      const ClipModel m = init_clip_model(load_clip_config(*config), *seed);
      check_tokenizer_fits(*load_tokenizer(*tokenizer), m.text.cfg.vocab_size, *config);
      save_clip_model(m, *config, *tokenizer, *out, replace);
      int64_t n = 0;
      for (const auto& [name, t] : named_parameters(m)) n += t.numel();
      fmt::print("wrote {} (CLIPModel, {:.2f}M parameters)\n", *out, n / 1e6);
      return;
    }
    const ModelConfig cfg = load_model_config(*config);
    const auto tok = load_tokenizer(*tokenizer);
    if (tok->vocab_size() > cfg.vocab_size)
      fail("{}: vocab_size {} is smaller than the tokenizer's {} tokens", *config, cfg.vocab_size,
           tok->vocab_size());
    const Transformer m = init_transformer(cfg, at::kCPU, *seed);
    save_transformer(m, *out, std::nullopt, 0, *tokenizer, replace);
    int64_t n = 0;
    for (const auto& [name, t] : named_parameters(m)) n += t.numel();
    fmt::print("wrote {} ({:.2f}M parameters)\n", *out, n / 1e6);
  });
}

}  // namespace aligner::cli
