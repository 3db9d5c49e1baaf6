// Training a text-to-image latent diffusion model on captioned images (configs/diffusion-train.yaml is
// the schema), one part at a time as diffusers' train_text_to_image.py and NeMo's Stable Diffusion
// training do: the VAE on the images alone, or the UNet on their latents with the rest frozen.
#pragma once
#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <optional>
#include <string>
#include <vector>

#include "core/config.h"
#include "diffusion/pipeline.h"

namespace aligner {

// The whole `aligner diffusion-train` run described by `cfg`.
void run_diffusion_train(const Config& cfg);

struct CaptionedImage {
  at::Tensor image;  // float32 [3, size, size] in [-1, 1], CPU
  std::string caption;
};

// Every line of the JSONL `path`: the PNG at image_field (relative to the file's folder) and the
// caption at caption_field. A missing field or file, a file that is not a valid PNG or
// an image that is not size x size is an error naming the file and line. Gray images are repeated
// over the three channels and alpha is dropped, as PIL's convert("RGB") does.
std::vector<CaptionedImage> read_captioned_images(const std::string& path, const std::string& image_field,
                                                  const std::string& caption_field, int64_t size);

// The PNG file that field `field` of a JSONL line names, relative to `folder`: a missing field or
// file, or a file that does not start as a PNG does, is an error naming `where` and the field.
std::string png_field(const nlohmann::json& line, const std::string& field, const std::string& folder,
                      const std::string& where);

// The PNG file `file` as uint8 [3, H, W]: gray repeated over the three channels and alpha dropped, as
// PIL's convert("RGB") does. An unreadable file is an error naming `where` and the file.
at::Tensor read_rgb_png(const std::string& file, const std::string& where);

// The VAE's loss terms per image of images [N, 3, H, W] in [-1, 1]: the reconstruction error (mean
// over the pixels of the squared, or with l1 the absolute, difference) of the decoded latent, drawn
// from the encoder's Gaussian with `gen` (on the images' device) or its mean without, and the KL of
// that Gaussian to N(0, I), a mean over the latent's elements.
struct VaeLossTerms {
  at::Tensor recon, kl;  // [N] float32
};
VaeLossTerms vae_loss_terms(const Vae& v, const at::Tensor& images, bool l1,
                            std::optional<at::Generator> gen);

// 1 / std of the encoder's means (unscaled latents) over `images` [N, 3, H, W], encoded `batch` at a
// time: the scaling_factor that gives the diffusion model latents of unit variance.
double measure_scaling_factor(const Vae& v, const at::Tensor& images, int64_t batch);

}  // namespace aligner
