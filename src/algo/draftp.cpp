#include "algo/draftp.h"

#include <memory>
#include <optional>

#include "algo/data_stream.h"
#include "algo/rollout.h"
#include "core/error.h"
#include "diffusion/shapes_data.h"
#include "diffusion/unet_lora.h"
#include "io/hf_checkpoint.h"
#include "io/jsonl.h"
#include "io/png.h"
#include "io/prompt_source.h"
#include "train/run_setup.h"
#include "train/trainer.h"

namespace aligner {

namespace {

// The images DDIM draws for prompts embedded as `cond`, gradients through the last grad_last_k steps.
SampleResult sample(const DiffusionPipeline& p, const UNet& unet, const DraftpOptions& o,
                    const at::Tensor& cond, const at::Tensor& uncond, const at::Tensor& latents,
                    const std::vector<uint64_t>& eta_seeds, int64_t grad_last_k) {
  const EpsFn eps = [&](const at::Tensor& x, int64_t t, int64_t) {
    return guided_output(unet, x, t, cond, uncond, o.guidance_scale);
  };
  return ddim_sample(p.scheduler, {o.inference_steps, o.eta, eta_seeds, grad_last_k}, eps, latents);
}

ImageReward make_reward(const Config& cfg, at::Device device, at::ScalarType dtype) {
  const std::string kind = cfg.get_string("reward.kind"), dir = cfg.get_string("reward.model");
  if (kind == "redness") {
    if (!dir.empty()) fail("config key 'reward.model' is set, but reward.kind redness takes no model");
    return [](const at::Tensor& images, const std::vector<std::string>&) { return redness_reward(images); };
  }
  if (kind != "clip") fail("config key 'reward.kind' expects clip or redness, got '{}'", kind);
  if (dir.empty()) fail("config key 'reward.model' must be set for reward.kind clip: a CLIPModel folder");
  auto model = std::make_shared<ClipModel>(load_clip_model(dir, device, dtype));
  if (!model->cfg.has_vision)
    fail("reward.model {}: a CLIPModel (text and vision towers) is needed, not a text encoder alone", dir);
  std::shared_ptr<Tokenizer> tok = load_tokenizer(dir);
  check_tokenizer_fits(*tok, model->text.cfg.vocab_size, dir);
  return [model, tok](const at::Tensor& images, const std::vector<std::string>& prompts) {
    const auto ids = clip_input_ids(*tok, prompts, model->text.cfg.max_position_embeddings)
                         .to(model->text.token_embedding.device());
    return clip_score(*model, images, ids).to(at::kFloat);
  };
}

DraftpOptions read_options(const Config& cfg) {
  DraftpOptions o;
  o.kl_coeff = cfg.get_float("draftp.kl_coeff");
  o.truncation_steps = cfg.get_int("draftp.truncation_steps");
  const auto g = read_guided_sampling(cfg);
  o.inference_steps = g.steps;
  o.guidance_scale = g.guidance_scale;
  o.eta = g.eta;
  o.height = cfg.get_int("infer.height");
  o.width = cfg.get_int("infer.width");
  if (!(o.kl_coeff >= 0)) fail("config key 'draftp.kl_coeff' must be >= 0, got {}", o.kl_coeff);
  if (o.truncation_steps < 1 || o.truncation_steps > o.inference_steps)
    fail("config key 'draftp.truncation_steps' must be in [1, infer.inference_steps = {}], got {}",
         o.inference_steps, o.truncation_steps);
  return o;
}

// lora.*: DRaFT+ trains adapters only.
LoraConfig read_unet_lora(const Config& cfg) {
  LoraConfig c;
  c.rank = cfg.get_int("lora.rank");
  c.alpha = cfg.get_float("lora.alpha");
  c.targets = cfg.get_string_list("lora.target_modules");
  c.gaussian_init = read_lora_gaussian_init(cfg);
  if (c.rank < 1) fail("config key 'lora.rank' must be >= 1: DRaFT+ trains LoRA adapters on the UNet");
  if (!(c.alpha > 0)) fail("config key 'lora.alpha' must be > 0, got {}", c.alpha);
  if (c.targets.empty()) fail("config key 'lora.target_modules' is empty");
  for (const auto& t : c.targets)
    if (std::find(kUNetLoraTargets.begin(), kUNetLoraTargets.end(), t) == kUNetLoraTargets.end())
      fail("config key 'lora.target_modules': unknown module '{}' (expected {})", t,
           fmt::join(kUNetLoraTargets, ", "));
  return c;
}

// Salts of step_seed: the starting noise, and DDIM's own noise (eta > 0).
constexpr int64_t kNoiseSalt = 0, kEtaSalt = 1 << 20;
constexpr int64_t kValidationImages = 8;  // prompts shown in the validation grid

class Draftp final : public IndexedAlgorithm {
 public:
  Draftp(const Config& cfg, const DiffusionPipeline& p, const UNet& base, ImageReward reward, DraftpOptions o,
         int rank, int world)
      : p_(p), base_(base), reward_(std::move(reward)), o_(o), rank_(rank), world_(world) {
    const std::string field = cfg.get_string("data.prompt_field");
    const std::string train = cfg.get_string("data.train"), val = cfg.get_string("data.validation");
    if (train.empty()) fail("config key 'data.train' must be set");
    train_ = read_prompts(train, field);
    if (!val.empty()) val_ = read_prompts(val, field);
    seed_ = uint64_t(cfg.get_int("trainer.seed"));
    micro_ = cfg.get_int("trainer.micro_batch_size");
    epochs_ = data_epochs(cfg);
    sampler_ = make_sampler(int64_t(train_.size()), rank, world, cfg.get_bool("data.shuffle"), seed_);
    at::NoGradGuard no_grad;
    uncond_ = encode_prompts(p_, {""});
    // Every image size must be one the VAE decodes: checked now rather than at the first step.
    initial_latents(p_, 1, o_.height, o_.width, 0, at::kCPU, at::kFloat, "infer.height and infer.width");
  }

  int64_t train_examples() const override { return int64_t(train_.size()); }

  LossSums loss(int64_t i) override {
    std::vector<std::string> prompts;
    for (const auto& e : step_.at(i)) prompts.push_back(train_[size_t(e.index)]);
    const int64_t n = int64_t(prompts.size());
    const uint64_t seed = step_seed(seed_, position_, rank_, i);
    const auto latents = initial_latents(p_, n, o_.height, o_.width, step_seed(seed, 0, 0, kNoiseSalt),
                                         device(), dtype(), "infer.height and infer.width");
    std::vector<uint64_t> eta_seeds;
    for (int64_t r = 0; r < n; ++r) eta_seeds.push_back(step_seed(seed, r, 0, kEtaSalt));
    const auto s = draftp_sample(p_, p_.unet, base_, reward_, o_, prompts, uncond_, latents, eta_seeds);
    LossSums out;
    out.loss = (o_.kl_coeff * s.kl - s.reward).sum();
    out.units = double(n);
    out.metrics = {{"reward", s.reward.sum().item<double>(), double(n)},
                   {"kl", s.kl.sum().item<double>(), double(n)}};
    return out;
  }

  // This rank's share of the validation prompts, each from noise of its own (keyed by its index, so
  // the same whatever the ranks and batches), drawn by the trained and by the frozen UNet. The frozen
  // UNet's images never change: they are drawn once.
  ValidationSums validate() override {
    ValidationSums v;
    v.metric_names = {"reward", "reward_base"};
    std::vector<at::Tensor> shown;
    size_t chunk = 0;
    for (size_t first = size_t(rank_); first < val_.size(); first += size_t(world_ * micro_), ++chunk) {
      std::vector<std::string> prompts;
      std::vector<at::Tensor> noise;
      std::vector<uint64_t> eta_seeds;
      for (size_t k = first; k < val_.size() && prompts.size() < size_t(micro_); k += size_t(world_)) {
        prompts.push_back(val_[k]);
        noise.push_back(initial_latents(p_, 1, o_.height, o_.width,
                                        step_seed(seed_, int64_t(k), 0, kNoiseSalt), device(), dtype(),
                                        "infer.height and infer.width"));
        eta_seeds.push_back(step_seed(seed_, int64_t(k), 0, kEtaSalt));
      }
      const auto latents = at::cat(noise);
      const auto cond = encode_prompts(p_, prompts);
      const auto images =
          decode_images(p_.vae, sample(p_, p_.unet, o_, cond, uncond_, latents, eta_seeds, 0).pred_original);
      if (chunk == base_images_.size()) {
        const auto base =
            decode_images(p_.vae, sample(p_, base_, o_, cond, uncond_, latents, eta_seeds, 0).pred_original);
        base_images_.push_back({base, reward_(base, prompts).sum().item<double>()});
      }
      const auto& [base, base_reward] = base_images_[chunk];
      const double n = double(prompts.size());
      LossSums part;
      part.metrics = {{"reward", reward_(images, prompts).sum().item<double>(), n},
                      {"reward_base", base_reward, n}};
      v.parts.push_back(part);
      for (int64_t k = 0; k < images.size(0) && int64_t(shown.size()) < 2 * kValidationImages; ++k) {
        shown.push_back(images[k]);
        shown.push_back(base[k]);
      }
    }
    if (!shown.empty()) {
      // Each row: the trained model's image, then the frozen one's from the same noise.
      const auto grid = image_grid(at::stack(shown).to(at::kFloat), 2, /*minus_one_to_one=*/false);
      v.images.push_back({"trained_vs_base", encode_png(grid), grid.size(0), grid.size(1), grid.size(2)});
    }
    return v;
  }

 private:
  at::Device device() const { return p_.unet.conv_in.weight.device(); }
  at::ScalarType dtype() const { return p_.unet.conv_in.weight.scalar_type(); }

  const DiffusionPipeline& p_;
  const UNet& base_;
  ImageReward reward_;
  DraftpOptions o_;
  int rank_ = 0, world_ = 1;
  uint64_t seed_ = 0;
  std::vector<std::string> train_, val_;
  at::Tensor uncond_;
  std::vector<std::pair<at::Tensor, double>> base_images_;  // per validation batch: images, summed reward
};

}  // namespace

DraftpSample draftp_sample(const DiffusionPipeline& p, const UNet& unet, const UNet& base,
                           const ImageReward& reward, const DraftpOptions& o,
                           const std::vector<std::string>& prompts, const at::Tensor& uncond,
                           const at::Tensor& latents, const std::vector<uint64_t>& eta_seeds) {
  if (o.truncation_steps < 1) fail("DRaFT+ needs truncation_steps >= 1, got {}", o.truncation_steps);
  at::Tensor cond;
  {
    at::NoGradGuard no_grad;
    cond = encode_prompts(p, prompts);
  }
  const auto r = sample(p, unet, o, cond, uncond, latents, eta_seeds, o.truncation_steps);
  DraftpSample s;
  s.images = decode_images(p.vae, r.pred_original);
  s.reward = reward(s.images, prompts);
  // NeMo-Aligner's KL: the frozen model's guided output on the same step inputs, a constant. Without
  // a KL term (kl_coeff 0) the frozen passes are skipped, as there.
  if (o.kl_coeff == 0) {
    s.kl = at::zeros({latents.size(0)}, at::TensorOptions().dtype(at::kFloat).device(latents.device()));
    return s;
  }
  std::vector<at::Tensor> kl;
  for (const auto& step : r.recorded) {
    at::Tensor frozen;
    {
      at::NoGradGuard no_grad;
      frozen = guided_output(base, step.latents_in, step.t, cond, uncond, o.guidance_scale);
    }
    kl.push_back((step.model_output.to(at::kFloat) - frozen.to(at::kFloat)).pow(2).flatten(1).mean(1));
  }
  s.kl = at::stack(kl).mean(0);
  return s;
}

void run_draftp(const Config& cfg) {
  const auto opt = read_trainer_options(cfg);
  const auto optim = read_optimizer_settings(cfg, "optim", "trainer.grad_clip");
  const auto o = read_options(cfg);
  const auto lora = read_unet_lora(cfg);
  const std::string model_dir = cfg.get_string("model.path");
  if (model_dir.empty()) fail("config key 'model.path' must be set");
  auto ctx = init_run(cfg);
  const auto dtype = parse_compute_dtype(cfg.get_string("model.dtype"), ctx.device, "model.dtype");
  DiffusionPipeline p = load_pipeline(model_dir, ctx.device, dtype);
  const auto reward = make_reward(cfg, ctx.device, dtype);
  add_unet_adapters(p.unet, lora, uint64_t(cfg.get_int("trainer.seed")));
  // The frozen UNet for the KL term and the validation's comparison: the same weights, adapters off.
  const UNet base = unet_without_adapters(p.unet);

  TrainableModule module;
  module.name = "unet";
  module.other.parameters = [&p] {
    auto all = named_parameters(p.unet);
    for (auto& a : unet_adapter_parameters(p.unet)) all.push_back(std::move(a));
    return all;
  };
  module.other.save = [&p](const std::string& dir) { save_unet_adapter(p.unet, dir); };
  module.params = unet_adapter_parameters(p.unet);
  module.optim = optim;
  Draftp algo(cfg, p, base, reward, o, ctx.dist.rank(), ctx.dist.world_size());
  train(cfg, opt, {module}, algo, ctx.dist);
}

}  // namespace aligner
