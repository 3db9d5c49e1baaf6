// A text-to-image latent diffusion model in diffusers' folder layout, as Stable Diffusion 1.x and
// 2.x ship: model_index.json, unet/, vae/, text_encoder/ (a CLIPTextModel), tokenizer/ and
// scheduler/. Sampling is DDIM with classifier-free guidance (diffusion/ddim.h).
#pragma once
#include <ATen/ATen.h>

#include <memory>
#include <string>
#include <vector>

#include "core/config.h"
#include "diffusion/clip.h"
#include "diffusion/ddim.h"
#include "diffusion/unet.h"
#include "diffusion/vae.h"
#include "io/hf_checkpoint.h"
#include "text/tokenizer.h"

namespace aligner {

struct DiffusionPipeline {
  std::string source;  // the folder it came from, whose tokenizer/ and scheduler/ a saved copy keeps
  UNet unet;
  Vae vae;
  ClipTextModel text_encoder;
  std::unique_ptr<Tokenizer> tokenizer;
  DdimScheduler scheduler;
};

// Every part of the folder `dir`, the models in `dtype` on `device`. A missing part, a text encoder
// whose width is not the UNet's cross-attention width, or a VAE whose latent channels are not the
// UNet's input is an error naming the folder and the part.
DiffusionPipeline load_pipeline(const std::string& dir, at::Device device, at::ScalarType dtype);

// A pipeline of random weights from a folder laid out as load_pipeline's but holding only the parts'
// config.json files (unet/, vae/, text_encoder/), tokenizer/ and scheduler/: the start of a model
// trained from scratch. float32 on the CPU.
DiffusionPipeline init_pipeline(const std::string& configs, uint64_t seed);

// Writes `p` as a diffusers folder: model_index.json (the source's, where it has one), the three
// models, tokenizer/ and scheduler/ copied from p.source; with save_folder's guarantees (a new folder
// renamed into place; what is at `dir` replaced only as `replace` allows).
void save_pipeline(const DiffusionPipeline& p, const std::string& dir, Replace replace);

// The prompts' embeddings the UNet attends to: the text encoder's last hidden state over the ids
// padded (and cut) to its max_position_embeddings, as diffusers' pipelines encode a prompt.
// [prompts, 77, hidden]; the empty prompt "" is the unconditional one.
at::Tensor encode_prompts(const DiffusionPipeline& p, const std::vector<std::string>& prompts);

// How much smaller the latents are than the image: 2^(VAE blocks - 1), 8 for Stable Diffusion.
int64_t latent_scale(const Vae& v);
// Starting noise for `n` images of height x width (multiples of latent_scale, else an error naming
// `what`), drawn from `seed` on the CPU (so that every device starts alike): [n, C, h, w] in dtype.
at::Tensor initial_latents(const DiffusionPipeline& p, int64_t n, int64_t height, int64_t width,
                           uint64_t seed, at::Device device, at::ScalarType dtype, const std::string& what);

// The model's output at (latents, t) with classifier-free guidance: one UNet pass over the
// unconditional and conditional halves together, combined with `scale`; scale 1 runs the
// conditional half only. cond and uncond [N, L, D] (uncond may be [1, L, D], broadcast).
at::Tensor guided_output(const UNet& u, const at::Tensor& latents, int64_t t, const at::Tensor& cond,
                         const at::Tensor& uncond, double scale);

// infer.inference_steps, infer.guidance_scale and infer.eta of a config: how images are sampled,
// checked (errors name the key).
struct GuidedSampling {
  int64_t steps = 50;
  double guidance_scale = 7.5;
  double eta = 0;
};
GuidedSampling read_guided_sampling(const Config& cfg);

// Latents to images [N, 3, H, W] in [0, 1]: the VAE's decoding, mapped from [-1, 1] and clamped, as
// NeMo-Aligner's DRaFT+ hands images to its reward (gradients stop where the clamp bites).
at::Tensor decode_images(const Vae& v, const at::Tensor& latents);

}  // namespace aligner
