#include "diffusion/pipeline.h"

#include <ATen/CPUGeneratorImpl.h>

#include <filesystem>
#include <map>

#include "core/error.h"
#include "core/json.h"
#include "io/hf_checkpoint.h"

namespace aligner {

namespace fs = std::filesystem;

namespace {

// model_index.json names each part's library and class; where it is present, the parts must be the
// classes aligner runs.
void check_model_index(const fs::path& dir) {
  const fs::path index = dir / "model_index.json";
  if (!fs::exists(index)) return;
  const auto j = read_json_file(index.string());
  const std::map<std::string, std::vector<std::string>> known = {
      {"unet", {"UNet2DConditionModel"}},
      {"vae", {"AutoencoderKL"}},
      {"text_encoder", {"CLIPTextModel", "CLIPTextModelWithProjection"}},
  };
  for (const auto& [part, classes] : known) {
    if (!j.contains(part) || j[part].is_null()) fail("{}: has no \"{}\"", index.string(), part);
    const auto& entry = j[part];
    if (!entry.is_array() || entry.size() != 2 || !entry[1].is_string())
      fail("{}: \"{}\" must be [library, class], got {}", index.string(), part, entry.dump());
    const std::string cls = entry[1].get<std::string>();
    if (std::find(classes.begin(), classes.end(), cls) == classes.end())
      fail("{}: \"{}\" is a {}; aligner runs {}", index.string(), part, cls, fmt::join(classes, " or "));
  }
}

fs::path part(const fs::path& dir, const char* name) {
  const fs::path p = dir / name;
  if (!fs::is_directory(p)) fail("{}: the diffusion model folder has no {}/ folder", dir.string(), name);
  return p;
}

// What load_pipeline and init_pipeline share: the tokenizer and scheduler, and the checks that the
// parts fit together.
void finish(DiffusionPipeline& p, const fs::path& dir) {
  const std::string dir_name = dir.string();
  p.source = dir_name;
  p.tokenizer = load_tokenizer(part(dir, "tokenizer").string());
  p.scheduler =
      make_ddim_scheduler(read_ddim_config((part(dir, "scheduler") / "scheduler_config.json").string()));
  const int64_t hidden = p.text_encoder.cfg.hidden_size;
  for (int64_t d : p.unet.cfg.cross_attention_dim)
    if (d != hidden)
      fail("{}: the text encoder's hidden size {} is not the UNet's cross_attention_dim {}", dir_name, hidden,
           d);
  if (p.vae.cfg.latent_channels != p.unet.cfg.in_channels)
    fail("{}: the VAE's latent_channels {} is not the UNet's in_channels {}", dir_name,
         p.vae.cfg.latent_channels, p.unet.cfg.in_channels);
  check_tokenizer_fits(*p.tokenizer, p.text_encoder.cfg.vocab_size, (dir / "text_encoder").string());
}

void copy_files(const fs::path& from, const fs::path& to) {
  fs::create_directories(to);
  for (const auto& e : fs::directory_iterator(from))
    if (e.is_regular_file())
      fs::copy_file(e.path(), to / e.path().filename(), fs::copy_options::overwrite_existing);
}

}  // namespace

DiffusionPipeline load_pipeline(const std::string& dir_name, at::Device device, at::ScalarType dtype) {
  const fs::path dir(dir_name);
  if (!fs::is_directory(dir)) fail("{}: not a folder", dir_name);
  // diffusers runs Stable Diffusion's VAE in float32 even in float16 pipelines (force_upcast): it
  // overflows in float16. bfloat16 has float32's range.
  if (dtype == at::kHalf) fail("{}: diffusion models run in float32 or bfloat16, not float16", dir_name);
  check_model_index(dir);
  DiffusionPipeline p;
  p.unet = load_unet(part(dir, "unet").string(), device, dtype);
  p.vae = load_vae(part(dir, "vae").string(), device, dtype);
  p.text_encoder = load_clip_model(part(dir, "text_encoder").string(), device, dtype).text;
  finish(p, dir);
  return p;
}

DiffusionPipeline init_pipeline(const std::string& configs, uint64_t seed) {
  const fs::path dir(configs);
  if (!fs::is_directory(dir)) fail("{}: not a folder", configs);
  DiffusionPipeline p;
  p.unet =
      init_unet(load_unet_config((part(dir, "unet") / "config.json").string()), at::kCPU, at::kFloat, seed);
  p.vae =
      init_vae(load_vae_config((part(dir, "vae") / "config.json").string()), at::kCPU, at::kFloat, seed + 1);
  const auto text_cfg = load_clip_config((part(dir, "text_encoder") / "config.json").string());
  if (text_cfg.model_type != "clip_text_model")
    fail("{}/text_encoder/config.json: a CLIPTextModel config (model_type clip_text_model) is needed, got {}",
         configs, text_cfg.model_type);
  p.text_encoder = init_clip_text_model(text_cfg.text, seed + 2);
  finish(p, dir);
  return p;
}

void save_pipeline(const DiffusionPipeline& p, const std::string& dir, Replace replace) {
  const fs::path source(p.source);
  // The classes the source names, where it has a model_index.json (a tokenizer/ of CLIPTokenizerFast).
  nlohmann::json index = {
      {"_class_name", "StableDiffusionPipeline"},       {"_diffusers_version", "0.30.0"},
      {"feature_extractor", {nullptr, nullptr}},        {"requires_safety_checker", false},
      {"safety_checker", {nullptr, nullptr}},           {"text_encoder", {"transformers", "CLIPTextModel"}},
      {"tokenizer", {"transformers", "CLIPTokenizer"}}, {"unet", {"diffusers", "UNet2DConditionModel"}},
      {"vae", {"diffusers", "AutoencoderKL"}}};
  if (fs::exists(source / "model_index.json"))
    index.update(read_json_file((source / "model_index.json").string()));
  const auto scheduler = read_json_file((part(source, "scheduler") / "scheduler_config.json").string());
  index["scheduler"] = {"diffusers", scheduler.value("_class_name", std::string("DDIMScheduler"))};
  save_folder(dir, replace, "", [&](const std::string& tmp_name) {
    const fs::path tmp(tmp_name);
    save_unet(p.unet, (tmp / "unet").string());
    save_vae(p.vae, (tmp / "vae").string());
    save_clip_text_model(p.text_encoder, (tmp / "text_encoder").string());
    copy_files(part(source, "tokenizer"), tmp / "tokenizer");
    copy_files(part(source, "scheduler"), tmp / "scheduler");
    write_text(tmp / "model_index.json", index.dump(2) + "\n");
  });
}

at::Tensor encode_prompts(const DiffusionPipeline& p, const std::vector<std::string>& prompts) {
  const auto& te = p.text_encoder;
  const auto ids =
      clip_input_ids(*p.tokenizer, prompts, te.cfg.max_position_embeddings).to(te.token_embedding.device());
  return clip_text_forward(te, ids).last_hidden_state;
}

int64_t latent_scale(const Vae& v) {
  return int64_t(1) << (v.cfg.block_out_channels.size() - 1);
}

at::Tensor initial_latents(const DiffusionPipeline& p, int64_t n, int64_t height, int64_t width,
                           uint64_t seed, at::Device device, at::ScalarType dtype, const std::string& what) {
  const int64_t f = latent_scale(p.vae);
  if (height <= 0 || width <= 0 || height % f != 0 || width % f != 0)
    fail("{}: images of {} x {} pixels; each side must be a positive multiple of {}", what, height, width, f);
  auto gen = at::detail::createCPUGenerator(seed);
  return at::normal(0.0, 1.0, {n, p.unet.cfg.in_channels, height / f, width / f}, gen)
      .to(at::TensorOptions().dtype(dtype).device(device));
}

at::Tensor guided_output(const UNet& u, const at::Tensor& latents, int64_t t, const at::Tensor& cond,
                         const at::Tensor& uncond, double scale) {
  const int64_t n = latents.size(0);
  const auto steps = at::full({n}, t, at::TensorOptions().dtype(at::kLong).device(latents.device()));
  if (scale == 1) return unet_forward(u, latents, steps, cond);
  const auto both = unet_forward(u, at::cat({latents, latents}), at::cat({steps, steps}),
                                 at::cat({uncond.expand_as(cond), cond}));
  const auto halves = both.chunk(2);
  return cfg_combine(halves[0], halves[1], scale);
}

GuidedSampling read_guided_sampling(const Config& cfg) {
  GuidedSampling g;
  g.steps = cfg.get_int("infer.inference_steps");
  g.guidance_scale = cfg.get_float("infer.guidance_scale");
  g.eta = cfg.get_float("infer.eta");
  if (g.steps < 1) fail("config key 'infer.inference_steps' must be >= 1, got {}", g.steps);
  if (!(g.guidance_scale >= 1))
    fail("config key 'infer.guidance_scale' must be >= 1, got {}", g.guidance_scale);
  if (!(g.eta >= 0 && g.eta <= 1)) fail("config key 'infer.eta' must be in [0, 1], got {}", g.eta);
  return g;
}

at::Tensor decode_images(const Vae& v, const at::Tensor& latents) {
  return ((vae_decode(v, latents) + 1) / 2).clamp(0, 1);
}

}  // namespace aligner
