#include "model/config.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>
#include <map>
#include <type_traits>

#include "core/error.h"
#include "core/json.h"
#include "core/strings.h"

namespace aligner {
namespace {

using json = nlohmann::json;

// An integer, or a float with an integral value; nlohmann would truncate 1.5 and convert 1e300 with
// undefined behaviour.
std::optional<int64_t> as_int(const json& v) {
  if (v.is_number_unsigned()) {
    if (v.get<uint64_t>() > uint64_t(std::numeric_limits<int64_t>::max())) return std::nullopt;
    return int64_t(v.get<uint64_t>());
  }
  if (v.is_number_integer()) return v.get<int64_t>();
  if (v.is_number_float()) {
    const double d = v.get<double>();
    // 2^63 is exactly representable, and the first double past int64's range.
    if (d == std::trunc(d) && d >= -9223372036854775808.0 && d < 9223372036854775808.0) return int64_t(d);
  }
  return std::nullopt;
}

// Reads an optional field with a type check, so that a wrong type names the key and file.
template <class T>
std::optional<T> opt(const json& j, const char* key, const std::string& where) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return std::nullopt;
  if constexpr (std::is_same_v<T, int64_t>) {
    if (auto v = as_int(*it)) return v;
  } else {
    try {
      return it->get<T>();
    } catch (const json::exception&) {
    }
  }
  fail("{}: key '{}' has the wrong type ({})", where, key, it->dump());
}

template <class T>
T req(const json& j, const char* key, const std::string& where) {
  auto v = opt<T>(j, key, where);
  if (!v) fail("{}: missing required key '{}'", where, key);
  return *v;
}

at::ScalarType parse_dtype(const std::string& s, const std::string& where) {
  if (s == "float32" || s == "float") return at::kFloat;
  if (s == "bfloat16") return at::kBFloat16;
  if (s == "float16" || s == "half") return at::kHalf;
  fail("{}: unsupported dtype '{}' (supported: float32, bfloat16, float16)", where, s);
}

RopeConfig parse_rope(const json& j, const std::string& where) {
  RopeConfig r;
  // transformers 5.x folds theta and scaling into rope_parameters; 4.x has rope_theta and
  // rope_scaling (whose type key is "rope_type", or "type" in older files).
  const json* scaling = nullptr;
  if (auto it = j.find("rope_parameters"); it != j.end() && it->is_object()) {
    scaling = &*it;
    r.theta = opt<double>(*it, "rope_theta", where).value_or(r.theta);
  } else {
    r.theta = opt<double>(j, "rope_theta", where).value_or(r.theta);
    if (auto s = j.find("rope_scaling"); s != j.end() && s->is_object()) scaling = &*s;
  }
  if (!scaling) return r;
  const json& s = *scaling;
  r.type = opt<std::string>(s, "rope_type", where)
               .value_or(opt<std::string>(s, "type", where).value_or("default"));
  r.factor = opt<double>(s, "factor", where).value_or(1.0);
  r.low_freq_factor = opt<double>(s, "low_freq_factor", where).value_or(r.low_freq_factor);
  r.high_freq_factor = opt<double>(s, "high_freq_factor", where).value_or(r.high_freq_factor);
  r.original_max_position_embeddings = opt<int64_t>(s, "original_max_position_embeddings", where).value_or(0);
  if (r.type != "default" && r.type != "linear" && r.type != "dynamic" && r.type != "llama3")
    fail("{}: unsupported rope type '{}' (supported: default, linear, dynamic, llama3)", where, r.type);
  if (r.type == "llama3" && r.original_max_position_embeddings <= 0)
    fail("{}: rope type llama3 needs original_max_position_embeddings", where);
  return r;
}

// Bounds what a config may ask for before anything is allocated from it: far beyond any real
// model, far below what would overflow the products of sizes computed later.
constexpr int64_t kMaxSize = int64_t(1) << 24;

// A size: required unless `fallback` is given, and in [1, kMaxSize].
int64_t size_field(const json& j, const char* key, const std::string& where,
                   std::optional<int64_t> fallback = std::nullopt) {
  const auto v = fallback ? opt<int64_t>(j, key, where).value_or(*fallback) : req<int64_t>(j, key, where);
  if (v < 1 || v > kMaxSize) fail("{}: {} ({}) must be in [1, {}]", where, key, v, kMaxSize);
  return v;
}

// A classifier is told by its class in "architectures"; its labels come from id2label, else
// num_labels, else transformers' default of two.
void parse_classifier(const json& j, const std::string& where, ModelConfig& c) {
  const auto arch =
      opt<std::vector<std::string>>(j, "architectures", where).value_or(std::vector<std::string>{});
  if (std::none_of(arch.begin(), arch.end(),
                   [](const std::string& a) { return ends_with(a, "ForSequenceClassification"); }))
    return;
  const auto num_labels = opt<int64_t>(j, "num_labels", where);
  if (num_labels && (*num_labels < 1 || *num_labels > kMaxSize))
    fail("{}: num_labels ({}) must be in [1, {}]", where, *num_labels, kMaxSize);
  if (auto it = j.find("id2label"); it != j.end() && it->is_object() && !it->empty()) {
    c.labels.resize(it->size());
    for (size_t i = 0; i < c.labels.size(); ++i) {
      auto name = it->find(std::to_string(i));
      if (name == it->end() || !name->is_string())
        fail("{}: id2label must map \"0\" .. \"{}\" to names, got {}", where, it->size() - 1, it->dump());
      c.labels[i] = name->get<std::string>();
    }
  } else {
    for (int64_t i = 0; i < num_labels.value_or(2); ++i) c.labels.push_back(fmt::format("LABEL_{}", i));
  }
  c.num_labels = int64_t(c.labels.size());
  if (c.num_labels < 1 || (num_labels && *num_labels != c.num_labels))
    fail("{}: num_labels ({}) does not match id2label ({} labels)", where, num_labels.value_or(0),
         c.num_labels);
}

}  // namespace

ModelConfig parse_model_config(const json& j, const std::string& where) {
  if (!j.is_object()) fail("{}: expected a JSON object", where);
  ModelConfig c;
  c.raw = j;
  c.model_type = req<std::string>(j, "model_type", where);
  const bool nemotron = c.model_type == "nemotron";
  if (c.model_type != "llama" && c.model_type != "mistral" && c.model_type != "mixtral" &&
      c.model_type != "qwen2" && c.model_type != "qwen3" && !nemotron)
    fail("{}: unsupported model_type '{}' (supported: llama, mistral, mixtral, qwen2, qwen3, nemotron)",
         where, c.model_type);
  const std::string want_act = nemotron ? "relu2" : "silu";
  if (auto act = opt<std::string>(j, "hidden_act", where); act && *act != want_act)
    fail("{}: unsupported hidden_act '{}' for {} (supported: {})", where, *act, c.model_type, want_act);
  c.layernorm1p = nemotron;
  if (c.model_type == "mixtral") {
    c.num_experts = size_field(j, "num_local_experts", where, 8);
    c.experts_per_token = size_field(j, "num_experts_per_tok", where, 2);
    if (c.experts_per_token > c.num_experts)
      fail("{}: num_experts_per_tok ({}) is more than num_local_experts ({})", where, c.experts_per_token,
           c.num_experts);
    if (opt<bool>(j, "output_router_logits", where).value_or(false))
      c.router_aux_loss_coef = opt<double>(j, "router_aux_loss_coef", where).value_or(0.001);
    if (opt<double>(j, "router_jitter_noise", where).value_or(0.0) != 0.0)
      fail("{}: router_jitter_noise is set; aligner's router has no jitter", where);
  }
  c.gated_mlp = !nemotron;
  c.qk_norm = c.model_type == "qwen3";

  c.vocab_size = size_field(j, "vocab_size", where);
  c.hidden_size = size_field(j, "hidden_size", where);
  c.intermediate_size = size_field(j, "intermediate_size", where);
  c.num_layers = size_field(j, "num_hidden_layers", where);
  c.num_heads = size_field(j, "num_attention_heads", where);
  c.num_kv_heads = size_field(j, "num_key_value_heads", where, c.num_heads);
  c.head_dim = size_field(j, "head_dim", where, c.hidden_size / c.num_heads);
  c.max_position_embeddings = size_field(j, "max_position_embeddings", where, 4096);
  c.rms_norm_eps =
      opt<double>(j, nemotron ? "norm_eps" : "rms_norm_eps", where).value_or(nemotron ? 1e-5 : 1e-6);
  c.tie_word_embeddings = opt<bool>(j, "tie_word_embeddings", where).value_or(false);
  if (c.num_heads % c.num_kv_heads != 0)
    fail("{}: num_attention_heads ({}) must be a positive multiple of num_key_value_heads ({})", where,
         c.num_heads, c.num_kv_heads);
  c.rope = parse_rope(j, where);
  if (c.rope.original_max_position_embeddings <= 0)
    c.rope.original_max_position_embeddings = c.max_position_embeddings;
  // transformers 5.x may keep partial_rotary_factor in rope_parameters, 4.x at the top level.
  double partial = opt<double>(j, "partial_rotary_factor", where).value_or(1.0);
  if (auto it = j.find("rope_parameters"); it != j.end() && it->is_object())
    partial = opt<double>(*it, "partial_rotary_factor", where).value_or(partial);
  c.rotary_dim = int64_t(double(c.head_dim) * partial);
  if (!(partial > 0 && partial <= 1) || c.rotary_dim < 2 || c.rotary_dim % 2 != 0)
    fail("{}: partial_rotary_factor ({}) must leave an even number of rotated dims in (0, head_dim]", where,
         partial);

  if (c.model_type == "qwen2") {
    c.qkv_bias = true;  // Qwen2 always has q/k/v biases and none on o_proj or the MLP
  } else {
    c.qkv_bias = c.o_bias = opt<bool>(j, "attention_bias", where).value_or(false);
    c.mlp_bias = opt<bool>(j, "mlp_bias", where).value_or(false);
  }

  // Sliding windows: transformers 5.x lists them per layer in layer_types; older files say it
  // per family (Mistral: every layer; Qwen2: layers >= max_window_layers when enabled).
  auto window = opt<int64_t>(j, "sliding_window", where).value_or(0);
  if (window < 0) fail("{}: sliding_window ({}) is negative", where, window);
  c.window.assign(c.num_layers, 0);
  if (auto lt = j.find("layer_types"); lt != j.end() && lt->is_array()) {
    if ((int64_t)lt->size() != c.num_layers)
      fail("{}: layer_types has {} entries for {} layers", where, lt->size(), c.num_layers);
    for (int64_t i = 0; i < c.num_layers; ++i) {
      if (!(*lt)[i].is_string()) fail("{}: layer_types[{}] is not a string ({})", where, i, (*lt)[i].dump());
      auto t = (*lt)[i].get<std::string>();
      if (t == "sliding_attention")
        c.window[i] = window;
      else if (t != "full_attention")
        fail("{}: unsupported layer type '{}' (supported: full_attention, sliding_attention)", where, t);
    }
  } else if (c.model_type == "mistral" || c.model_type == "mixtral") {
    c.window.assign(c.num_layers, window);
  } else if ((c.model_type == "qwen2" || c.model_type == "qwen3") &&
             opt<bool>(j, "use_sliding_window", where).value_or(false)) {
    // As transformers reads it: layer i slides when i >= max_window_layers, so a negative value
    // means every layer.
    auto first = std::max<int64_t>(opt<int64_t>(j, "max_window_layers", where).value_or(c.num_layers), 0);
    for (int64_t i = first; i < c.num_layers; ++i) c.window[i] = window;
  }

  c.bos_token_id = opt<int64_t>(j, "bos_token_id", where);
  c.pad_token_id = opt<int64_t>(j, "pad_token_id", where);
  if (auto it = j.find("eos_token_id"); it != j.end() && !it->is_null()) {
    for (const json& id : it->is_array() ? *it : json::array({*it})) {
      const auto v = as_int(id);
      if (!v) fail("{}: eos_token_id must be an id or a list of ids, got {}", where, it->dump());
      c.eos_token_ids.push_back(*v);
    }
  }
  parse_classifier(j, where, c);
  auto dtype = opt<std::string>(j, "dtype", where);
  if (!dtype) dtype = opt<std::string>(j, "torch_dtype", where);
  c.dtype = dtype ? parse_dtype(*dtype, where) : at::kFloat;
  return c;
}

ModelConfig load_model_config(const std::string& path) {
  return parse_model_config(read_json_file(path), path);
}

ModelConfig sequence_classifier_config(const ModelConfig& lm, const std::vector<std::string>& labels,
                                       int64_t pad_token_id) {
  if (labels.empty()) fail("a sequence classifier needs at least one label");
  ModelConfig c = lm;
  c.num_labels = int64_t(labels.size());
  c.labels = labels;
  static const std::map<std::string, std::string> classes = {
      {"llama", "Llama"}, {"mistral", "Mistral"}, {"mixtral", "Mixtral"},
      {"qwen2", "Qwen2"}, {"qwen3", "Qwen3"},     {"nemotron", "Nemotron"}};
  c.raw["architectures"] = {classes.at(c.model_type) + "ForSequenceClassification"};
  c.raw["num_labels"] = c.num_labels;
  json id2label = json::object(), label2id = json::object();
  for (size_t i = 0; i < labels.size(); ++i) {
    if (label2id.contains(labels[i])) fail("label '{}' is given twice", labels[i]);
    id2label[std::to_string(i)] = labels[i];
    label2id[labels[i]] = i;
  }
  c.raw["id2label"] = id2label;
  c.raw["label2id"] = label2id;
  if (!c.pad_token_id) {
    c.pad_token_id = pad_token_id;
    c.raw["pad_token_id"] = pad_token_id;
  }
  return c;
}

}  // namespace aligner
