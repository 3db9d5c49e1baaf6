// diffusers' UNet2DConditionModel as Stable Diffusion 1.x/2.x use it: a diffusers unet/ folder
// (config.json + diffusion_pytorch_model.safetensors) loads as it is, under diffusers' tensor names.
#pragma once
#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "diffusion/blocks.h"

namespace aligner {

struct UNetConfig {
  int64_t in_channels = 4;
  int64_t out_channels = 4;
  int64_t sample_size = 64;  // latent side the model was trained at (informational)
  bool center_input_sample = false;
  bool flip_sin_to_cos = true;
  int64_t freq_shift = 0;
  std::vector<std::string> down_block_types;  // CrossAttnDownBlock2D | DownBlock2D
  std::vector<std::string> up_block_types;    // CrossAttnUpBlock2D | UpBlock2D
  std::vector<int64_t> block_out_channels;
  // One entry per down block (the up blocks read them reversed):
  std::vector<int64_t> layers_per_block;
  std::vector<int64_t> transformer_layers_per_block;
  std::vector<int64_t> cross_attention_dim;
  std::vector<int64_t> attention_heads;  // diffusers' attention_head_dim, which it reads as heads
  int64_t downsample_padding = 1;
  double mid_block_scale_factor = 1;
  // Kept for the round trip: diffusers' get_down_block and get_up_block never pass it to the block
  // types read here, whose resnets keep an output scale of 1.
  double resnet_out_scale_factor = 1;
  int64_t norm_num_groups = 32;
  double norm_eps = 1e-5;
  int64_t time_embedding_dim = 0;  // 0: 4 x block_out_channels[0]
  bool use_linear_projection = false;
  bool upcast_attention = false;
};

// diffusers' unet/config.json at `path`. An option aligner does not implement (other block types,
// class or addition embeddings, another time embedding...) or a malformed value is a one-line error
// naming the file and the key.
UNetConfig parse_unet_config(const nlohmann::json& config, const std::string& path);
UNetConfig load_unet_config(const std::string& path);
// The config as diffusers writes it; parse_unet_config reads it back unchanged.
nlohmann::json unet_config_json(const UNetConfig& cfg);

struct UNetDownBlock {
  std::vector<ResnetBlock2D> resnets;
  std::vector<Transformer2D> attentions;   // none in a DownBlock2D
  std::vector<Downsample2D> downsamplers;  // none in the last block
};

struct UNetMidBlock {
  std::vector<ResnetBlock2D> resnets;     // 2
  std::vector<Transformer2D> attentions;  // 1
};

struct UNetUpBlock {
  std::vector<ResnetBlock2D> resnets;  // layers_per_block + 1, each reading a skip connection too
  std::vector<Transformer2D> attentions;
  std::vector<Upsample2D> upsamplers;  // none in the last block
};

struct UNet {
  UNetConfig cfg;
  Conv2d conv_in;
  TimestepEmbedding time_embedding;
  std::vector<UNetDownBlock> down_blocks;
  UNetMidBlock mid_block;
  std::vector<UNetUpBlock> up_blocks;
  GroupNorm conv_norm_out;
  Conv2d conv_out;
};

// Uninitialised weights of the config's shapes; on the meta device this holds no memory, which is
// how the shapes of a full-size model are counted and checked.
UNet allocate_unet(const UNetConfig& cfg, const at::TensorOptions& options);
// torch.nn's default init (see init_params).
UNet init_unet(const UNetConfig& cfg, at::Device device, at::ScalarType dtype, uint64_t seed);
// Every parameter under diffusers' name, as the field that holds it.
Params unet_params(UNet& u);
std::vector<std::pair<std::string, at::Tensor>> named_parameters(const UNet& u);

// A diffusers unet/ folder, every tensor checked against the config's shapes (errors name the file
// and the tensor), in `dtype` on `device`.
UNet load_unet(const std::string& dir, at::Device device, at::ScalarType dtype = at::kFloat);
// config.json and diffusion_pytorch_model.safetensors (in the model's dtype) into `dir`, which
// load_unet and diffusers read back exactly.
void save_unet(const UNet& u, const std::string& dir);

// The noise (or v) prediction for latents `sample` [N, in_channels, H, W] at `timesteps` ([N] or
// one for all, integer or float), conditioned on `encoder_hidden_states` [N, L,
// cross_attention_dim]: [N, out_channels, H, W]. Any H and W: where a downsampling rounds up, the
// upsampling returns to the skip connection's size, as diffusers does.
at::Tensor unet_forward(const UNet& u, const at::Tensor& sample, const at::Tensor& timesteps,
                        const at::Tensor& encoder_hidden_states);

}  // namespace aligner
