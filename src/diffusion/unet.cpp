#include "diffusion/unet.h"

#include <fmt/ranges.h>

#include <algorithm>
#include <filesystem>

#include "core/error.h"
#include "core/json.h"

namespace aligner {
namespace fs = std::filesystem;

namespace {

const char* const kCrossDown = "CrossAttnDownBlock2D";
const char* const kDown = "DownBlock2D";
const char* const kCrossUp = "CrossAttnUpBlock2D";
const char* const kUp = "UpBlock2D";
const char* const kMid = "UNetMidBlock2DCrossAttn";

template <class T>
std::vector<T> reversed(std::vector<T> v) {
  std::reverse(v.begin(), v.end());
  return v;
}

// A per-block list as diffusers writes it: one number when every block has the same.
nlohmann::json scalar_or_list(const std::vector<int64_t>& v) {
  if (std::all_of(v.begin(), v.end(), [&](int64_t x) { return x == v[0]; })) return v[0];
  return v;
}

int64_t time_embed_dim(const UNetConfig& c) {
  return c.time_embedding_dim > 0 ? c.time_embedding_dim : 4 * c.block_out_channels[0];
}

}  // namespace

UNetConfig parse_unet_config(const nlohmann::json& config, const std::string& path) {
  const ConfigReader r(config, path);
  UNetConfig c;
  c.in_channels = r.positive("in_channels", 4);
  c.out_channels = r.positive("out_channels", 4);
  c.sample_size = r.positive("sample_size", 64);
  c.center_input_sample = r.boolean("center_input_sample", false);
  c.flip_sin_to_cos = r.boolean("flip_sin_to_cos", true);
  c.freq_shift = r.integer("freq_shift", 0);
  c.block_out_channels = r.positive_list("block_out_channels", {320, 640, 1280, 1280});
  const size_t n = c.block_out_channels.size();
  c.down_block_types = r.string_list("down_block_types", {kCrossDown, kCrossDown, kCrossDown, kDown});
  c.up_block_types = r.string_list("up_block_types", {kUp, kCrossUp, kCrossUp, kCrossUp});
  if (c.down_block_types.size() != n || c.up_block_types.size() != n)
    fail("{}: down_block_types and up_block_types must list one block per block_out_channels entry ({})",
         path, n);
  for (size_t i = 0; i < n; ++i) {
    if (c.down_block_types[i] != kCrossDown && c.down_block_types[i] != kDown)
      fail("{}: down_block_types[{}] '{}' is not supported (only {} and {})", path, i, c.down_block_types[i],
           kCrossDown, kDown);
    if (c.up_block_types[i] != kCrossUp && c.up_block_types[i] != kUp)
      fail("{}: up_block_types[{}] '{}' is not supported (only {} and {})", path, i, c.up_block_types[i],
           kCrossUp, kUp);
  }
  // diffusers builds no mid block for an explicit null.
  if (config.contains("mid_block_type") && config.at("mid_block_type").is_null())
    fail("{}: mid_block_type null is not supported (only {})", path, kMid);
  if (r.has("mid_block_type") && r.string("mid_block_type", kMid) != kMid)
    fail("{}: mid_block_type '{}' is not supported (only {})", path, r.string("mid_block_type", kMid), kMid);
  c.layers_per_block = r.per_block("layers_per_block", n, 2);
  c.transformer_layers_per_block = r.per_block("transformer_layers_per_block", n, 1);
  c.cross_attention_dim = r.per_block("cross_attention_dim", n, 1280);
  // diffusers' naming slip, kept for compatibility: attention_head_dim is the number of heads
  // (num_attention_heads = num_attention_heads or attention_head_dim), each of channels / heads.
  const char* heads_key = r.has("num_attention_heads") ? "num_attention_heads" : "attention_head_dim";
  c.attention_heads = r.per_block(heads_key, n, 8);
  c.downsample_padding = r.integer("downsample_padding", 1);
  if (c.downsample_padding < 0) fail("{}: downsample_padding must not be negative", path);
  c.mid_block_scale_factor = r.number("mid_block_scale_factor", 1);
  c.resnet_out_scale_factor = r.number("resnet_out_scale_factor", 1);
  if (c.mid_block_scale_factor == 0 || c.resnet_out_scale_factor == 0)
    fail("{}: mid_block_scale_factor and resnet_out_scale_factor must not be 0", path);
  c.norm_num_groups = r.positive("norm_num_groups", 32);
  c.norm_eps = r.number("norm_eps", 1e-5);
  if (!(c.norm_eps > 0)) fail("{}: norm_eps must be positive", path);
  c.time_embedding_dim = r.has("time_embedding_dim") ? r.positive("time_embedding_dim", 0) : 0;
  c.use_linear_projection = r.boolean("use_linear_projection", false);
  c.upcast_attention = r.boolean("upcast_attention", false);

  for (size_t i = 0; i < n; ++i) {
    const int64_t ch = c.block_out_channels[i];
    if (ch % c.norm_num_groups != 0)
      fail("{}: norm_num_groups {} does not divide block_out_channels[{}] = {}", path, c.norm_num_groups, i,
           ch);
    if (c.attention_heads[i] > ch)
      fail("{}: {} gives block {} {} heads for {} channels", path, heads_key, i, c.attention_heads[i], ch);
  }

  r.require("act_fn", "silu");
  // A bool, or one per block.
  if (r.has("only_cross_attention") && config.at("only_cross_attention").is_array()) {
    for (const auto& v : config.at("only_cross_attention"))
      if (v != false) fail("{}: only_cross_attention {} is not supported (only false)", path, v.dump());
  } else {
    r.require("only_cross_attention", false);
  }
  r.require("dual_cross_attention", false);
  r.require("mid_block_only_cross_attention", false);
  r.require("class_embed_type", nullptr);
  r.require("num_class_embeds", nullptr);
  r.require("class_embeddings_concat", false);
  r.require("addition_embed_type", nullptr);
  r.require("addition_time_embed_dim", nullptr);
  r.require("projection_class_embeddings_input_dim", nullptr);
  r.require("encoder_hid_dim", nullptr);
  r.require("encoder_hid_dim_type", nullptr);
  r.require("time_embedding_type", "positional");
  r.require("time_embedding_act_fn", nullptr);
  r.require("timestep_post_act", nullptr);
  r.require("time_cond_proj_dim", nullptr);
  r.require("resnet_time_scale_shift", "default");
  r.require("resnet_skip_time_act", false);
  r.require("reverse_transformer_layers_per_block", nullptr);
  r.require("cross_attention_norm", nullptr);
  r.require("attention_type", "default");
  r.require("conv_in_kernel", 3);
  r.require("conv_out_kernel", 3);
  r.require("dropout", 0);
  // addition_embed_type_num_heads is known: it means nothing without an addition_embed_type.
  r.warn_unknown({"in_channels",
                  "out_channels",
                  "sample_size",
                  "center_input_sample",
                  "flip_sin_to_cos",
                  "freq_shift",
                  "block_out_channels",
                  "down_block_types",
                  "up_block_types",
                  "mid_block_type",
                  "layers_per_block",
                  "transformer_layers_per_block",
                  "cross_attention_dim",
                  "attention_head_dim",
                  "num_attention_heads",
                  "downsample_padding",
                  "mid_block_scale_factor",
                  "resnet_out_scale_factor",
                  "norm_num_groups",
                  "norm_eps",
                  "time_embedding_dim",
                  "use_linear_projection",
                  "upcast_attention",
                  "act_fn",
                  "only_cross_attention",
                  "dual_cross_attention",
                  "mid_block_only_cross_attention",
                  "class_embed_type",
                  "num_class_embeds",
                  "class_embeddings_concat",
                  "addition_embed_type",
                  "addition_embed_type_num_heads",
                  "addition_time_embed_dim",
                  "projection_class_embeddings_input_dim",
                  "encoder_hid_dim",
                  "encoder_hid_dim_type",
                  "time_embedding_type",
                  "time_embedding_act_fn",
                  "timestep_post_act",
                  "time_cond_proj_dim",
                  "resnet_time_scale_shift",
                  "resnet_skip_time_act",
                  "reverse_transformer_layers_per_block",
                  "cross_attention_norm",
                  "attention_type",
                  "conv_in_kernel",
                  "conv_out_kernel",
                  "dropout"});
  return c;
}

UNetConfig load_unet_config(const std::string& path) {
  return parse_unet_config(read_json_file(path), path);
}

nlohmann::json unet_config_json(const UNetConfig& c) {
  nlohmann::json j = {
      {"_class_name", "UNet2DConditionModel"},
      {"_diffusers_version", "0.25.0"},
      {"act_fn", "silu"},
      // Heads, under the key diffusers reads them from (it refuses num_attention_heads).
      {"attention_head_dim", scalar_or_list(c.attention_heads)},
      {"block_out_channels", c.block_out_channels},
      {"center_input_sample", c.center_input_sample},
      {"cross_attention_dim", scalar_or_list(c.cross_attention_dim)},
      {"down_block_types", c.down_block_types},
      {"downsample_padding", c.downsample_padding},
      {"flip_sin_to_cos", c.flip_sin_to_cos},
      {"freq_shift", c.freq_shift},
      {"in_channels", c.in_channels},
      {"layers_per_block", scalar_or_list(c.layers_per_block)},
      {"mid_block_scale_factor", c.mid_block_scale_factor},
      {"mid_block_type", kMid},
      {"norm_eps", c.norm_eps},
      {"norm_num_groups", c.norm_num_groups},
      {"out_channels", c.out_channels},
      {"resnet_out_scale_factor", c.resnet_out_scale_factor},
      {"sample_size", c.sample_size},
      {"transformer_layers_per_block", scalar_or_list(c.transformer_layers_per_block)},
      {"up_block_types", c.up_block_types},
      {"upcast_attention", c.upcast_attention},
      {"use_linear_projection", c.use_linear_projection},
  };
  if (c.time_embedding_dim > 0) j["time_embedding_dim"] = c.time_embedding_dim;
  return j;
}

UNet allocate_unet(const UNetConfig& c, const at::TensorOptions& o) {
  UNet u;
  u.cfg = c;
  const auto& ch = c.block_out_channels;
  const size_t n = ch.size();
  const int64_t groups = c.norm_num_groups, temb = time_embed_dim(c);
  const double eps = c.norm_eps;
  const auto attention = [&](int64_t channels, int64_t heads, int64_t layers, int64_t context) {
    return make_transformer2d(channels, heads, layers, context, groups, c.use_linear_projection,
                              c.upcast_attention, o);
  };
  u.conv_in = make_conv(c.in_channels, ch[0], 3, 1, 1, o);
  u.time_embedding.linear_1 = make_linear(ch[0], temb, true, o);
  u.time_embedding.linear_2 = make_linear(temb, temb, true, o);

  int64_t out = ch[0];
  for (size_t i = 0; i < n; ++i) {
    const int64_t in = out;
    out = ch[i];
    UNetDownBlock b;
    for (int64_t l = 0; l < c.layers_per_block[i]; ++l) {
      b.resnets.push_back(make_resnet(l == 0 ? in : out, out, temb, groups, eps, 1.0, o));
      if (c.down_block_types[i] == kCrossDown)
        b.attentions.push_back(attention(out, c.attention_heads[i], c.transformer_layers_per_block[i],
                                         c.cross_attention_dim[i]));
    }
    if (i + 1 < n) b.downsamplers.push_back({make_conv(out, out, 3, 2, c.downsample_padding, o)});
    u.down_blocks.push_back(std::move(b));
  }

  const int64_t mid = ch.back();
  for (int k = 0; k < 2; ++k)
    u.mid_block.resnets.push_back(make_resnet(mid, mid, temb, groups, eps, c.mid_block_scale_factor, o));
  u.mid_block.attentions.push_back(attention(
      mid, c.attention_heads.back(), c.transformer_layers_per_block.back(), c.cross_attention_dim.back()));

  const auto rch = reversed(ch), rlayers = reversed(c.layers_per_block),
             rtransformer = reversed(c.transformer_layers_per_block), rheads = reversed(c.attention_heads),
             rcontext = reversed(c.cross_attention_dim);
  out = rch[0];
  for (size_t i = 0; i < n; ++i) {
    const int64_t prev = out;
    out = rch[i];
    const int64_t in = rch[std::min(i + 1, n - 1)];  // the channels of this block's last skip connection
    const int64_t layers = rlayers[i] + 1;
    UNetUpBlock b;
    for (int64_t l = 0; l < layers; ++l) {
      const int64_t skip = l == layers - 1 ? in : out;
      b.resnets.push_back(make_resnet((l == 0 ? prev : out) + skip, out, temb, groups, eps, 1.0, o));
      if (c.up_block_types[i] == kCrossUp)
        b.attentions.push_back(attention(out, rheads[i], rtransformer[i], rcontext[i]));
    }
    if (i + 1 < n) b.upsamplers.push_back({make_conv(out, out, 3, 1, 1, o)});
    u.up_blocks.push_back(std::move(b));
  }

  u.conv_norm_out = make_group_norm(ch[0], groups, eps, o);
  u.conv_out = make_conv(ch[0], c.out_channels, 3, 1, 1, o);
  return u;
}

UNet init_unet(const UNetConfig& cfg, at::Device device, at::ScalarType dtype, uint64_t seed) {
  UNet u = allocate_unet(cfg, at::TensorOptions().dtype(dtype).device(device));
  init_params(unet_params(u), seed);
  return u;
}

Params unet_params(UNet& u) {
  Params p;
  add_params(p, "conv_in", u.conv_in);
  add_params(p, "time_embedding", u.time_embedding);
  for (size_t i = 0; i < u.down_blocks.size(); ++i) {
    auto& b = u.down_blocks[i];
    const std::string pre = fmt::format("down_blocks.{}", i);
    for (size_t l = 0; l < b.resnets.size(); ++l)
      add_params(p, fmt::format("{}.resnets.{}", pre, l), b.resnets[l]);
    for (size_t l = 0; l < b.attentions.size(); ++l)
      add_params(p, fmt::format("{}.attentions.{}", pre, l), b.attentions[l]);
    for (size_t l = 0; l < b.downsamplers.size(); ++l)
      add_params(p, fmt::format("{}.downsamplers.{}.conv", pre, l), b.downsamplers[l].conv);
  }
  for (size_t l = 0; l < u.mid_block.resnets.size(); ++l)
    add_params(p, fmt::format("mid_block.resnets.{}", l), u.mid_block.resnets[l]);
  for (size_t l = 0; l < u.mid_block.attentions.size(); ++l)
    add_params(p, fmt::format("mid_block.attentions.{}", l), u.mid_block.attentions[l]);
  for (size_t i = 0; i < u.up_blocks.size(); ++i) {
    auto& b = u.up_blocks[i];
    const std::string pre = fmt::format("up_blocks.{}", i);
    for (size_t l = 0; l < b.resnets.size(); ++l)
      add_params(p, fmt::format("{}.resnets.{}", pre, l), b.resnets[l]);
    for (size_t l = 0; l < b.attentions.size(); ++l)
      add_params(p, fmt::format("{}.attentions.{}", pre, l), b.attentions[l]);
    for (size_t l = 0; l < b.upsamplers.size(); ++l)
      add_params(p, fmt::format("{}.upsamplers.{}.conv", pre, l), b.upsamplers[l].conv);
  }
  add_params(p, "conv_norm_out", u.conv_norm_out);
  add_params(p, "conv_out", u.conv_out);
  return p;
}

std::vector<std::pair<std::string, at::Tensor>> named_parameters(const UNet& u) {
  UNet view = u;  // shares the tensors
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& p : unet_params(view)) out.emplace_back(p.name, *p.tensor);
  return out;
}

UNet load_unet(const std::string& dir, at::Device device, at::ScalarType dtype) {
  if (!fs::is_directory(dir)) fail("UNet folder {} does not exist", dir);
  const UNetConfig cfg = load_unet_config((fs::path(dir) / "config.json").string());
  UNet u = allocate_unet(cfg, at::TensorOptions().dtype(dtype).device(device));
  read_diffusers_weights(dir, unet_params(u));
  return u;
}

void save_unet(const UNet& u, const std::string& dir) {
  UNet view = u;
  write_diffusers_folder(dir, unet_config_json(u.cfg), unet_params(view));
}

namespace {

at::Tensor cross_attention_block(const Transformer2D* attn, const ResnetBlock2D& r, const at::Tensor& x,
                                 const at::Tensor& temb, const at::Tensor& context) {
  auto h = resnet_forward(r, x, temb);
  return attn ? transformer2d_forward(*attn, h, context) : h;
}

}  // namespace

at::Tensor unet_forward(const UNet& u, const at::Tensor& sample, const at::Tensor& timesteps,
                        const at::Tensor& encoder_hidden_states) {
  const auto& c = u.cfg;
  if (sample.dim() != 4 || sample.size(1) != c.in_channels)
    fail("the UNet's sample must be [batch, {}, height, width], got [{}]", c.in_channels,
         fmt::join(sample.sizes(), ", "));
  const int64_t N = sample.size(0);
  if (timesteps.numel() != 1 && (timesteps.dim() != 1 || timesteps.size(0) != N))
    fail("the UNet's timesteps must be one per sample ([{}]) or one for all, got [{}]", N,
         fmt::join(timesteps.sizes(), ", "));
  const auto& ctx_in = encoder_hidden_states;
  if (ctx_in.dim() != 3 || ctx_in.size(0) != N)
    fail("the UNet's encoder_hidden_states must be [{}, tokens, dim], got [{}]", N,
         fmt::join(ctx_in.sizes(), ", "));
  const bool cross = std::count(c.down_block_types.begin(), c.down_block_types.end(), kCrossDown) > 0 ||
                     std::count(c.up_block_types.begin(), c.up_block_types.end(), kCrossUp) > 0;
  for (int64_t d : c.cross_attention_dim)
    if (cross && ctx_in.size(2) != d)
      fail("the UNet's encoder_hidden_states have {} features, cross_attention_dim is {}", ctx_in.size(2), d);
  const auto dtype = u.conv_in.weight.scalar_type();
  const auto context = ctx_in.to(dtype);

  const auto t = timesteps.reshape({-1}).expand({N});
  const auto temb = timestep_embedding_forward(
      u.time_embedding,
      timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, double(c.freq_shift), dtype));

  auto x = sample.to(dtype);
  if (c.center_input_sample) x = 2 * x - 1.0;
  x = conv2d(u.conv_in, x);
  std::vector<at::Tensor> skips = {x};
  for (const auto& b : u.down_blocks) {
    for (size_t l = 0; l < b.resnets.size(); ++l) {
      x = cross_attention_block(b.attentions.empty() ? nullptr : &b.attentions[l], b.resnets[l], x, temb,
                                context);
      skips.push_back(x);
    }
    for (const auto& d : b.downsamplers) {
      x = downsample_forward(d, x);
      skips.push_back(x);
    }
  }

  x = resnet_forward(u.mid_block.resnets[0], x, temb);
  for (size_t l = 0; l < u.mid_block.attentions.size(); ++l)
    x = resnet_forward(u.mid_block.resnets[l + 1],
                       transformer2d_forward(u.mid_block.attentions[l], x, context), temb);

  for (const auto& b : u.up_blocks) {
    for (size_t l = 0; l < b.resnets.size(); ++l) {
      x = at::cat({x, skips.back()}, 1);
      skips.pop_back();
      x = cross_attention_block(b.attentions.empty() ? nullptr : &b.attentions[l], b.resnets[l], x, temb,
                                context);
    }
    // To the size of the skip connection the next block joins first.
    for (const auto& up : b.upsamplers)
      x = upsample_forward(up, x, {{skips.back().size(2), skips.back().size(3)}});
  }
  return conv2d(u.conv_out, at::silu(group_norm(u.conv_norm_out, x)));
}

}  // namespace aligner
