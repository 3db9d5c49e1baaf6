#include "diffusion/vae.h"

#include <fmt/ranges.h>

#include <cstring>
#include <filesystem>

#include "core/error.h"
#include "core/json.h"

namespace aligner {
namespace fs = std::filesystem;

namespace {

const char* const kDownBlock = "DownEncoderBlock2D";
const char* const kUpBlock = "UpDecoderBlock2D";
constexpr double kEps = 1e-6;  // every norm of AutoencoderKL

}  // namespace

VaeConfig parse_vae_config(const nlohmann::json& config, const std::string& path) {
  const ConfigReader r(config, path);
  VaeConfig c;
  c.in_channels = r.positive("in_channels", 3);
  c.out_channels = r.positive("out_channels", 3);
  c.latent_channels = r.positive("latent_channels", 4);
  c.block_out_channels = r.positive_list("block_out_channels", {64});
  const size_t n = c.block_out_channels.size();
  const auto down = r.string_list("down_block_types", {kDownBlock});
  const auto up = r.string_list("up_block_types", {kUpBlock});
  if (down.size() != n || up.size() != n)
    fail("{}: down_block_types and up_block_types must list one block per block_out_channels entry ({})",
         path, n);
  for (size_t i = 0; i < n; ++i) {
    if (down[i] != kDownBlock)
      fail("{}: down_block_types[{}] '{}' is not supported (only {})", path, i, down[i], kDownBlock);
    if (up[i] != kUpBlock)
      fail("{}: up_block_types[{}] '{}' is not supported (only {})", path, i, up[i], kUpBlock);
  }
  c.layers_per_block = r.positive("layers_per_block", 1);
  c.norm_num_groups = r.positive("norm_num_groups", 32);
  for (size_t i = 0; i < n; ++i)
    if (c.block_out_channels[i] % c.norm_num_groups != 0)
      fail("{}: norm_num_groups {} does not divide block_out_channels[{}] = {}", path, c.norm_num_groups, i,
           c.block_out_channels[i]);
  c.sample_size = r.positive("sample_size", 32);
  c.scaling_factor = r.number("scaling_factor", 0.18215);
  if (!(c.scaling_factor > 0)) fail("{}: scaling_factor must be positive", path);
  c.use_quant_conv = r.boolean("use_quant_conv", true);
  c.use_post_quant_conv = r.boolean("use_post_quant_conv", true);
  c.mid_block_add_attention = r.boolean("mid_block_add_attention", true);
  c.force_upcast = r.boolean("force_upcast", true);
  r.require("act_fn", "silu");
  r.require("shift_factor", nullptr);
  r.require("latents_mean", nullptr);
  r.require("latents_std", nullptr);
  r.warn_unknown({"in_channels", "out_channels", "latent_channels", "block_out_channels", "down_block_types",
                  "up_block_types", "layers_per_block", "norm_num_groups", "sample_size", "scaling_factor",
                  "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention", "force_upcast",
                  "act_fn", "shift_factor", "latents_mean", "latents_std"});
  return c;
}

VaeConfig load_vae_config(const std::string& path) {
  return parse_vae_config(read_json_file(path), path);
}

nlohmann::json vae_config_json(const VaeConfig& c) {
  const size_t n = c.block_out_channels.size();
  return {
      {"_class_name", "AutoencoderKL"},
      {"_diffusers_version", "0.25.0"},
      {"act_fn", "silu"},
      {"block_out_channels", c.block_out_channels},
      {"down_block_types", std::vector<std::string>(n, kDownBlock)},
      {"force_upcast", c.force_upcast},
      {"in_channels", c.in_channels},
      {"latent_channels", c.latent_channels},
      {"layers_per_block", c.layers_per_block},
      {"mid_block_add_attention", c.mid_block_add_attention},
      {"norm_num_groups", c.norm_num_groups},
      {"out_channels", c.out_channels},
      {"sample_size", c.sample_size},
      {"scaling_factor", c.scaling_factor},
      {"up_block_types", std::vector<std::string>(n, kUpBlock)},
      {"use_post_quant_conv", c.use_post_quant_conv},
      {"use_quant_conv", c.use_quant_conv},
  };
}

namespace {

VaeMidBlock make_mid_block(const VaeConfig& c, const at::TensorOptions& o) {
  const int64_t ch = c.block_out_channels.back(), groups = c.norm_num_groups;
  VaeMidBlock m;
  for (int k = 0; k < 2; ++k) m.resnets.push_back(make_resnet(ch, ch, 0, groups, kEps, 1, o));
  if (c.mid_block_add_attention) {
    VaeAttention a;
    a.group_norm = make_group_norm(ch, groups, kEps, o);
    a.attn.to_q = make_linear(ch, ch, true, o);
    a.attn.to_k = make_linear(ch, ch, true, o);
    a.attn.to_v = make_linear(ch, ch, true, o);
    a.attn.to_out = make_linear(ch, ch, true, o);
    a.attn.heads = 1;
    m.attentions.push_back(std::move(a));
  }
  return m;
}

void add_mid_params(Params& p, const std::string& prefix, VaeMidBlock& m) {
  for (size_t l = 0; l < m.attentions.size(); ++l) {
    const std::string pre = fmt::format("{}.attentions.{}", prefix, l);
    add_params(p, pre + ".group_norm", m.attentions[l].group_norm);
    add_params(p, pre, m.attentions[l].attn);
  }
  for (size_t l = 0; l < m.resnets.size(); ++l)
    add_params(p, fmt::format("{}.resnets.{}", prefix, l), m.resnets[l]);
}

void add_block_params(Params& p, const std::string& prefix, VaeBlock& b) {
  for (size_t l = 0; l < b.resnets.size(); ++l)
    add_params(p, fmt::format("{}.resnets.{}", prefix, l), b.resnets[l]);
  for (size_t l = 0; l < b.downsamplers.size(); ++l)
    add_params(p, fmt::format("{}.downsamplers.{}.conv", prefix, l), b.downsamplers[l].conv);
  for (size_t l = 0; l < b.upsamplers.size(); ++l)
    add_params(p, fmt::format("{}.upsamplers.{}.conv", prefix, l), b.upsamplers[l].conv);
}

// Files converted by older diffusers name the mid-block attention's projections as its
// AttentionBlock did; diffusers renames them on load (_convert_deprecated_attention_blocks).
std::string current_name(const std::string& name) {
  if (name.find("mid_block.attentions.") == std::string::npos) return name;
  static const std::pair<const char*, const char*> kOld[] = {
      {".query.", ".to_q."}, {".key.", ".to_k."}, {".value.", ".to_v."}, {".proj_attn.", ".to_out.0."}};
  for (const auto& [old_part, new_part] : kOld) {
    const auto at = name.rfind(old_part);
    if (at != std::string::npos)
      return name.substr(0, at) + new_part + name.substr(at + std::strlen(old_part));
  }
  return name;
}

at::Tensor mid_forward(const VaeMidBlock& m, const at::Tensor& x) {
  auto h = resnet_forward(m.resnets[0], x, at::Tensor());
  for (size_t l = 0; l < m.attentions.size(); ++l) {
    const auto& a = m.attentions[l];
    const int64_t B = h.size(0), C = h.size(1), H = h.size(2), W = h.size(3);
    auto tokens = group_norm(a.group_norm, h).view({B, C, H * W}).transpose(1, 2);
    h = attention_forward(a.attn, tokens, at::Tensor()).transpose(1, 2).reshape({B, C, H, W}) + h;
  }
  return resnet_forward(m.resnets.back(), h, at::Tensor());
}

}  // namespace

Vae allocate_vae(const VaeConfig& c, const at::TensorOptions& o) {
  Vae v;
  v.cfg = c;
  const auto& ch = c.block_out_channels;
  const size_t n = ch.size();
  const int64_t groups = c.norm_num_groups;

  auto& e = v.encoder;
  e.conv_in = make_conv(c.in_channels, ch[0], 3, 1, 1, o);
  int64_t out = ch[0];
  for (size_t i = 0; i < n; ++i) {
    const int64_t in = out;
    out = ch[i];
    VaeBlock b;
    for (int64_t l = 0; l < c.layers_per_block; ++l)
      b.resnets.push_back(make_resnet(l == 0 ? in : out, out, 0, groups, kEps, 1, o));
    if (i + 1 < n) b.downsamplers.push_back({make_conv(out, out, 3, 2, 0, o)});
    e.down_blocks.push_back(std::move(b));
  }
  e.mid_block = make_mid_block(c, o);
  e.conv_norm_out = make_group_norm(ch.back(), groups, kEps, o);
  e.conv_out = make_conv(ch.back(), 2 * c.latent_channels, 3, 1, 1, o);

  if (c.use_quant_conv) v.quant_conv = make_conv(2 * c.latent_channels, 2 * c.latent_channels, 1, 1, 0, o);
  if (c.use_post_quant_conv) v.post_quant_conv = make_conv(c.latent_channels, c.latent_channels, 1, 1, 0, o);

  auto& d = v.decoder;
  d.conv_in = make_conv(c.latent_channels, ch.back(), 3, 1, 1, o);
  d.mid_block = make_mid_block(c, o);
  out = ch.back();
  for (size_t i = 0; i < n; ++i) {
    const int64_t in = out;
    out = ch[n - 1 - i];
    VaeBlock b;
    for (int64_t l = 0; l < c.layers_per_block + 1; ++l)
      b.resnets.push_back(make_resnet(l == 0 ? in : out, out, 0, groups, kEps, 1, o));
    if (i + 1 < n) b.upsamplers.push_back({make_conv(out, out, 3, 1, 1, o)});
    d.up_blocks.push_back(std::move(b));
  }
  d.conv_norm_out = make_group_norm(ch[0], groups, kEps, o);
  d.conv_out = make_conv(ch[0], c.out_channels, 3, 1, 1, o);
  return v;
}

Vae init_vae(const VaeConfig& cfg, at::Device device, at::ScalarType dtype, uint64_t seed) {
  Vae v = allocate_vae(cfg, at::TensorOptions().dtype(dtype).device(device));
  init_params(vae_params(v), seed);
  return v;
}

Params vae_params(Vae& v) {
  Params p;
  auto& e = v.encoder;
  add_params(p, "encoder.conv_in", e.conv_in);
  for (size_t i = 0; i < e.down_blocks.size(); ++i)
    add_block_params(p, fmt::format("encoder.down_blocks.{}", i), e.down_blocks[i]);
  add_mid_params(p, "encoder.mid_block", e.mid_block);
  add_params(p, "encoder.conv_norm_out", e.conv_norm_out);
  add_params(p, "encoder.conv_out", e.conv_out);
  auto& d = v.decoder;
  add_params(p, "decoder.conv_in", d.conv_in);
  for (size_t i = 0; i < d.up_blocks.size(); ++i)
    add_block_params(p, fmt::format("decoder.up_blocks.{}", i), d.up_blocks[i]);
  add_mid_params(p, "decoder.mid_block", d.mid_block);
  add_params(p, "decoder.conv_norm_out", d.conv_norm_out);
  add_params(p, "decoder.conv_out", d.conv_out);
  if (v.quant_conv.weight.defined()) add_params(p, "quant_conv", v.quant_conv);
  if (v.post_quant_conv.weight.defined()) add_params(p, "post_quant_conv", v.post_quant_conv);
  return p;
}

std::vector<std::pair<std::string, at::Tensor>> named_parameters(const Vae& v) {
  Vae view = v;  // shares the tensors
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& p : vae_params(view)) out.emplace_back(p.name, *p.tensor);
  return out;
}

Vae load_vae(const std::string& dir, at::Device device, at::ScalarType dtype) {
  if (!fs::is_directory(dir)) fail("VAE folder {} does not exist", dir);
  const VaeConfig cfg = load_vae_config((fs::path(dir) / "config.json").string());
  Vae v = allocate_vae(cfg, at::TensorOptions().dtype(dtype).device(device));
  read_diffusers_weights(dir, vae_params(v), current_name);
  return v;
}

void save_vae(const Vae& v, const std::string& dir) {
  Vae view = v;
  write_diffusers_folder(dir, vae_config_json(v.cfg), vae_params(view));
}

LatentDistribution vae_encode(const Vae& v, const at::Tensor& images) {
  const auto& c = v.cfg;
  if (images.dim() != 4 || images.size(1) != c.in_channels)
    fail("the VAE encodes images of [batch, {}, height, width], got [{}]", c.in_channels,
         fmt::join(images.sizes(), ", "));
  const auto& e = v.encoder;
  auto h = conv2d(e.conv_in, images.to(e.conv_in.weight.scalar_type()));
  for (const auto& b : e.down_blocks) {
    for (const auto& r : b.resnets) h = resnet_forward(r, h, at::Tensor());
    for (const auto& d : b.downsamplers) h = downsample_forward(d, h);
  }
  h = conv2d(e.conv_out, at::silu(group_norm(e.conv_norm_out, mid_forward(e.mid_block, h))));
  if (v.quant_conv.weight.defined()) h = conv2d(v.quant_conv, h);
  auto parts = h.chunk(2, 1);
  return {parts[0], parts[1].clamp(-30.0, 20.0)};
}

at::Tensor sample_latents(const Vae& v, const LatentDistribution& d, std::optional<at::Generator> gen) {
  const auto noise =
      at::randn(d.mean.sizes(), gen ? c10::optional<at::Generator>(*gen) : c10::nullopt, d.mean.options());
  return (d.mean + at::exp(0.5 * d.logvar) * noise) * v.cfg.scaling_factor;
}

at::Tensor vae_decode(const Vae& v, const at::Tensor& latents) {
  const auto& c = v.cfg;
  if (latents.dim() != 4 || latents.size(1) != c.latent_channels)
    fail("the VAE decodes latents of [batch, {}, height, width], got [{}]", c.latent_channels,
         fmt::join(latents.sizes(), ", "));
  const auto& d = v.decoder;
  auto z = latents.to(d.conv_in.weight.scalar_type()) / c.scaling_factor;
  if (v.post_quant_conv.weight.defined()) z = conv2d(v.post_quant_conv, z);
  auto h = mid_forward(d.mid_block, conv2d(d.conv_in, z));
  for (const auto& b : d.up_blocks) {
    for (const auto& r : b.resnets) h = resnet_forward(r, h, at::Tensor());
    for (const auto& u : b.upsamplers) h = upsample_forward(u, h);
  }
  return conv2d(d.conv_out, at::silu(group_norm(d.conv_norm_out, h)));
}

}  // namespace aligner
