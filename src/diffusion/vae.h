// diffusers' AutoencoderKL as Stable Diffusion uses it: a diffusers vae/ folder (config.json +
// diffusion_pytorch_model.safetensors) loads as it is, under diffusers' tensor names (and the older
// names of the mid-block attention that Stable Diffusion 1.5's files carry).
#pragma once
#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "diffusion/blocks.h"

namespace aligner {

struct VaeConfig {
  int64_t in_channels = 3;
  int64_t out_channels = 3;
  int64_t latent_channels = 4;
  std::vector<int64_t> block_out_channels;  // one DownEncoderBlock2D and one UpDecoderBlock2D each
  int64_t layers_per_block = 1;
  int64_t norm_num_groups = 32;
  int64_t sample_size = 32;  // image side the model was trained at (informational; diffusers' default)
  double scaling_factor = 0.18215;
  bool use_quant_conv = true;
  bool use_post_quant_conv = true;
  bool mid_block_add_attention = true;
  bool force_upcast = true;  // a hint to pipelines, kept for the round trip
};

// diffusers' vae/config.json at `path`; an option aligner does not implement or a malformed value
// is a one-line error naming the file and the key.
VaeConfig parse_vae_config(const nlohmann::json& config, const std::string& path);
VaeConfig load_vae_config(const std::string& path);
nlohmann::json vae_config_json(const VaeConfig& cfg);

// UNetMidBlock2D's attention: one head over all channels, group-normed input, residual.
struct VaeAttention {
  GroupNorm group_norm;  // eps 1e-6
  Attention attn;        // to_q, to_k, to_v, to_out.0, with biases
};

struct VaeMidBlock {
  std::vector<ResnetBlock2D> resnets;    // 2
  std::vector<VaeAttention> attentions;  // 1, none without mid_block_add_attention
};

struct VaeBlock {  // DownEncoderBlock2D / UpDecoderBlock2D
  std::vector<ResnetBlock2D> resnets;
  std::vector<Downsample2D> downsamplers;  // encoder blocks but the last
  std::vector<Upsample2D> upsamplers;      // decoder blocks but the last
};

struct VaeEncoder {
  Conv2d conv_in;
  std::vector<VaeBlock> down_blocks;
  VaeMidBlock mid_block;
  GroupNorm conv_norm_out;
  Conv2d conv_out;  // 2 x latent_channels: mean and log-variance
};

struct VaeDecoder {
  Conv2d conv_in;
  VaeMidBlock mid_block;
  std::vector<VaeBlock> up_blocks;
  GroupNorm conv_norm_out;
  Conv2d conv_out;
};

struct Vae {
  VaeConfig cfg;
  VaeEncoder encoder;
  Conv2d quant_conv;       // 1x1; undefined weight without use_quant_conv
  Conv2d post_quant_conv;  // 1x1; undefined weight without use_post_quant_conv
  VaeDecoder decoder;
};

// Uninitialised weights of the config's shapes (the meta device holds no memory).
Vae allocate_vae(const VaeConfig& cfg, const at::TensorOptions& options);
Vae init_vae(const VaeConfig& cfg, at::Device device, at::ScalarType dtype, uint64_t seed);
Params vae_params(Vae& v);
std::vector<std::pair<std::string, at::Tensor>> named_parameters(const Vae& v);

// A diffusers vae/ folder, every tensor checked against the config's shapes. The mid-block
// attention may be named as current diffusers names it (to_q, to_k, to_v, to_out.0) or as older
// files do (query, key, value, proj_attn).
Vae load_vae(const std::string& dir, at::Device device, at::ScalarType dtype = at::kFloat);
// Writes current diffusers names.
void save_vae(const Vae& v, const std::string& dir);

// The encoder's diagonal Gaussian over the autoencoder's own latents (unscaled), as diffusers'
// DiagonalGaussianDistribution: log-variance clamped to [-30, 20].
struct LatentDistribution {
  at::Tensor mean, logvar;  // [N, latent_channels, H/f, W/f]
};

// Images [N, in_channels, H, W] in [-1, 1].
LatentDistribution vae_encode(const Vae& v, const at::Tensor& images);
// mean + exp(logvar / 2) * noise, the noise drawn from `gen` (its device must be the mean's), times
// scaling_factor: latents as the diffusion model sees them.
at::Tensor sample_latents(const Vae& v, const LatentDistribution& d, std::optional<at::Generator> gen = {});
// Diffusion latents (divided by scaling_factor here) to images, nominally in [-1, 1] (not clamped,
// so that gradients pass everywhere).
at::Tensor vae_decode(const Vae& v, const at::Tensor& latents);

}  // namespace aligner
