// The model's shape and options, read from a Hugging Face config.json as transformers 4.x and 5.x
// write it (rope_theta + rope_scaling or rope_parameters; torch_dtype or dtype).
#pragma once
#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace aligner {

struct RopeConfig {
  std::string type = "default";  // default | linear | dynamic | llama3
  double theta = 10000.0;
  double factor = 1.0;
  double low_freq_factor = 1.0;   // llama3
  double high_freq_factor = 4.0;  // llama3
  int64_t original_max_position_embeddings = 0;
};

struct ModelConfig {
  std::string model_type;  // llama | mistral | mixtral | qwen2 | qwen3 | nemotron
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;  // the eps of every norm, RMSNorm or LayerNorm
  // Nemotron's norms are LayerNorms with a bias whose scale is 1 + weight ("layernorm1p"); the
  // others are RMSNorms without bias.
  bool layernorm1p = false;
  // The feed-forward: gate_proj, up_proj, down_proj with SiLU (llama and friends), or up_proj and
  // down_proj with squared ReLU (Nemotron, relu2): no gate.
  bool gated_mlp = true;
  bool qk_norm = false;  // Qwen3: an RMSNorm over each head of q and of k, before RoPE
  // Mixtral's sparse mixture of experts in place of the feed-forward: each token goes to the
  // experts_per_token experts its router ranks highest, weighted by their renormalised softmax.
  int64_t num_experts = 0;  // 0: a dense feed-forward
  int64_t experts_per_token = 0;
  // The load-balancing loss's weight that config.json asks for in training: router_aux_loss_coef
  // when output_router_logits is true (as transformers adds it), else 0.
  double router_aux_loss_coef = 0;
  int64_t rotary_dim = 0;  // leading dims of each head that RoPE rotates (partial_rotary_factor)
  RopeConfig rope;
  bool tie_word_embeddings = false;
  bool qkv_bias = false;  // llama attention_bias, qwen2 always
  bool o_bias = false;    // llama attention_bias only
  bool mlp_bias = false;
  // Per layer: 0 = full causal attention, else the sliding-window size.
  std::vector<int64_t> window;
  std::optional<int64_t> bos_token_id, pad_token_id;
  std::vector<int64_t> eos_token_ids;  // Llama 3.1 lists several
  // Sequence classifiers (architectures "XxxForSequenceClassification": reward models) have a
  // score head with one output per label in place of lm_head; 0 for a causal LM.
  int64_t num_labels = 0;
  std::vector<std::string> labels;    // id2label, in id order
  at::ScalarType dtype = at::kFloat;  // the dtype the weights are stored in
  nlohmann::json raw;                 // the file as read, written back on save
};

// `where` names the file in errors. Unsupported model_type, hidden_act or rope type is an error
// that lists what is supported.
ModelConfig parse_model_config(const nlohmann::json& j, const std::string& where);
ModelConfig load_model_config(const std::string& config_json_path);

// `lm` turned into a sequence classifier with these labels, written into `raw` as transformers
// writes XxxForSequenceClassification (architectures, num_labels, id2label, label2id). A config
// without pad_token_id gets `pad_token_id`: transformers reads each row's score at its last token
// that is not pad_token_id, and refuses batches of more than one row without it.
ModelConfig sequence_classifier_config(const ModelConfig& lm, const std::vector<std::string>& labels,
                                       int64_t pad_token_id);

}  // namespace aligner
