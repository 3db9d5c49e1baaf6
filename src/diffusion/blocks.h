// The pieces that diffusers' UNet2DConditionModel and AutoencoderKL are built from, as plain structs
// of tensors and free functions, with diffusers' parameter names and math (ResnetBlock2D,
// Downsample2D, Upsample2D, Attention, Transformer2DModel with BasicTransformerBlock and GEGLU,
// get_timestep_embedding, TimestepEmbedding). Every projection is a Linear, so that adapters hook in
// as they do in the language models.
#pragma once
#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "model/linear.h"

namespace aligner {

struct Conv2d {
  at::Tensor weight;  // [out, in, k, k]
  at::Tensor bias;    // [out]
  int64_t stride = 1;
  int64_t padding = 0;
};

struct GroupNorm {
  at::Tensor weight, bias;  // [channels]
  int64_t groups = 32;
  double eps = 1e-5;
};

struct LayerNorm {
  at::Tensor weight, bias;  // [channels]
  double eps = 1e-5;
};

// norm1 -> SiLU -> conv1 (+ time_emb_proj(SiLU(temb)) per channel) -> norm2 -> SiLU -> conv2, added
// to the input (through a 1x1 conv_shortcut when the channel count changes), over
// output_scale_factor.
struct ResnetBlock2D {
  GroupNorm norm1;
  Conv2d conv1;
  Linear time_emb_proj;  // undefined weight: no time embedding (the VAE)
  GroupNorm norm2;
  Conv2d conv2;
  Conv2d conv_shortcut;  // undefined weight: in == out
  double output_scale_factor = 1;
};

// A 3x3 convolution of stride 2. With padding 0 (the VAE encoder's) the input is first padded by one
// row and column at the bottom and right, as diffusers does.
struct Downsample2D {
  Conv2d conv;
};

// Nearest-neighbour upsampling, then a 3x3 convolution.
struct Upsample2D {
  Conv2d conv;
};

// Multi-head attention of diffusers' Attention (to_q, to_k, to_v, to_out.0), over [B, T, C] tokens.
struct Attention {
  Linear to_q, to_k, to_v, to_out;
  int64_t heads = 1;
  bool upcast = false;  // upcast_attention: scores in float32 for 16-bit weights
};

struct BasicTransformerBlock {
  LayerNorm norm1;
  Attention attn1;  // self-attention
  LayerNorm norm2;
  Attention attn2;  // cross-attention to the encoder's hidden states
  LayerNorm norm3;
  Linear ff_in;   // ff.net.0.proj: GEGLU's [2 * inner, dim] (value rows, then gate rows)
  Linear ff_out;  // ff.net.2
};

// Transformer2DModel on continuous inputs. proj_in and proj_out are Linear either way: with
// use_linear_projection=false diffusers stores them as 1x1 convolutions, which compute the same
// thing (the files' [out, in, 1, 1] weights are reshaped on load and save).
struct Transformer2D {
  GroupNorm norm;  // eps 1e-6
  Linear proj_in;
  std::vector<BasicTransformerBlock> transformer_blocks;
  Linear proj_out;
  bool linear_projection = false;
};

struct TimestepEmbedding {
  Linear linear_1, linear_2;
};

// Every parameter of a model, as the fields that hold it, with what random init gives it.
struct Param {
  enum class Init : uint8_t { kFanIn, kOnes, kZeros };
  std::string name;  // diffusers' name
  at::Tensor* tensor;
  Init init = Init::kFanIn;
  int64_t fan_in = 0;    // kFanIn: uniform in +-1/sqrt(fan_in), as torch.nn's default init
  bool conv1x1 = false;  // held as [out, in]; diffusers' files store [out, in, 1, 1]
};
using Params = std::vector<Param>;

void add_params(Params& out, const std::string& prefix, Conv2d& c);
void add_params(Params& out, const std::string& prefix, GroupNorm& n);
void add_params(Params& out, const std::string& prefix, LayerNorm& n);
void add_params(Params& out, const std::string& prefix, Linear& l, bool conv1x1 = false);
void add_params(Params& out, const std::string& prefix, ResnetBlock2D& r);
void add_params(Params& out, const std::string& prefix, Attention& a);
void add_params(Params& out, const std::string& prefix, Transformer2D& t);
void add_params(Params& out, const std::string& prefix, TimestepEmbedding& t);

// Uninitialised modules of the given shapes (any device, the meta device included).
Conv2d make_conv(int64_t in, int64_t out, int64_t kernel, int64_t stride, int64_t padding,
                 const at::TensorOptions& o);
GroupNorm make_group_norm(int64_t channels, int64_t groups, double eps, const at::TensorOptions& o);
Linear make_linear(int64_t in, int64_t out, bool bias, const at::TensorOptions& o);
ResnetBlock2D make_resnet(int64_t in, int64_t out, int64_t temb_channels, int64_t groups, double eps,
                          double output_scale_factor, const at::TensorOptions& o);
// channels / heads per head; context_dim 0: attn2 attends to the block's own tokens.
Transformer2D make_transformer2d(int64_t channels, int64_t heads, int64_t layers, int64_t context_dim,
                                 int64_t groups, bool linear_projection, bool upcast,
                                 const at::TensorOptions& o);

// Fills every parameter as torch.nn's defaults do: weights and biases of convolutions and linear
// layers uniform in +-1/sqrt(fan_in), norms 1 and 0. Drawn in float32 on the CPU from `seed`, so
// the values do not depend on the device or dtype.
void init_params(const Params& params, uint64_t seed);
int64_t count_params(const Params& params);

at::Tensor conv2d(const Conv2d& c, const at::Tensor& x);
at::Tensor group_norm(const GroupNorm& n, const at::Tensor& x);
at::Tensor layer_norm(const LayerNorm& n, const at::Tensor& x);
// temb: [B, temb_channels], or undefined where the block has no time_emb_proj.
at::Tensor resnet_forward(const ResnetBlock2D& r, const at::Tensor& x, const at::Tensor& temb);
at::Tensor downsample_forward(const Downsample2D& d, const at::Tensor& x);
// To `size` (H, W), default twice the input's (what diffusers does for sizes a downsampling
// rounded up: the size of the skip connection the output joins).
at::Tensor upsample_nearest(const at::Tensor& x, std::optional<std::pair<int64_t, int64_t>> size = {});
at::Tensor upsample_forward(const Upsample2D& u, const at::Tensor& x,
                            std::optional<std::pair<int64_t, int64_t>> size = {});
// x [B, T, C]; context [B, L, D], undefined for self-attention.
at::Tensor attention_forward(const Attention& a, const at::Tensor& x, const at::Tensor& context);
// GEGLU: value * gelu(gate) (exact erf GELU), value and gate the two halves of ff_in(x).
at::Tensor geglu(const Linear& proj, const at::Tensor& x);
at::Tensor transformer2d_forward(const Transformer2D& t, const at::Tensor& x, const at::Tensor& context);

// diffusers' get_timestep_embedding: [N, dim], sin then cos of t * exp(-ln(max_period) * i /
// (dim/2 - shift)) for i < dim/2 (cos first with flip_sin_to_cos; an odd dim padded with a zero).
// Computed in float32 as diffusers does (float64 for `dtype` float64, for gradient checks), then
// cast to `dtype`.
at::Tensor timestep_embedding(const at::Tensor& timesteps, int64_t dim, bool flip_sin_to_cos, double shift,
                              at::ScalarType dtype, double max_period = 10000);
at::Tensor timestep_embedding_forward(const TimestepEmbedding& t, const at::Tensor& emb);

// A diffusers config.json, read key by key: a key that is missing or null takes the default, a value
// of the wrong type is an error naming the file and the key.
class ConfigReader {
 public:
  ConfigReader(const nlohmann::json& config, std::string path);
  const std::string& path() const { return path_; }
  bool has(const std::string& key) const;  // present and not null
  int64_t integer(const std::string& key, int64_t def) const;
  int64_t positive(const std::string& key, int64_t def) const;
  double number(const std::string& key, double def) const;
  bool boolean(const std::string& key, bool def) const;
  std::string string(const std::string& key, const std::string& def) const;
  std::vector<int64_t> positive_list(const std::string& key, const std::vector<int64_t>& def) const;
  std::vector<std::string> string_list(const std::string& key, const std::vector<std::string>& def) const;
  // One positive value per block: a number for all of them, or a list of n.
  std::vector<int64_t> per_block(const std::string& key, size_t n, int64_t def) const;
  // An option aligner does not implement: absent, or null, or `supported`.
  void require(const std::string& key, const nlohmann::json& supported) const;
  // Keys that are neither `known` nor private ("_class_name") are named in a warning: a newer
  // diffusers may have meant something by them.
  void warn_unknown(const std::vector<std::string>& known) const;

 private:
  const nlohmann::json& get(const std::string& key) const;
  const nlohmann::json& j_;
  std::string path_;
};

// diffusers model folders (unet/, vae/): config.json beside diffusion_pytorch_model.safetensors.
// Reads every parameter, checking that each is there once, has the shape the config implies and
// that the file holds nothing else; errors name the file and the tensor. `rename` maps a name in
// the file to the model's (older spellings of the same tensor).
void read_diffusers_weights(const std::string& dir, const Params& params,
                            const std::function<std::string(const std::string&)>& rename = {});
// Writes config.json and diffusion_pytorch_model.safetensors into `dir` (created if missing).
void write_diffusers_folder(const std::string& dir, const nlohmann::json& config, const Params& params);

}  // namespace aligner
