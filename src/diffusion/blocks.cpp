#include "diffusion/blocks.h"

#include <ATen/CPUGeneratorImpl.h>
#include <fmt/ranges.h>

#include <cmath>
#include <filesystem>
#include <map>
#include <set>

#include "core/error.h"
#include "core/log.h"
#include "core/torch_compat.h"
#include "io/hf_checkpoint.h"
#include "io/safetensors.h"

namespace aligner {
namespace fs = std::filesystem;

namespace {

void add(Params& out, const std::string& name, at::Tensor& t, Param::Init init, int64_t fan_in = 0,
         bool conv1x1 = false) {
  out.push_back(Param{name, &t, init, fan_in, conv1x1});
}

}  // namespace

void add_params(Params& out, const std::string& prefix, Conv2d& c) {
  const int64_t fan_in = c.weight.size(1) * c.weight.size(2) * c.weight.size(3);
  add(out, prefix + ".weight", c.weight, Param::Init::kFanIn, fan_in);
  if (c.bias.defined()) add(out, prefix + ".bias", c.bias, Param::Init::kFanIn, fan_in);
}

void add_params(Params& out, const std::string& prefix, GroupNorm& n) {
  add(out, prefix + ".weight", n.weight, Param::Init::kOnes);
  add(out, prefix + ".bias", n.bias, Param::Init::kZeros);
}

void add_params(Params& out, const std::string& prefix, LayerNorm& n) {
  add(out, prefix + ".weight", n.weight, Param::Init::kOnes);
  add(out, prefix + ".bias", n.bias, Param::Init::kZeros);
}

void add_params(Params& out, const std::string& prefix, Linear& l, bool conv1x1) {
  const int64_t fan_in = l.weight.size(1);
  add(out, prefix + ".weight", l.weight, Param::Init::kFanIn, fan_in, conv1x1);
  if (l.bias.defined()) add(out, prefix + ".bias", l.bias, Param::Init::kFanIn, fan_in);
}

void add_params(Params& out, const std::string& prefix, ResnetBlock2D& r) {
  add_params(out, prefix + ".norm1", r.norm1);
  add_params(out, prefix + ".conv1", r.conv1);
  if (r.time_emb_proj.weight.defined()) add_params(out, prefix + ".time_emb_proj", r.time_emb_proj);
  add_params(out, prefix + ".norm2", r.norm2);
  add_params(out, prefix + ".conv2", r.conv2);
  if (r.conv_shortcut.weight.defined()) add_params(out, prefix + ".conv_shortcut", r.conv_shortcut);
}

void add_params(Params& out, const std::string& prefix, Attention& a) {
  add_params(out, prefix + ".to_q", a.to_q);
  add_params(out, prefix + ".to_k", a.to_k);
  add_params(out, prefix + ".to_v", a.to_v);
  add_params(out, prefix + ".to_out.0", a.to_out);
}

void add_params(Params& out, const std::string& prefix, Transformer2D& t) {
  add_params(out, prefix + ".norm", t.norm);
  add_params(out, prefix + ".proj_in", t.proj_in, !t.linear_projection);
  for (size_t i = 0; i < t.transformer_blocks.size(); ++i) {
    auto& b = t.transformer_blocks[i];
    const std::string p = fmt::format("{}.transformer_blocks.{}", prefix, i);
    add_params(out, p + ".norm1", b.norm1);
    add_params(out, p + ".attn1", b.attn1);
    add_params(out, p + ".norm2", b.norm2);
    add_params(out, p + ".attn2", b.attn2);
    add_params(out, p + ".norm3", b.norm3);
    add_params(out, p + ".ff.net.0.proj", b.ff_in);
    add_params(out, p + ".ff.net.2", b.ff_out);
  }
  add_params(out, prefix + ".proj_out", t.proj_out, !t.linear_projection);
}

void add_params(Params& out, const std::string& prefix, TimestepEmbedding& t) {
  add_params(out, prefix + ".linear_1", t.linear_1);
  add_params(out, prefix + ".linear_2", t.linear_2);
}

Conv2d make_conv(int64_t in, int64_t out, int64_t kernel, int64_t stride, int64_t padding,
                 const at::TensorOptions& o) {
  return Conv2d{at::empty({out, in, kernel, kernel}, o), at::empty({out}, o), stride, padding};
}

GroupNorm make_group_norm(int64_t channels, int64_t groups, double eps, const at::TensorOptions& o) {
  return GroupNorm{at::empty({channels}, o), at::empty({channels}, o), groups, eps};
}

Linear make_linear(int64_t in, int64_t out, bool bias, const at::TensorOptions& o) {
  Linear l;
  l.weight = at::empty({out, in}, o);
  if (bias) l.bias = at::empty({out}, o);
  return l;
}

namespace {

LayerNorm make_layer_norm(int64_t channels, const at::TensorOptions& o) {
  return LayerNorm{at::empty({channels}, o), at::empty({channels}, o), 1e-5};
}

Attention make_attention(int64_t query_dim, int64_t context_dim, int64_t heads, bool upcast,
                         const at::TensorOptions& o) {
  Attention a;
  a.to_q = make_linear(query_dim, query_dim, false, o);
  a.to_k = make_linear(context_dim, query_dim, false, o);
  a.to_v = make_linear(context_dim, query_dim, false, o);
  a.to_out = make_linear(query_dim, query_dim, true, o);
  a.heads = heads;
  a.upcast = upcast;
  return a;
}

}  // namespace

ResnetBlock2D make_resnet(int64_t in, int64_t out, int64_t temb_channels, int64_t groups, double eps,
                          double output_scale_factor, const at::TensorOptions& o) {
  ResnetBlock2D r;
  r.norm1 = make_group_norm(in, groups, eps, o);
  r.conv1 = make_conv(in, out, 3, 1, 1, o);
  if (temb_channels > 0) r.time_emb_proj = make_linear(temb_channels, out, true, o);
  r.norm2 = make_group_norm(out, groups, eps, o);
  r.conv2 = make_conv(out, out, 3, 1, 1, o);
  if (in != out) r.conv_shortcut = make_conv(in, out, 1, 1, 0, o);
  r.output_scale_factor = output_scale_factor;
  return r;
}

Transformer2D make_transformer2d(int64_t channels, int64_t heads, int64_t layers, int64_t context_dim,
                                 int64_t groups, bool linear_projection, bool upcast,
                                 const at::TensorOptions& o) {
  // diffusers gives each head channels / heads dimensions, rounded down.
  const int64_t inner = heads * (channels / heads);
  Transformer2D t;
  t.norm = make_group_norm(channels, groups, 1e-6, o);
  t.linear_projection = linear_projection;
  t.proj_in = make_linear(channels, inner, true, o);
  for (int64_t i = 0; i < layers; ++i) {
    BasicTransformerBlock b;
    b.norm1 = make_layer_norm(inner, o);
    b.attn1 = make_attention(inner, inner, heads, upcast, o);
    b.norm2 = make_layer_norm(inner, o);
    b.attn2 = make_attention(inner, context_dim > 0 ? context_dim : inner, heads, upcast, o);
    b.norm3 = make_layer_norm(inner, o);
    b.ff_in = make_linear(inner, 8 * inner, true, o);  // GEGLU of the 4x wider feed-forward
    b.ff_out = make_linear(4 * inner, inner, true, o);
    t.transformer_blocks.push_back(std::move(b));
  }
  t.proj_out = make_linear(inner, channels, true, o);
  return t;
}

void init_params(const Params& params, uint64_t seed) {
  auto gen = at::detail::createCPUGenerator(seed);
  at::NoGradGuard no_grad;
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  for (const auto& p : params) {
    at::Tensor& t = *p.tensor;
    switch (p.init) {
      case Param::Init::kOnes:
        t.fill_(1.0);
        break;
      case Param::Init::kZeros:
        t.zero_();
        break;
      case Param::Init::kFanIn: {
        const double bound = 1.0 / std::sqrt(double(p.fan_in));
        t.copy_(at::empty(t.sizes(), f32).uniform_(-bound, bound, gen));
        break;
      }
    }
  }
}

int64_t count_params(const Params& params) {
  int64_t n = 0;
  for (const auto& p : params) n += p.tensor->numel();
  return n;
}

at::Tensor conv2d(const Conv2d& c, const at::Tensor& x) {
  return at::conv2d(x, c.weight, c.bias, {c.stride, c.stride}, {c.padding, c.padding});
}

at::Tensor group_norm(const GroupNorm& n, const at::Tensor& x) {
  return at::group_norm(x, n.groups, n.weight, n.bias, n.eps);
}

at::Tensor layer_norm(const LayerNorm& n, const at::Tensor& x) {
  return at::layer_norm(x, {x.size(-1)}, n.weight, n.bias, n.eps);
}

at::Tensor resnet_forward(const ResnetBlock2D& r, const at::Tensor& x, const at::Tensor& temb) {
  auto h = conv2d(r.conv1, at::silu(group_norm(r.norm1, x)));
  if (r.time_emb_proj.weight.defined() && temb.defined())
    h = h + apply(r.time_emb_proj, at::silu(temb)).unsqueeze(-1).unsqueeze(-1);
  h = conv2d(r.conv2, at::silu(group_norm(r.norm2, h)));
  auto out = (r.conv_shortcut.weight.defined() ? conv2d(r.conv_shortcut, x) : x) + h;
  return r.output_scale_factor == 1 ? out : out / r.output_scale_factor;
}

at::Tensor downsample_forward(const Downsample2D& d, const at::Tensor& x) {
  if (d.conv.padding == 0) return conv2d(d.conv, at::constant_pad_nd(x, {0, 1, 0, 1}, 0));
  return conv2d(d.conv, x);
}

at::Tensor upsample_nearest(const at::Tensor& x, std::optional<std::pair<int64_t, int64_t>> size) {
  const auto [h, w] = size.value_or(std::make_pair(2 * x.size(2), 2 * x.size(3)));
  // Older torch has no bfloat16 nearest upsampling (diffusers upcasts too); copying values is exact.
  if (x.scalar_type() == at::kBFloat16)
    return at::upsample_nearest2d(x.to(at::kFloat), {h, w}, c10::nullopt, c10::nullopt).to(at::kBFloat16);
  return at::upsample_nearest2d(x, {h, w}, c10::nullopt, c10::nullopt);
}

at::Tensor upsample_forward(const Upsample2D& u, const at::Tensor& x,
                            std::optional<std::pair<int64_t, int64_t>> size) {
  return conv2d(u.conv, upsample_nearest(x, size));
}

at::Tensor attention_forward(const Attention& a, const at::Tensor& x, const at::Tensor& context) {
  const at::Tensor& kv = context.defined() ? context : x;
  auto q = apply(a.to_q, x), k = apply(a.to_k, kv), v = apply(a.to_v, kv);
  const int64_t B = x.size(0), T = x.size(1), L = kv.size(1), inner = q.size(-1), d = inner / a.heads;
  const auto dtype = q.scalar_type();
  const bool upcast = a.upcast && (dtype == at::kHalf || dtype == at::kBFloat16);
  const auto heads = [&](const at::Tensor& t, int64_t n) {
    auto h = t.view({B, n, a.heads, d}).transpose(1, 2);
    return upcast ? h.to(at::kFloat) : h;
  };
  auto o =
      compat::sdpa(heads(q, T), heads(k, L), heads(v, L), std::nullopt, false, 1.0 / std::sqrt(double(d)));
  return apply(a.to_out, o.to(dtype).transpose(1, 2).reshape({B, T, inner}));
}

at::Tensor geglu(const Linear& proj, const at::Tensor& x) {
  auto parts = apply(proj, x).chunk(2, -1);
  return parts[0] * at::gelu(parts[1]);
}

at::Tensor transformer2d_forward(const Transformer2D& t, const at::Tensor& x, const at::Tensor& context) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  auto h = apply(t.proj_in, group_norm(t.norm, x).permute({0, 2, 3, 1}).reshape({B, H * W, C}));
  for (const auto& b : t.transformer_blocks) {
    h = attention_forward(b.attn1, layer_norm(b.norm1, h), at::Tensor()) + h;
    h = attention_forward(b.attn2, layer_norm(b.norm2, h), context) + h;
    h = apply(b.ff_out, geglu(b.ff_in, layer_norm(b.norm3, h))) + h;
  }
  h = apply(t.proj_out, h).reshape({B, H, W, C}).permute({0, 3, 1, 2}).contiguous();
  return h + x;
}

at::Tensor timestep_embedding(const at::Tensor& timesteps, int64_t dim, bool flip_sin_to_cos, double shift,
                              at::ScalarType dtype, double max_period) {
  const auto compute = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const auto o = at::TensorOptions().dtype(compute).device(timesteps.device());
  const int64_t half = dim / 2;
  // In diffusers' order of operations, so that float32 rounds alike.
  const auto exponent = at::arange(half, o) * -std::log(max_period) / (double(half) - shift);
  const auto args = timesteps.reshape({-1, 1}).to(compute) * at::exp(exponent).unsqueeze(0);
  auto emb = flip_sin_to_cos ? at::cat({at::cos(args), at::sin(args)}, -1)
                             : at::cat({at::sin(args), at::cos(args)}, -1);
  if (dim % 2 == 1) emb = at::constant_pad_nd(emb, {0, 1}, 0);
  return emb.to(dtype);
}

at::Tensor timestep_embedding_forward(const TimestepEmbedding& t, const at::Tensor& emb) {
  return apply(t.linear_2, at::silu(apply(t.linear_1, emb)));
}

// Widths, channels, heads and counts: bounded, so that products of them cannot overflow.
constexpr int64_t kMaxSize = int64_t(1) << 24;

ConfigReader::ConfigReader(const nlohmann::json& config, std::string path)
    : j_(config), path_(std::move(path)) {
  if (!j_.is_object()) fail("{}: not a JSON object", path_);
}

bool ConfigReader::has(const std::string& key) const {
  const auto it = j_.find(key);
  return it != j_.end() && !it->is_null();
}

const nlohmann::json& ConfigReader::get(const std::string& key) const {
  return j_.at(key);
}

int64_t ConfigReader::integer(const std::string& key, int64_t def) const {
  if (!has(key)) return def;
  const auto& v = get(key);
  if (v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(INT64_MAX))
    fail("{}: {} {} is out of range", path_, key, v.dump());
  if (v.is_number_integer()) return v.get<int64_t>();
  // Some configs write whole numbers as floats ("freq_shift": 0.0).
  if (v.is_number_float() && std::floor(v.get<double>()) == v.get<double>() &&
      std::abs(v.get<double>()) < 1e15)
    return int64_t(v.get<double>());
  fail("{}: {} must be an integer, got {}", path_, key, v.dump());
}

int64_t ConfigReader::positive(const std::string& key, int64_t def) const {
  const int64_t v = integer(key, def);
  if (v <= 0 || v > kMaxSize) fail("{}: {} must be in [1, {}], got {}", path_, key, kMaxSize, v);
  return v;
}

double ConfigReader::number(const std::string& key, double def) const {
  if (!has(key)) return def;
  const auto& v = get(key);
  if (!v.is_number()) fail("{}: {} must be a number, got {}", path_, key, v.dump());
  return v.get<double>();
}

bool ConfigReader::boolean(const std::string& key, bool def) const {
  if (!has(key)) return def;
  const auto& v = get(key);
  if (!v.is_boolean()) fail("{}: {} must be true or false, got {}", path_, key, v.dump());
  return v.get<bool>();
}

std::string ConfigReader::string(const std::string& key, const std::string& def) const {
  if (!has(key)) return def;
  const auto& v = get(key);
  if (!v.is_string()) fail("{}: {} must be a string, got {}", path_, key, v.dump());
  return v.get<std::string>();
}

std::vector<int64_t> ConfigReader::positive_list(const std::string& key,
                                                 const std::vector<int64_t>& def) const {
  if (!has(key)) return def;
  const auto& v = get(key);
  if (!v.is_array() || v.empty()) fail("{}: {} must be a non-empty list of integers", path_, key);
  std::vector<int64_t> out;
  for (const auto& e : v) {
    if (!e.is_number_integer() || e.get<int64_t>() <= 0 || e.get<int64_t>() > kMaxSize ||
        (e.is_number_unsigned() && e.get<uint64_t>() > uint64_t(kMaxSize)))
      fail("{}: {} must be a list of integers in [1, {}], got {}", path_, key, kMaxSize, e.dump());
    out.push_back(e.get<int64_t>());
  }
  return out;
}

std::vector<std::string> ConfigReader::string_list(const std::string& key,
                                                   const std::vector<std::string>& def) const {
  if (!has(key)) return def;
  const auto& v = get(key);
  if (!v.is_array() || v.empty()) fail("{}: {} must be a non-empty list of strings", path_, key);
  std::vector<std::string> out;
  for (const auto& e : v) {
    if (!e.is_string()) fail("{}: {} must be a list of strings, got {}", path_, key, e.dump());
    out.push_back(e.get<std::string>());
  }
  return out;
}

std::vector<int64_t> ConfigReader::per_block(const std::string& key, size_t n, int64_t def) const {
  if (!has(key) || !get(key).is_array()) return std::vector<int64_t>(n, positive(key, def));
  auto out = positive_list(key, {});
  if (out.size() != n) fail("{}: {} lists {} values for {} blocks", path_, key, out.size(), n);
  return out;
}

void ConfigReader::require(const std::string& key, const nlohmann::json& supported) const {
  if (!has(key) || get(key) == supported) return;
  fail("{}: {} {} is not supported (only {})", path_, key, get(key).dump(),
       supported.is_null() ? "null" : supported.dump());
}

void ConfigReader::warn_unknown(const std::vector<std::string>& known) const {
  const std::set<std::string> names(known.begin(), known.end());
  for (const auto& [key, value] : j_.items())
    if (!key.empty() && key[0] != '_' && !names.count(key))
      log_warn("{}: ignoring unknown key {}", path_, key);
}

namespace {

std::vector<int64_t> file_shape(const Param& p) {
  auto shape = p.tensor->sizes().vec();
  if (p.conv1x1) shape.insert(shape.end(), {1, 1});
  return shape;
}

}  // namespace

void read_diffusers_weights(const std::string& dir, const Params& params,
                            const std::function<std::string(const std::string&)>& rename) {
  const fs::path root(dir);
  std::string path = (root / "diffusion_pytorch_model.safetensors").string();
  if (!fs::exists(path)) {
    // Hub repositories may hold only the half-precision variant.
    const std::string fp16 = (root / "diffusion_pytorch_model.fp16.safetensors").string();
    if (fs::exists(fp16))
      path = fp16;
    else if (fs::exists(root / "diffusion_pytorch_model.safetensors.index.json"))
      fail("{}: sharded weights (diffusion_pytorch_model.safetensors.index.json) are not supported yet", dir);
    else
      fail("{}: no diffusion_pytorch_model.safetensors", dir);
  }
  const auto file = safetensors::File::open(path);
  std::map<std::string, const Param*> by_name;
  for (const auto& p : params) by_name.emplace(p.name, &p);
  std::map<std::string, std::string> read;  // model name -> name in the file
  at::NoGradGuard no_grad;
  for (const auto& info : file.tensors()) {
    const std::string name = rename ? rename(info.name) : info.name;
    const auto it = by_name.find(name);
    if (it == by_name.end()) fail("{}: unexpected tensor '{}'", path, info.name);
    const auto [prev, added] = read.emplace(name, info.name);
    if (!added) fail("{}: tensors '{}' and '{}' are the same parameter", path, prev->second, info.name);
    const Param& p = *it->second;
    const auto expected = file_shape(p);
    if (info.shape != expected)
      fail("{}: tensor '{}' has shape [{}] but config.json implies [{}]", path, info.name,
           fmt::join(info.shape, ", "), fmt::join(expected, ", "));
    if (!at::isFloatingType(info.dtype))
      fail("{}: tensor '{}' has dtype {}, not a floating-point type", path, info.name,
           safetensors::dtype_to_string(info.dtype));
    p.tensor->copy_(file.get(info.name).view(p.tensor->sizes()));
  }
  for (const auto& p : params)
    if (!read.count(p.name)) fail("{}: missing tensor '{}'", path, p.name);
}

void write_diffusers_folder(const std::string& dir, const nlohmann::json& config, const Params& params) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) fail("{}: cannot create directory: {}", dir, ec.message());
  safetensors::NamedTensors tensors;
  for (const auto& p : params) tensors.emplace_back(p.name, p.tensor->detach().reshape(file_shape(p)));
  safetensors::save((fs::path(dir) / "diffusion_pytorch_model.safetensors").string(), tensors);
  write_text(fs::path(dir) / "config.json", config.dump(2) + "\n");
}

}  // namespace aligner
