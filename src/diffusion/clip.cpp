#include "diffusion/clip.h"

#include <ATen/CPUGeneratorImpl.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <filesystem>
#include <limits>
#include <set>
#include <tuple>

#include "core/error.h"
#include "core/json.h"
#include "io/hf_checkpoint.h"
#include "io/safetensors.h"
#include "text/clip_tokenizer.h"
#include "text/tokenizer.h"

namespace aligner {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

constexpr int64_t kMaxConfigInteger = int64_t(1) << 24;

// Reads one sub-config ("text_config." etc. in `prefix`) of config.json at `path`.
struct ClipConfigReader {
  const json& j;
  std::string path, prefix;

  const json* find(const char* key) const {
    auto it = j.find(key);
    return it == j.end() || it->is_null() ? nullptr : &*it;
  }
  // Sizes are bounded, so that products of them (positions, widths) cannot overflow.
  int64_t integer(const char* key, int64_t fallback, int64_t min) const {
    const json* v = find(key);
    if (!v) return fallback;
    if (!v->is_number_integer() || (v->is_number_unsigned() && v->get<uint64_t>() > kMaxConfigInteger) ||
        v->get<int64_t>() < min || v->get<int64_t>() > kMaxConfigInteger)
      fail("{}: {}{} must be an integer in [{}, {}], got {}", path, prefix, key, min, kMaxConfigInteger,
           v->dump());
    return v->get<int64_t>();
  }
  double positive(const char* key, double fallback) const {
    const json* v = find(key);
    if (!v) return fallback;
    if (!v->is_number() || !(v->get<double>() > 0) || !std::isfinite(v->get<double>()))
      fail("{}: {}{} must be a positive number, got {}", path, prefix, key, v->dump());
    return v->get<double>();
  }
  std::string act(const char* key, const std::string& fallback) const {
    const json* v = find(key);
    if (!v) return fallback;
    if (!v->is_string() || (*v != "quick_gelu" && *v != "gelu"))
      fail("{}: {}{} {} is not supported (quick_gelu, gelu)", path, prefix, key, v->dump());
    return v->get<std::string>();
  }
  void heads_divide(int64_t hidden, int64_t heads) const {
    if (hidden % heads != 0)
      fail("{}: {}num_attention_heads {} does not divide hidden_size {}", path, prefix, heads, hidden);
  }
};

// A sub-config with its legacy *_dict override (CLIPConfig's own rule).
json sub_config(const json& root, const std::string& key, const std::string& path) {
  json merged = json::object();
  for (const std::string& name : {key, key + "_dict"}) {
    auto it = root.find(name);
    if (it == root.end() || it->is_null()) continue;
    if (!it->is_object()) fail("{}: {} must be an object", path, name);
    merged.update(*it);
  }
  return merged;
}

ClipTextConfig parse_text(const json& j, const std::string& path, const std::string& prefix) {
  ClipConfigReader r{j, path, prefix};
  ClipTextConfig c;
  c.vocab_size = r.integer("vocab_size", c.vocab_size, 1);
  c.hidden_size = r.integer("hidden_size", c.hidden_size, 1);
  c.intermediate_size = r.integer("intermediate_size", c.intermediate_size, 1);
  c.num_hidden_layers = r.integer("num_hidden_layers", c.num_hidden_layers, 1);
  c.num_attention_heads = r.integer("num_attention_heads", c.num_attention_heads, 1);
  c.max_position_embeddings = r.integer("max_position_embeddings", c.max_position_embeddings, 1);
  c.hidden_act = r.act("hidden_act", c.hidden_act);
  c.layer_norm_eps = r.positive("layer_norm_eps", c.layer_norm_eps);
  c.projection_dim = r.integer("projection_dim", c.projection_dim, 1);
  c.eos_token_id = r.integer("eos_token_id", c.eos_token_id, 0);
  c.bos_token_id = r.integer("bos_token_id", c.bos_token_id, 0);
  c.pad_token_id = r.integer("pad_token_id", c.pad_token_id, 0);
  r.heads_divide(c.hidden_size, c.num_attention_heads);
  return c;
}

ClipVisionConfig parse_vision(const json& j, const std::string& path, const std::string& prefix) {
  ClipConfigReader r{j, path, prefix};
  ClipVisionConfig c;
  c.hidden_size = r.integer("hidden_size", c.hidden_size, 1);
  c.intermediate_size = r.integer("intermediate_size", c.intermediate_size, 1);
  c.num_hidden_layers = r.integer("num_hidden_layers", c.num_hidden_layers, 1);
  c.num_attention_heads = r.integer("num_attention_heads", c.num_attention_heads, 1);
  c.image_size = r.integer("image_size", c.image_size, 1);
  c.patch_size = r.integer("patch_size", c.patch_size, 1);
  c.num_channels = r.integer("num_channels", c.num_channels, 1);
  c.hidden_act = r.act("hidden_act", c.hidden_act);
  c.layer_norm_eps = r.positive("layer_norm_eps", c.layer_norm_eps);
  c.projection_dim = r.integer("projection_dim", c.projection_dim, 1);
  r.heads_divide(c.hidden_size, c.num_attention_heads);
  if (c.patch_size > c.image_size)
    fail("{}: {}patch_size {} is larger than image_size {}", path, prefix, c.patch_size, c.image_size);
  return c;
}

// Weights of one folder, each checked against the shape the config implies and copied out.
struct WeightReader {
  const safetensors::Checkpoint& ckpt;
  std::string dir;
  at::TensorOptions options;
  std::set<std::string> used;

  at::Tensor take(const std::string& name, std::vector<int64_t> shape) {
    if (!ckpt.contains(name)) fail("{}: missing tensor '{}'", dir, name);
    const auto& info = ckpt.info(name);
    if (!at::isFloatingType(info.dtype))
      fail("{}: tensor '{}' is {}, not a floating-point type", dir, name,
           safetensors::dtype_to_string(info.dtype));
    if (at::IntArrayRef(info.shape) != at::IntArrayRef(shape))
      fail("{}: tensor '{}' has shape [{}] but config.json implies [{}]", dir, name,
           fmt::join(info.shape, ", "), fmt::join(shape, ", "));
    used.insert(name);
    return ckpt.get(name).to(options, /*non_blocking=*/false, /*copy=*/true);
  }
  Linear linear(const std::string& name, int64_t out, int64_t in, bool bias) {
    Linear l;
    l.weight = take(name + ".weight", {out, in});
    if (bias) l.bias = take(name + ".bias", {out});
    return l;
  }
  std::vector<ClipLayer> layers(const std::string& prefix, int64_t count, int64_t hidden, int64_t inter) {
    std::vector<ClipLayer> out;
    for (int64_t i = 0; i < count; ++i) {
      const std::string p = fmt::format("{}.encoder.layers.{}.", prefix, i);
      ClipLayer l;
      l.norm1 = take(p + "layer_norm1.weight", {hidden});
      l.norm1_bias = take(p + "layer_norm1.bias", {hidden});
      l.q = linear(p + "self_attn.q_proj", hidden, hidden, true);
      l.k = linear(p + "self_attn.k_proj", hidden, hidden, true);
      l.v = linear(p + "self_attn.v_proj", hidden, hidden, true);
      l.out = linear(p + "self_attn.out_proj", hidden, hidden, true);
      l.norm2 = take(p + "layer_norm2.weight", {hidden});
      l.norm2_bias = take(p + "layer_norm2.bias", {hidden});
      l.fc1 = linear(p + "mlp.fc1", inter, hidden, true);
      l.fc2 = linear(p + "mlp.fc2", hidden, inter, true);
      out.push_back(std::move(l));
    }
    return out;
  }
};

at::Tensor activation(const at::Tensor& x, const std::string& act) {
  if (act == "quick_gelu") return x * at::sigmoid(1.702 * x);
  return at::gelu(x);
}

// CLIPEncoderLayer: pre-LN attention and MLP, each added to the residual. mask: additive (float32),
// broadcast to [B, heads, T, T], or undefined.
at::Tensor encoder_layer(const ClipLayer& l, const at::Tensor& x, const at::Tensor& mask, int64_t heads,
                         double eps, const std::string& act) {
  const int64_t B = x.size(0), T = x.size(1), hidden = x.size(2), head_dim = hidden / heads;
  const auto h = at::layer_norm(x, {hidden}, l.norm1, l.norm1_bias, eps);
  const auto split = [&](const at::Tensor& t) { return t.view({B, T, heads, head_dim}).transpose(1, 2); };
  const auto q = split(apply(l.q, h)), k = split(apply(l.k, h)), v = split(apply(l.v, h));
  // Softmax in float32 at least, as transformers' eager attention; double stays double.
  const auto acc = at::promote_types(x.scalar_type(), at::kFloat);
  auto scores = at::matmul(q, k.transpose(-1, -2)).to(acc) * (1.0 / std::sqrt(double(head_dim)));
  if (mask.defined()) scores = scores + mask;
  const auto probs = at::softmax(scores, -1).to(v.scalar_type());
  const auto attn = at::matmul(probs, v).transpose(1, 2).reshape({B, T, hidden});
  const auto y = x + apply(l.out, attn);
  const auto h2 = at::layer_norm(y, {hidden}, l.norm2, l.norm2_bias, eps);
  return y + apply(l.fc2, activation(apply(l.fc1, h2), act));
}

at::Tensor normalized(const at::Tensor& x) {
  return x / x.norm(2, {-1}, /*keepdim=*/true);
}

}  // namespace

ClipConfig load_clip_config(const std::string& config_path) {
  const json root = read_json_file(config_path);
  if (!root.is_object()) fail("{}: not a JSON object", config_path);
  ClipConfig c;
  c.model_type = root.value("model_type", std::string());
  if (c.model_type == "clip") {
    c.text = parse_text(sub_config(root, "text_config", config_path), config_path, "text_config.");
    c.vision = parse_vision(sub_config(root, "vision_config", config_path), config_path, "vision_config.");
    ClipConfigReader r{root, config_path, ""};
    const int64_t projection = r.integer("projection_dim", 512, 1);
    c.text.projection_dim = c.vision.projection_dim = projection;
    c.logit_scale_init = r.positive("logit_scale_init_value", 2.6592);
    c.has_vision = c.has_text_projection = true;
  } else if (c.model_type == "clip_text_model") {
    c.text = parse_text(root, config_path, "");
    const json arch = root.value("architectures", json::array());
    c.has_text_projection =
        arch.is_array() && std::find(arch.begin(), arch.end(), "CLIPTextModelWithProjection") != arch.end();
  } else {
    fail("{}: model_type '{}' is not a CLIP model (supported: clip, clip_text_model)", config_path,
         c.model_type);
  }
  for (const char* key : {"dtype", "torch_dtype"}) {
    auto it = root.find(key);
    if (it == root.end() || it->is_null()) continue;
    if (!it->is_string()) fail("{}: {} must be a string, got {}", config_path, key, it->dump());
    c.dtype = parse_dtype_name(it->get<std::string>(), config_path + ": " + key);
    break;
  }
  return c;
}

ClipModel load_clip_model(const std::string& dir, at::Device device, std::optional<at::ScalarType> dtype) {
  if (!fs::is_directory(dir)) fail("model folder {} does not exist", dir);
  ClipModel m;
  m.cfg = load_clip_config((fs::path(dir) / "config.json").string());
  const auto ckpt = safetensors::Checkpoint::open_dir(dir);
  at::NoGradGuard no_grad;
  WeightReader r{ckpt, dir, at::TensorOptions().dtype(dtype.value_or(m.cfg.dtype)).device(device), {}};

  const ClipTextConfig& t = m.cfg.text;
  m.text.cfg = t;
  m.text.token_embedding =
      r.take("text_model.embeddings.token_embedding.weight", {t.vocab_size, t.hidden_size});
  m.text.position_embedding =
      r.take("text_model.embeddings.position_embedding.weight", {t.max_position_embeddings, t.hidden_size});
  m.text.layers = r.layers("text_model", t.num_hidden_layers, t.hidden_size, t.intermediate_size);
  m.text.final_norm = r.take("text_model.final_layer_norm.weight", {t.hidden_size});
  m.text.final_norm_bias = r.take("text_model.final_layer_norm.bias", {t.hidden_size});
  if (m.cfg.has_text_projection)
    m.text.projection = r.linear("text_projection", t.projection_dim, t.hidden_size, false);

  if (m.cfg.has_vision) {
    const ClipVisionConfig& v = m.cfg.vision;
    const int64_t positions = (v.image_size / v.patch_size) * (v.image_size / v.patch_size) + 1;
    m.vision.cfg = v;
    m.vision.class_embedding = r.take("vision_model.embeddings.class_embedding", {v.hidden_size});
    m.vision.patch_embedding = r.take("vision_model.embeddings.patch_embedding.weight",
                                      {v.hidden_size, v.num_channels, v.patch_size, v.patch_size});
    m.vision.position_embedding =
        r.take("vision_model.embeddings.position_embedding.weight", {positions, v.hidden_size});
    m.vision.pre_norm = r.take("vision_model.pre_layrnorm.weight", {v.hidden_size});
    m.vision.pre_norm_bias = r.take("vision_model.pre_layrnorm.bias", {v.hidden_size});
    m.vision.layers = r.layers("vision_model", v.num_hidden_layers, v.hidden_size, v.intermediate_size);
    m.vision.post_norm = r.take("vision_model.post_layernorm.weight", {v.hidden_size});
    m.vision.post_norm_bias = r.take("vision_model.post_layernorm.bias", {v.hidden_size});
    m.vision.projection = r.linear("visual_projection", v.projection_dim, v.hidden_size, false);
    m.logit_scale = r.take("logit_scale", {});
  }
  for (const std::string& name : ckpt.names()) {
    // Older checkpoints store the position_ids buffers, which follow from the config.
    if (r.used.count(name) || (name.size() >= 12 && name.compare(name.size() - 12, 12, "position_ids") == 0))
      continue;
    fail("{}: unexpected tensor '{}' for a {} model", dir, name, m.cfg.model_type);
  }
  return m;
}

namespace {

// An encoder's layers under transformers' names (prefix "text_model" or "vision_model"), with the
// standard deviation of each tensor's init (0: zeros, -1: ones), after CLIPPreTrainedModel's
// _init_weights with initializer_factor 1.
template <class Layers, class F>
void visit_layers(const std::string& prefix, Layers& layers, double hidden, F&& f) {
  const double n = double(layers.size());
  const double in_std = std::pow(hidden, -0.5) * std::pow(2 * n, -0.5), out_std = std::pow(hidden, -0.5),
               fc_std = std::pow(2 * hidden, -0.5);
  for (size_t i = 0; i < layers.size(); ++i) {
    auto& l = layers[i];
    const std::string p = fmt::format("{}.encoder.layers.{}.", prefix, i);
    f(p + "layer_norm1.weight", l.norm1, -1.0);
    f(p + "layer_norm1.bias", l.norm1_bias, 0.0);
    for (auto& [name, lin, scale] :
         {std::tuple{"self_attn.q_proj", &l.q, in_std}, std::tuple{"self_attn.k_proj", &l.k, in_std},
          std::tuple{"self_attn.v_proj", &l.v, in_std}, std::tuple{"self_attn.out_proj", &l.out, out_std},
          std::tuple{"mlp.fc1", &l.fc1, fc_std}, std::tuple{"mlp.fc2", &l.fc2, in_std}}) {
      f(p + name + ".weight", lin->weight, scale);
      f(p + name + ".bias", lin->bias, 0.0);
    }
    f(p + "layer_norm2.weight", l.norm2, -1.0);
    f(p + "layer_norm2.bias", l.norm2_bias, 0.0);
  }
}

// Every tensor of a text model under transformers' names, with its init's standard deviation.
template <class M, class F>
void visit_text(M& m, F&& f) {
  const double hidden = double(m.cfg.hidden_size);
  f("text_model.embeddings.token_embedding.weight", m.token_embedding, 0.02);
  f("text_model.embeddings.position_embedding.weight", m.position_embedding, 0.02);
  visit_layers("text_model", m.layers, hidden, f);
  f("text_model.final_layer_norm.weight", m.final_norm, -1.0);
  f("text_model.final_layer_norm.bias", m.final_norm_bias, 0.0);
  if (m.projection.weight.defined()) f("text_projection.weight", m.projection.weight, std::pow(hidden, -0.5));
}

template <class M, class F>
void visit_vision(M& m, F&& f) {
  const double hidden = double(m.cfg.hidden_size);
  f("vision_model.embeddings.class_embedding", m.class_embedding, std::pow(hidden, -0.5));
  f("vision_model.embeddings.patch_embedding.weight", m.patch_embedding, 0.02);
  f("vision_model.embeddings.position_embedding.weight", m.position_embedding, 0.02);
  f("vision_model.pre_layrnorm.weight", m.pre_norm, -1.0);
  f("vision_model.pre_layrnorm.bias", m.pre_norm_bias, 0.0);
  visit_layers("vision_model", m.layers, hidden, f);
  f("vision_model.post_layernorm.weight", m.post_norm, -1.0);
  f("vision_model.post_layernorm.bias", m.post_norm_bias, 0.0);
  f("visual_projection.weight", m.projection.weight, std::pow(hidden, -0.5));
}

}  // namespace

ClipTextModel init_clip_text_model(const ClipTextConfig& c, uint64_t seed) {
  ClipTextModel m;
  m.cfg = c;
  const int64_t h = c.hidden_size, inter = c.intermediate_size;
  m.token_embedding = at::empty({c.vocab_size, h});
  m.position_embedding = at::empty({c.max_position_embeddings, h});
  const auto linear = [](int64_t out, int64_t in) { return Linear{at::empty({out, in}), at::empty({out})}; };
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    ClipLayer l;
    l.norm1 = at::empty({h}), l.norm1_bias = at::empty({h}), l.norm2 = at::empty({h}),
    l.norm2_bias = at::empty({h});
    l.q = linear(h, h), l.k = linear(h, h), l.v = linear(h, h), l.out = linear(h, h);
    l.fc1 = linear(inter, h), l.fc2 = linear(h, inter);
    m.layers.push_back(std::move(l));
  }
  m.final_norm = at::empty({h});
  m.final_norm_bias = at::empty({h});
  auto gen = at::detail::createCPUGenerator(seed);
  at::NoGradGuard no_grad;
  visit_text(m, [&](const std::string&, at::Tensor& t, double std) {
    if (std > 0)
      t.normal_(0, std, gen);
    else
      t.fill_(std < 0 ? 1.0 : 0.0);
  });
  return m;
}

ClipModel init_clip_model(const ClipConfig& c, uint64_t seed) {
  if (!c.has_vision) fail("init_clip_model: a CLIPModel config (model_type clip) is needed");
  ClipModel m;
  m.cfg = c;
  m.text = init_clip_text_model(c.text, seed);
  m.text.projection = Linear{at::empty({c.text.projection_dim, c.text.hidden_size}), {}};
  const auto& v = c.vision;
  const int64_t h = v.hidden_size,
                positions = (v.image_size / v.patch_size) * (v.image_size / v.patch_size) + 1;
  auto& vm = m.vision;
  vm.cfg = v;
  vm.class_embedding = at::empty({h});
  vm.patch_embedding = at::empty({h, v.num_channels, v.patch_size, v.patch_size});
  vm.position_embedding = at::empty({positions, h});
  vm.pre_norm = at::empty({h}), vm.pre_norm_bias = at::empty({h});
  for (int64_t i = 0; i < v.num_hidden_layers; ++i) {
    const auto linear = [](int64_t out, int64_t in) {
      return Linear{at::empty({out, in}), at::empty({out})};
    };
    ClipLayer l;
    l.norm1 = at::empty({h}), l.norm1_bias = at::empty({h}), l.norm2 = at::empty({h}),
    l.norm2_bias = at::empty({h});
    l.q = linear(h, h), l.k = linear(h, h), l.v = linear(h, h), l.out = linear(h, h);
    l.fc1 = linear(v.intermediate_size, h), l.fc2 = linear(h, v.intermediate_size);
    vm.layers.push_back(std::move(l));
  }
  vm.post_norm = at::empty({h}), vm.post_norm_bias = at::empty({h});
  vm.projection = Linear{at::empty({v.projection_dim, h}), {}};
  // The text tower drew from `seed`; the vision tower and the text projection from a second stream.
  auto gen = at::detail::createCPUGenerator(seed ^ 0x9E3779B97F4A7C15ull);
  at::NoGradGuard no_grad;
  const auto init = [&](const std::string&, at::Tensor& t, double std) {
    if (std > 0)
      t.normal_(0, std, gen);
    else
      t.fill_(std < 0 ? 1.0 : 0.0);
  };
  visit_vision(vm, init);
  init("text_projection.weight", m.text.projection.weight, std::pow(double(c.text.hidden_size), -0.5));
  m.logit_scale = at::scalar_tensor(c.logit_scale_init, at::kFloat);
  return m;
}

void save_clip_text_model(const ClipTextModel& m, const std::string& dir) {
  const auto& c = m.cfg;
  safetensors::NamedTensors tensors;
  visit_text(m, [&](const std::string& name, const at::Tensor& t, double) { tensors.emplace_back(name, t); });
  const json config = {
      {"architectures", {m.projection.weight.defined() ? "CLIPTextModelWithProjection" : "CLIPTextModel"}},
      {"model_type", "clip_text_model"},
      {"vocab_size", c.vocab_size},
      {"hidden_size", c.hidden_size},
      {"intermediate_size", c.intermediate_size},
      {"num_hidden_layers", c.num_hidden_layers},
      {"num_attention_heads", c.num_attention_heads},
      {"max_position_embeddings", c.max_position_embeddings},
      {"hidden_act", c.hidden_act},
      {"layer_norm_eps", c.layer_norm_eps},
      {"projection_dim", c.projection_dim},
      {"bos_token_id", c.bos_token_id},
      {"eos_token_id", c.eos_token_id},
      {"pad_token_id", c.pad_token_id},
      {"torch_dtype", dtype_name(m.token_embedding.scalar_type())}};
  fs::create_directories(dir);
  write_text(fs::path(dir) / "config.json", config.dump(2) + "\n");
  safetensors::save((fs::path(dir) / "model.safetensors").string(), tensors);
}

std::vector<std::pair<std::string, at::Tensor>> named_parameters(const ClipModel& m) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  const auto add = [&](const std::string& name, const at::Tensor& t, double) { out.emplace_back(name, t); };
  visit_text(m.text, add);
  if (m.cfg.has_vision) {
    visit_vision(m.vision, add);
    out.emplace_back("logit_scale", m.logit_scale);
  }
  return out;
}

void save_clip_model(const ClipModel& m, const std::string& config_path, const std::string& tokenizer_from,
                     const std::string& dir, Replace replace) {
  json config = read_json_file(config_path);
  if (!config.is_object()) fail("{}: not a JSON object", config_path);
  // transformers 5 writes "dtype", 4 "torch_dtype": the source's spelling is kept.
  config[config.contains("dtype") ? "dtype" : "torch_dtype"] =
      dtype_name(m.text.token_embedding.scalar_type());
  safetensors::NamedTensors tensors;
  for (auto& [name, t] : named_parameters(m)) tensors.emplace_back(name, t.detach());
  save_folder(dir, replace, tokenizer_from, [&](const std::string& tmp) {
    write_text(fs::path(tmp) / "config.json", config.dump(2) + "\n");
    safetensors::save((fs::path(tmp) / "model.safetensors").string(), tensors);
  });
}

ClipTextOutput clip_text_forward(const ClipTextModel& m, const at::Tensor& input_ids,
                                 const at::Tensor& attention_mask) {
  const ClipTextConfig& c = m.cfg;
  if (input_ids.dim() != 2) fail("CLIP text input_ids must be [batch, tokens], got {}", input_ids.dim());
  const int64_t B = input_ids.size(0), T = input_ids.size(1);
  if (B < 1) fail("CLIP text input has no rows");
  if (T < 1 || T > c.max_position_embeddings)
    fail("CLIP text input has {} tokens; the model takes 1 to {}", T, c.max_position_embeddings);
  const auto ids_cpu = input_ids.to(at::kCPU, at::kLong).contiguous();
  const int64_t lo = ids_cpu.min().item<int64_t>(), hi = ids_cpu.max().item<int64_t>();
  if (lo < 0 || hi >= c.vocab_size)
    fail("CLIP text input id {} is outside the vocabulary [0, {})", lo < 0 ? lo : hi, c.vocab_size);

  const auto device = m.token_embedding.device();
  const auto ids = ids_cpu.to(device);
  auto x = at::embedding(m.token_embedding, ids) + m.position_embedding.slice(0, 0, T).unsqueeze(0);

  // Additive masks in float32 as transformers builds them (its dtype's lowest value, summed), so
  // that rows whose keys are all masked come out as there.
  const float lowest = std::numeric_limits<float>::lowest();
  const auto opts = at::TensorOptions().dtype(at::kFloat).device(device);
  auto mask = at::triu(at::full({T, T}, lowest, opts), 1).view({1, 1, T, T});
  if (attention_mask.defined()) {
    if (attention_mask.sizes() != input_ids.sizes())
      fail("CLIP text attention_mask has shape [{}] but input_ids [{}]",
           fmt::join(attention_mask.sizes(), ", "), fmt::join(input_ids.sizes(), ", "));
    const auto padded = attention_mask.to(device).eq(0).view({B, 1, 1, T});
    mask = mask + at::where(padded, at::full({}, lowest, opts), at::zeros({}, opts));
  }
  for (const ClipLayer& l : m.layers)
    x = encoder_layer(l, x, mask, c.num_attention_heads, c.layer_norm_eps, c.hidden_act);
  x = at::layer_norm(x, {c.hidden_size}, m.final_norm, m.final_norm_bias, c.layer_norm_eps);

  std::vector<int64_t> eos(B, 0);
  const int64_t* p = ids_cpu.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t* row = p + b * T;
    if (c.eos_token_id == 2) {
      eos[b] = std::max_element(row, row + T) - row;
    } else {
      const int64_t* hit = std::find(row, row + T, c.eos_token_id);
      eos[b] = hit == row + T ? 0 : hit - row;
    }
  }
  const auto rows = at::arange(B, at::TensorOptions().dtype(at::kLong).device(device));
  const auto cols = at::tensor(eos, at::kLong).to(device);
  return {x, x.index({rows, cols})};
}

at::Tensor clip_text_embeds(const ClipTextModel& m, const ClipTextOutput& out) {
  if (!m.projection.weight.defined()) fail("this CLIP text model has no text_projection");
  return apply(m.projection, out.pooled);
}

ClipVisionOutput clip_vision_forward(const ClipVisionModel& m, const at::Tensor& pixel_values) {
  const ClipVisionConfig& c = m.cfg;
  if (!m.patch_embedding.defined()) fail("this CLIP model has no vision tower");
  if (pixel_values.dim() != 4 || pixel_values.size(1) != c.num_channels ||
      pixel_values.size(2) != c.image_size || pixel_values.size(3) != c.image_size)
    fail("CLIP vision input has shape [{}], expected [batch, {}, {}, {}]",
         fmt::join(pixel_values.sizes(), ", "), c.num_channels, c.image_size, c.image_size);
  const int64_t B = pixel_values.size(0);
  const auto pixels = pixel_values.to(m.patch_embedding.options());
  const auto patches = at::conv2d(pixels, m.patch_embedding, {}, c.patch_size).flatten(2).transpose(1, 2);
  const auto cls = m.class_embedding.view({1, 1, -1}).expand({B, 1, c.hidden_size});
  auto x = at::cat({cls, patches}, 1) + m.position_embedding.unsqueeze(0);
  x = at::layer_norm(x, {c.hidden_size}, m.pre_norm, m.pre_norm_bias, c.layer_norm_eps);
  for (const ClipLayer& l : m.layers)
    x = encoder_layer(l, x, {}, c.num_attention_heads, c.layer_norm_eps, c.hidden_act);
  const auto pooled =
      at::layer_norm(x.select(1, 0), {c.hidden_size}, m.post_norm, m.post_norm_bias, c.layer_norm_eps);
  return {x, pooled};
}

at::Tensor clip_image_embeds(const ClipVisionModel& m, const ClipVisionOutput& out) {
  return apply(m.projection, out.pooled);
}

at::Tensor clip_preprocess(const at::Tensor& images, int64_t image_size) {
  if (images.dim() != 4 || images.size(1) != 3 || images.size(2) < 1 || images.size(3) < 1)
    fail("CLIP preprocessing takes images [N, 3, H, W], got [{}]", fmt::join(images.sizes(), ", "));
  at::Tensor x = images;
  const int64_t h = images.size(2), w = images.size(3);
  if (h != image_size || w != image_size) {
    // CLIPImageProcessor's shortest_edge resize: the longer side scaled alike and truncated.
    const int64_t short_side = std::min(h, w), long_side = std::max(h, w);
    const auto scaled = static_cast<int64_t>(double(image_size) * double(long_side) / double(short_side));
    const int64_t new_h = h <= w ? image_size : scaled, new_w = h <= w ? scaled : image_size;
    // Antialiased when it shrinks, as NeMo-Aligner's PickScore preprocessing (torchvision's Resize with
    // antialias) and PIL's bicubic filter do: every pixel of a large image then weighs in, which an
    // image optimised against the reward would otherwise exploit.
    x = h > new_h || w > new_w ? at::_upsample_bicubic2d_aa(x, {new_h, new_w}, /*align_corners=*/false)
                               : at::upsample_bicubic2d(x, {new_h, new_w}, /*align_corners=*/false);
    const int64_t top = (new_h - image_size) / 2, left = (new_w - image_size) / 2;
    x = x.slice(2, top, top + image_size).slice(3, left, left + image_size);
  }
  const auto opts = at::TensorOptions().dtype(x.scalar_type()).device(x.device());
  const auto mean = at::tensor({0.48145466, 0.4578275, 0.40821073}, at::kDouble).to(opts).view({1, 3, 1, 1});
  const auto std = at::tensor({0.26862954, 0.26130258, 0.27577711}, at::kDouble).to(opts).view({1, 3, 1, 1});
  return (x - mean) / std;
}

at::Tensor clip_logits_per_image(const ClipModel& m, const at::Tensor& pixel_values,
                                 const at::Tensor& input_ids, const at::Tensor& attention_mask) {
  if (!m.cfg.has_vision) fail("this CLIP model has no vision tower (a text encoder folder)");
  const auto image = normalized(clip_image_embeds(m.vision, clip_vision_forward(m.vision, pixel_values)));
  const auto text =
      normalized(clip_text_embeds(m.text, clip_text_forward(m.text, input_ids, attention_mask)));
  return at::matmul(image, text.t()) * m.logit_scale.exp();
}

at::Tensor clip_score(const ClipModel& m, const at::Tensor& images, const at::Tensor& input_ids) {
  if (!m.cfg.has_vision) fail("this CLIP model has no vision tower (a text encoder folder)");
  if (input_ids.dim() != 2 || (input_ids.size(0) != 1 && input_ids.size(0) != images.size(0)))
    fail("clip_score takes input_ids [1 or {}, tokens] for {} images, got [{}]", images.size(0),
         images.size(0), fmt::join(input_ids.sizes(), ", "));
  const auto pixels = clip_preprocess(images, m.vision.cfg.image_size);
  return clip_embedding_scores(m, clip_image_embeds(m.vision, clip_vision_forward(m.vision, pixels)),
                               clip_text_embeds(m.text, clip_text_forward(m.text, input_ids)));
}

at::Tensor clip_embedding_scores(const ClipModel& m, const at::Tensor& image_embeds,
                                 const at::Tensor& text_embeds) {
  return (normalized(image_embeds) * normalized(text_embeds)).sum(-1) * m.logit_scale.exp();
}

at::Tensor clip_input_ids(const Tokenizer& tokenizer, const std::vector<std::string>& texts,
                          int64_t max_length) {
  std::vector<int64_t> ids;
  ids.reserve(texts.size() * max_length);
  for (const std::string& text : texts) {
    const std::vector<int32_t> row = encode_padded(tokenizer, text, max_length);
    ids.insert(ids.end(), row.begin(), row.end());
  }
  return at::tensor(ids, at::kLong).view({static_cast<int64_t>(texts.size()), max_length});
}

}  // namespace aligner
