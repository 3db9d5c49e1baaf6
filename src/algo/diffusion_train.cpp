#include "algo/diffusion_train.h"

#include <ATen/CPUGeneratorImpl.h>

#include <filesystem>
#include <fstream>
#include <optional>
#include <string_view>

#include "algo/data_stream.h"
#include "algo/rollout.h"
#include "core/error.h"
#include "core/json.h"
#include "core/log.h"
#include "gen/sampling.h"
#include "io/hf_checkpoint.h"
#include "io/jsonl.h"
#include "io/png.h"
#include "train/run_setup.h"
#include "train/trainer.h"

namespace aligner {

namespace fs = std::filesystem;

namespace {

enum class Part { kVae, kUNet };

// Salts of step_seed: the draws on the CPU (flips, caption dropout, timesteps, the diffusion noise),
// the VAE's posterior sample on the model's device, and a validation image's fixed draws.
constexpr int64_t kCpuSalt = 0, kLatentSalt = 1, kValidationSalt = 2;
constexpr int64_t kValidationImages = 8;  // shown in the validation grid

// The UNet's loss per image: `latents` (scaled) noised at `timesteps` by the scheduler's forward
// process, the prediction against the target of its prediction_type, mean squared over the elements.
at::Tensor denoising_loss(const DiffusionPipeline& p, const at::Tensor& latents, const at::Tensor& cond,
                          const at::Tensor& noise, const at::Tensor& timesteps) {
  const auto& s = p.scheduler;
  const auto pred = unet_forward(p.unet, add_noise(s, latents, noise, timesteps), timesteps, cond);
  at::Tensor target = noise;
  if (s.config.prediction_type == PredictionType::kVPrediction)
    target = velocity(s, latents, noise, timesteps);
  if (s.config.prediction_type == PredictionType::kSample) target = latents;
  return (pred.to(at::kFloat) - target.to(at::kFloat)).pow(2).flatten(1).mean(1);
}

// The encoder's Gaussian's sample (training) or its mean (validation), times scaling_factor: the
// latents the UNet sees.
at::Tensor scaled_latents(const Vae& v, const LatentDistribution& d, std::optional<at::Generator> gen) {
  return gen ? sample_latents(v, d, gen) : d.mean * v.cfg.scaling_factor;
}

at::Tensor diffusion_latents(const Vae& v, const at::Tensor& images, std::optional<at::Generator> gen) {
  return scaled_latents(v, vae_encode(v, images), gen);
}

class DiffusionTrain final : public IndexedAlgorithm {
 public:
  DiffusionTrain(const Config& cfg, const DiffusionPipeline& p, Part part,
                 const std::vector<CaptionedImage>& train, int rank, int world)
      : p_(p), part_(part), train_(train), rank_(rank), world_(world) {
    seed_ = uint64_t(cfg.get_int("trainer.seed"));
    micro_ = cfg.get_int("trainer.micro_batch_size");
    epochs_ = data_epochs(cfg);
    flip_ = cfg.get_bool("data.random_flip");
    caption_dropout_ = cfg.get_float("train.caption_dropout");
    if (!(caption_dropout_ >= 0 && caption_dropout_ <= 1))
      fail("config key 'train.caption_dropout' must be in [0, 1], got {}", caption_dropout_);
    const std::string recon = cfg.get_string("vae.recon_loss");
    if (recon != "l2" && recon != "l1") fail("config key 'vae.recon_loss' expects l2 or l1, got '{}'", recon);
    l1_ = recon == "l1";
    kl_weight_ = cfg.get_float("vae.kl_weight");
    if (!(kl_weight_ >= 0)) fail("config key 'vae.kl_weight' must be >= 0, got {}", kl_weight_);
    infer_ = read_guided_sampling(cfg);
    sampler_ = make_sampler(int64_t(train_.size()), rank, world, cfg.get_bool("data.shuffle"), seed_);

    // data.validation: captioned images when its first line has data.image_field, else prompts.
    const std::string val = cfg.get_string("data.validation");
    if (!val.empty()) {
      const std::string image_field = cfg.get_string("data.image_field");
      JsonlFile f(val);
      if (f.read(0).contains(image_field)) {
        val_ = read_captioned_images(val, image_field, cfg.get_string("data.caption_field"),
                                     cfg.get_int("data.image_size"));
        for (const auto& v : val_) prompts_.push_back(v.caption);
      } else if (part_ == Part::kVae) {
        fail("data.validation {}: its first line has no \"{}\"; train.part vae validates on images", val,
             image_field);
      } else {
        prompts_ = read_string_field(val, cfg.get_string("data.prompt_field"));
      }
    }
    at::NoGradGuard no_grad;
    if (part_ == Part::kUNet) uncond_ = encode_prompts(p_, {""});
  }

  int64_t train_examples() const override { return int64_t(train_.size()); }

  LossSums loss(int64_t i) override {
    const auto& batch = step_.at(i);
    const int64_t n = int64_t(batch.size());
    const uint64_t seed = step_seed(seed_, position_, rank_, i);
    auto gen = at::detail::createCPUGenerator(step_seed(seed, 0, 0, kCpuSalt));
    std::vector<at::Tensor> images;
    std::vector<std::string> captions;
    for (const auto& e : batch) {
      images.push_back(train_[size_t(e.index)].image);
      captions.push_back(train_[size_t(e.index)].caption);
    }
    auto x = at::stack(images);
    if (flip_) x = at::where(at::rand({n, 1, 1, 1}, gen) < 0.5, x.flip(3), x);
    x = x.to(device(), dtype());
    const auto latent_gen = make_generator(device(), step_seed(seed, 0, 0, kLatentSalt));
    LossSums out;
    out.units = double(n);
    if (part_ == Part::kVae) {
      const auto t = vae_loss_terms(p_.vae, x, l1_, latent_gen);
      out.loss = (t.recon + kl_weight_ * t.kl).sum();
      out.metrics = {{"recon", t.recon.sum().item<double>(), double(n)},
                     {"kl", t.kl.sum().item<double>(), double(n)}};
      return out;
    }
    const auto drop = at::rand({n}, gen);
    for (int64_t k = 0; k < n; ++k)
      if (drop[k].item<double>() < caption_dropout_) captions[size_t(k)] = "";
    const auto timesteps = at::randint(0, p_.scheduler.config.num_train_timesteps, {n}, gen,
                                       at::TensorOptions().dtype(at::kLong));
    at::Tensor latents, cond;
    {
      at::NoGradGuard no_grad;
      latents = diffusion_latents(p_.vae, x, latent_gen);
      cond = encode_prompts(p_, captions);
    }
    const auto noise = at::randn(latents.sizes(), gen).to(latents.options());
    out.loss = denoising_loss(p_, latents, cond, noise, timesteps.to(device())).sum();
    return out;
  }

  // The loss over this rank's share of the captioned validation images, each with its own fixed
  // draws; and on the main rank the images of the grid.
  ValidationSums validate() override {
    ValidationSums v;
    if (part_ == Part::kVae) v.metric_names = {"recon", "kl"};
    for (size_t first = size_t(rank_); first < val_.size(); first += size_t(world_ * micro_)) {
      std::vector<at::Tensor> images, noise, timesteps;
      std::vector<std::string> captions;
      for (size_t k = first; k < val_.size() && images.size() < size_t(micro_); k += size_t(world_)) {
        images.push_back(val_[k].image);
        captions.push_back(val_[k].caption);
        auto gen = at::detail::createCPUGenerator(step_seed(seed_, int64_t(k), 0, kValidationSalt));
        timesteps.push_back(at::randint(0, p_.scheduler.config.num_train_timesteps, {1}, gen,
                                        at::TensorOptions().dtype(at::kLong)));
        const int64_t f = latent_scale(p_.vae), side = val_[k].image.size(1) / f;
        noise.push_back(at::randn({1, p_.unet.cfg.in_channels, side, side}, gen));
      }
      const auto x = at::stack(images).to(device(), dtype());
      const double n = double(images.size());
      LossSums part;
      part.units = n;
      if (part_ == Part::kVae) {
        const auto t = vae_loss_terms(p_.vae, x, l1_, std::nullopt);
        part.loss = (t.recon + kl_weight_ * t.kl).sum();
        part.metrics = {{"recon", t.recon.sum().item<double>(), n}, {"kl", t.kl.sum().item<double>(), n}};
      } else {
        const auto latents = diffusion_latents(p_.vae, x, std::nullopt);
        part.loss = denoising_loss(p_, latents, encode_prompts(p_, captions),
                                   at::cat(noise).to(latents.options()), at::cat(timesteps).to(device()))
                        .sum();
      }
      v.parts.push_back(part);
    }
    if (rank_ == 0 && part_ == Part::kVae && !val_.empty()) {
      // Each row: an image, then its reconstruction from the encoder's mean.
      std::vector<at::Tensor> shown;
      for (size_t k = 0; k < val_.size() && int64_t(k) < kValidationImages; ++k) {
        const auto x = val_[k].image.unsqueeze(0).to(device(), dtype());
        shown.push_back(x[0]);
        shown.push_back(vae_decode(p_.vae, diffusion_latents(p_.vae, x, std::nullopt))[0]);
      }
      const auto grid = image_grid(at::stack(shown).to(at::kFloat), 2, /*minus_one_to_one=*/true);
      v.images.push_back({"reconstructions", encode_png(grid), grid.size(0), grid.size(1), grid.size(2)});
    }
    if (rank_ == 0 && part_ == Part::kUNet && !prompts_.empty()) {
      // DDIM from fixed noise per prompt, so that the grids of successive validations compare.
      const int64_t n = std::min<int64_t>(int64_t(prompts_.size()), kValidationImages);
      const std::vector<std::string> prompts(prompts_.begin(), prompts_.begin() + n);
      const int64_t size = image_size();
      std::vector<at::Tensor> noise;
      for (int64_t k = 0; k < n; ++k)
        noise.push_back(initial_latents(p_, 1, size, size, step_seed(seed_, k, 0, kValidationSalt), device(),
                                        dtype(), "data.image_size"));
      const auto cond = encode_prompts(p_, prompts);
      const EpsFn eps = [&](const at::Tensor& x, int64_t t, int64_t) {
        return guided_output(p_.unet, x, t, cond, uncond_, infer_.guidance_scale);
      };
      std::vector<uint64_t> eta_seeds;
      for (int64_t k = 0; k < n; ++k) eta_seeds.push_back(step_seed(seed_, k, 0, kLatentSalt));
      const auto r = ddim_sample(p_.scheduler, {infer_.steps, infer_.eta, eta_seeds, 0}, eps, at::cat(noise));
      // As diffusers' pipelines, the final latents are decoded.
      const auto grid =
          image_grid(decode_images(p_.vae, r.latents).to(at::kFloat), 4, /*minus_one_to_one=*/false);
      v.images.push_back({"samples", encode_png(grid), grid.size(0), grid.size(1), grid.size(2)});
    }
    return v;
  }

 private:
  at::Device device() const { return p_.unet.conv_in.weight.device(); }
  at::ScalarType dtype() const { return p_.unet.conv_in.weight.scalar_type(); }
  int64_t image_size() const { return train_.front().image.size(1); }

  const DiffusionPipeline& p_;
  Part part_;
  const std::vector<CaptionedImage>& train_;
  int rank_ = 0, world_ = 1;
  uint64_t seed_ = 0;
  GuidedSampling infer_;
  bool flip_ = false, l1_ = false;
  double caption_dropout_ = 0, kl_weight_ = 0;
  std::vector<CaptionedImage> val_;
  std::vector<std::string> prompts_;  // the validation grid's
  at::Tensor uncond_;
};

}  // namespace

std::vector<CaptionedImage> read_captioned_images(const std::string& path, const std::string& image_field,
                                                  const std::string& caption_field, int64_t size) {
  JsonlFile f(path);
  const fs::path folder = fs::path(path).parent_path();
  std::vector<CaptionedImage> out;
  for (int64_t i = 0; i < f.size(); ++i) {
    const auto where = f.where(i);
    const auto line = f.read(i);
    CaptionedImage c;
    c.caption = get_field<std::string>(line, caption_field, where);
    const std::string file = png_field(line, image_field, folder.string(), where);
    const auto px = read_rgb_png(file, where);
    if (px.size(1) != size || px.size(2) != size)
      fail("{}: image {} is {} x {} pixels; data.image_size is {}", where, file, px.size(2), px.size(1),
           size);
    c.image = px.to(at::kFloat).div(127.5).sub(1);
    out.push_back(std::move(c));
  }
  return out;
}

std::string png_field(const nlohmann::json& line, const std::string& field, const std::string& folder,
                      const std::string& where) {
  const std::string file = (fs::path(folder) / get_field<std::string>(line, field, where)).string();
  if (!fs::is_regular_file(file)) fail("{}: field \"{}\": image {} does not exist", where, field, file);
  char magic[8] = {};
  std::ifstream(file, std::ios::binary).read(magic, sizeof magic);
  if (std::string_view(magic, sizeof magic) != std::string_view("\x89PNG\r\n\x1a\n", 8))
    fail("{}: field \"{}\": {} is not a PNG file (convert JPEG and other images to PNG)", where, field, file);
  return file;
}

at::Tensor read_rgb_png(const std::string& file, const std::string& where) {
  auto px = decode_png(read_text_file(file), fmt::format("{}: {}", where, file));
  // As PIL's convert("RGB"): gray repeated over the channels, alpha dropped.
  px = px.size(2) < 3 ? px.narrow(2, 0, 1).expand({px.size(0), px.size(1), 3}) : px.narrow(2, 0, 3);
  return px.permute({2, 0, 1}).contiguous();
}

VaeLossTerms vae_loss_terms(const Vae& v, const at::Tensor& images, bool l1,
                            std::optional<at::Generator> gen) {
  const auto d = vae_encode(v, images);
  // sample_latents scales by scaling_factor and vae_decode divides by it: the autoencoder trains on
  // its own (unscaled) latents whatever the config's factor.
  const auto diff = vae_decode(v, scaled_latents(v, d, gen)).to(at::kFloat) - images.to(at::kFloat);
  VaeLossTerms t;
  t.recon = (l1 ? diff.abs() : diff.pow(2)).flatten(1).mean(1);
  const auto mean = d.mean.to(at::kFloat), logvar = d.logvar.to(at::kFloat);
  t.kl = (0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar)).flatten(1).mean(1);
  return t;
}

double measure_scaling_factor(const Vae& v, const at::Tensor& images, int64_t batch) {
  at::NoGradGuard no_grad;
  const auto& w = v.encoder.conv_in.weight;
  std::vector<at::Tensor> means;
  for (int64_t first = 0; first < images.size(0); first += batch) {
    const auto x = images.narrow(0, first, std::min(batch, images.size(0) - first));
    means.push_back(
        vae_encode(v, x.to(w.device(), w.scalar_type())).mean.to(at::kCPU, at::kDouble).flatten());
  }
  const double std = at::cat(means).std().item<double>();
  if (!(std > 0)) fail("the VAE's latent means have no spread (std {}): no scaling_factor to measure", std);
  return 1 / std;
}

void run_diffusion_train(const Config& cfg) {
  const auto opt = read_trainer_options(cfg);
  const auto optim = read_optimizer_settings(cfg, "optim", "trainer.grad_clip");
  const std::string part_name = cfg.get_string("train.part");
  if (part_name != "vae" && part_name != "unet")
    fail("config key 'train.part' expects vae or unet, got '{}'", part_name);
  const Part part = part_name == "vae" ? Part::kVae : Part::kUNet;
  const int64_t scaling_images = cfg.get_int("vae.scaling_images");
  if (scaling_images < 1) fail("config key 'vae.scaling_images' must be >= 1, got {}", scaling_images);
  const std::string model_dir = cfg.get_string("model.path"), train_path = cfg.get_string("data.train");
  if (model_dir.empty()) fail("config key 'model.path' must be set");
  if (train_path.empty()) fail("config key 'data.train' must be set");
  auto ctx = init_run(cfg);
  const auto dtype = parse_compute_dtype(cfg.get_string("model.dtype"), ctx.device, "model.dtype");
  DiffusionPipeline p = load_pipeline(model_dir, ctx.device, dtype);
  const int64_t size = cfg.get_int("data.image_size");
  // Every image must be one the VAE encodes to whole latents: checked before the data is read.
  initial_latents(p, 1, size, size, 0, at::kCPU, at::kFloat, "data.image_size");
  // The data sets this trains on are small: every image is decoded once and kept in memory.
  const auto train_data = read_captioned_images(train_path, cfg.get_string("data.image_field"),
                                                cfg.get_string("data.caption_field"), size);
  log_info("data.train {}: {} images of {} x {}", train_path, train_data.size(), size, size);

  TrainableModule module;
  module.name = part_name;
  module.optim = optim;
  if (part == Part::kVae) {
    module.other.parameters = [&p] { return named_parameters(p.vae); };
    const int64_t micro = cfg.get_int("trainer.micro_batch_size");
    module.other.save = [&p, &train_data, scaling_images, micro](const std::string& dir) {
      std::vector<at::Tensor> images;
      for (size_t k = 0; k < train_data.size() && int64_t(k) < scaling_images; ++k)
        images.push_back(train_data[k].image);
      p.vae.cfg.scaling_factor = measure_scaling_factor(p.vae, at::stack(images), micro);
      log_info("the VAE's scaling_factor over {} training images: {}", images.size(),
               p.vae.cfg.scaling_factor);
      save_pipeline(p, dir, Replace::anything);
    };
  } else {
    module.other.parameters = [&p] { return named_parameters(p.unet); };
    module.other.save = [&p](const std::string& dir) { save_pipeline(p, dir, Replace::anything); };
  }
  module.params = module.other.parameters();
  DiffusionTrain algo(cfg, p, part, train_data, ctx.dist.rank(), ctx.dist.world_size());
  train(cfg, opt, {module}, algo, ctx.dist);
}

}  // namespace aligner
