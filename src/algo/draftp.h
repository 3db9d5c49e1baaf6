// DRaFT+ (configs/draftp.yaml is the schema): reward fine-tuning of a text-to-image latent diffusion
// model through its DDIM sampler, LoRA adapters on the UNet, as NeMo-Aligner runs it.
#pragma once
#include <ATen/ATen.h>

#include <functional>
#include <string>
#include <vector>

#include "core/config.h"
#include "diffusion/ddim.h"
#include "diffusion/pipeline.h"

namespace aligner {

// The whole `aligner draftp` run described by `cfg`.
void run_draftp(const Config& cfg);

// A differentiable score per image: images [N, 3, H, W] in [0, 1] and their prompts -> [N] float32.
using ImageReward =
    std::function<at::Tensor(const at::Tensor& images, const std::vector<std::string>& prompts)>;

struct DraftpOptions {
  double kl_coeff = 1.0;
  int64_t truncation_steps = 1;
  int64_t inference_steps = 50;
  double guidance_scale = 7.5;
  double eta = 0;
  int64_t height = 512, width = 512;
};

// One micro-batch of DRaFT+: images for `prompts` sampled by `unet` from `latents` with gradients
// through the last truncation_steps steps, decoded and scored, and the KL of those steps' guided
// outputs to `base`'s on the same inputs (zero, without the frozen passes, when kl_coeff is 0).
// eta_seeds: one per image, for DDIM's noise when eta > 0 (ddim_sample).
struct DraftpSample {
  at::Tensor images;  // [N, 3, H, W] in [0, 1]
  at::Tensor reward;  // [N]
  at::Tensor kl;      // [N]: mean over the recorded steps and the latent's elements of (eps - eps_base)^2
};
DraftpSample draftp_sample(const DiffusionPipeline& p, const UNet& unet, const UNet& base,
                           const ImageReward& reward, const DraftpOptions& o,
                           const std::vector<std::string>& prompts, const at::Tensor& uncond,
                           const at::Tensor& latents, const std::vector<uint64_t>& eta_seeds);

}  // namespace aligner
