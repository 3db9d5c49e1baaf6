// `aligner diffuse --model DIR --prompts FILE --out DIR [--adapter DIR] [--aig SCHEDULE] [key=value ...]`:
// images from a text-to-image diffusion model, DDIM with classifier-free guidance, optionally with a
// LoRA adapter on the UNet and annealed importance guidance between it and the base.
// configs/diffuse.yaml is the schema.
#include <filesystem>
#include <fstream>

#include "algo/rollout.h"
#include "command_config.h"
#include "commands.h"
#include "core/error.h"
#include "core/log.h"
#include "diffusion/pipeline.h"
#include "diffusion/unet_lora.h"
#include "io/hf_checkpoint.h"
#include "io/jsonl.h"
#include "io/png.h"

namespace aligner::cli {
namespace {

namespace fs = std::filesystem;

struct Job {
  int64_t prompt = 0, sample = 0;
};

void run(const Config& cfg) {
  const std::string model_dir = cfg.get_string("model.path"), adapter = cfg.get_string("model.adapter"),
                    data = cfg.get_string("data.path"), out = cfg.get_string("out"),
                    aig_text = cfg.get_string("infer.aig");
  if (model_dir.empty()) fail("config key 'model.path' must be set (--model)");
  if (data.empty()) fail("config key 'data.path' must be set (--prompts)");
  if (out.empty()) fail("config key 'out' must be set (--out)");
  std::optional<AigSchedule> aig;
  if (!aig_text.empty()) {
    if (adapter.empty())
      fail("config key 'infer.aig' mixes the adapted and the base UNet: it needs model.adapter");
    aig = parse_aig_schedule(aig_text, "infer.aig");
  }
  SampleOptions so;
  const auto g = read_guided_sampling(cfg);
  so.steps = g.steps;
  so.eta = g.eta;
  const double guidance = g.guidance_scale;
  const int64_t height = cfg.get_int("infer.height"), width = cfg.get_int("infer.width"),
                per_prompt = cfg.get_int("infer.images_per_prompt"), batch = cfg.get_int("infer.batch_size");
  const uint64_t seed = uint64_t(cfg.get_int("infer.seed"));
  if (per_prompt < 1) fail("config key 'infer.images_per_prompt' must be >= 1, got {}", per_prompt);
  if (batch < 1) fail("config key 'infer.batch_size' must be >= 1, got {}", batch);

  const at::Device device = parse_device_name(cfg.get_string("model.device"), "model.device");
  const auto dtype = parse_compute_dtype(cfg.get_string("model.dtype"), device, "model.dtype");
  DiffusionPipeline p = load_pipeline(model_dir, device, dtype);
  const UNet base = p.unet;  // before the adapter: shares the weights
  if (!adapter.empty()) load_unet_adapter(p.unet, adapter);
  initial_latents(p, 1, height, width, 0, at::kCPU, at::kFloat, "infer.height and infer.width");

  const auto prompts = read_string_field(data, cfg.get_string("data.prompt_field"));
  std::vector<Job> jobs;
  for (int64_t i = 0; i < int64_t(prompts.size()); ++i)
    for (int64_t k = 0; k < per_prompt; ++k) jobs.push_back({i, k});

  fs::create_directories(out);
  std::string index;
  at::NoGradGuard no_grad;
  const auto uncond = encode_prompts(p, {""});
  for (size_t first = 0; first < jobs.size(); first += size_t(batch)) {
    const size_t end = std::min(jobs.size(), first + size_t(batch));
    std::vector<std::string> texts;
    std::vector<at::Tensor> noise;
    for (size_t j = first; j < end; ++j) {
      texts.push_back(prompts[size_t(jobs[j].prompt)]);
      noise.push_back(initial_latents(p, 1, height, width, step_seed(seed, jobs[j].prompt, jobs[j].sample, 0),
                                      device, dtype, "infer.height and infer.width"));
    }
    const auto cond = encode_prompts(p, texts);
    const EpsFn eps = [&](const at::Tensor& x, int64_t t, int64_t i) {
      const double w = aig ? aig_weight(*aig, i, so.steps) : 1.0;
      if (w == 1) return guided_output(p.unet, x, t, cond, uncond, guidance);
      if (w == 0) return guided_output(base, x, t, cond, uncond, guidance);
      return aig_combine(guided_output(base, x, t, cond, uncond, guidance),
                         guided_output(p.unet, x, t, cond, uncond, guidance), w);
    };
    so.seeds.clear();
    for (size_t j = first; j < end; ++j)
      so.seeds.push_back(step_seed(seed, jobs[j].prompt, jobs[j].sample, 1));
    // As diffusers' pipelines, the final latents are decoded.
    const auto images = decode_images(p.vae, ddim_sample(p.scheduler, so, eps, at::cat(noise)).latents);
    for (size_t j = first; j < end; ++j) {
      const std::string name = fmt::format("{:05d}_{}.png", jobs[j].prompt, jobs[j].sample);
      const auto pixels =
          (images[int64_t(j - first)].to(at::kFloat) * 255).round().to(at::kByte).permute({1, 2, 0});
      write_png((fs::path(out) / name).string(), pixels.contiguous());
      index += nlohmann::json{{"prompt_index", jobs[j].prompt},
                              {"sample_index", jobs[j].sample},
                              {"prompt", texts[j - first]},
                              {"image", name}}
                   .dump() +
               "\n";
    }
    log_info("{} of {} images", end, jobs.size());
  }
  write_text(fs::path(out) / "images.jsonl", index);
  log_info("wrote {} images to {}", jobs.size(), out);
}

}  // namespace

void add_diffuse(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "diffuse",
      "Images from a text-to-image diffusion model (DDIM), optionally with a LoRA adapter and AIG");
  std::vector<Alias> aliases = model_aliases(true);
  aliases.push_back({"--adapter", "model.adapter"});
  aliases.push_back({"--prompts", "data.path", true});
  aliases.push_back({"--out", "out", true});
  aliases.push_back({"--aig", "infer.aig"});
  add_config_options(*cmd, "diffuse", aliases, run);
}

}  // namespace aligner::cli
