// A decoder-only transformer covering Llama 2/3/3.1, Mistral, Mixtral, Qwen2, Qwen3 and Nemotron, written as
// plain structs of tensors and free functions. Weights are ordinary tensors (requires_grad for training), so
// autograd, checkpointing and adapters work on the same code.
#pragma once
#include <ATen/ATen.h>

#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "model/config.h"
#include "model/linear.h"
#include "model/tensor_parallel.h"

namespace aligner {

// A sparse mixture of experts: the router and each expert's gated SiLU feed-forward, stacked along a
// leading expert dimension (where expert or tensor parallelism will split them).
struct Moe {
  Linear router;                          // [experts, hidden]; replicated under tensor parallelism
  at::Tensor gate, up;                    // [experts, intermediate, hidden]: Mixtral's w1, w3
  at::Tensor down;                        // [experts, hidden, intermediate]: w2
  std::shared_ptr<const TensorSplit> tp;  // tensor parallel: each expert's intermediate columns split
};

struct Block {
  at::Tensor input_norm, post_attention_norm;            // norm weights [hidden]
  at::Tensor input_norm_bias, post_attention_norm_bias;  // layernorm1p only
  at::Tensor q_norm, k_norm;                             // qk_norm only: [head_dim]
  Linear q, k, v, o;
  Linear gate, up, down;  // no gate without gated_mlp; none with experts
  Moe moe;                // num_experts > 0 only
};

// What runs around each layer of a forward pass when the weights are not all resident: sharded
// training (dist/sharded_model.h) gathers a layer's weights before it and frees them after it.
struct LayerHooks {
  virtual ~LayerHooks() = default;
  virtual void before_forward() = 0;  // before the embedding lookup
  virtual void after_embedding() = 0;
  // The layer's input, through whatever runs once its backward pass is done.
  virtual at::Tensor before_layer(int64_t layer, const at::Tensor& in) = 0;
  // The layer's output, through whatever its backward pass needs first.
  virtual at::Tensor after_layer(int64_t layer, const at::Tensor& out) = 0;
  virtual void before_head() = 0;  // before the final norm (and the heads that read its output)
};

struct Transformer {
  ModelConfig cfg;
  at::Tensor embed;  // [vocab, hidden]
  std::vector<Block> layers;
  at::Tensor norm;       // final norm
  at::Tensor norm_bias;  // layernorm1p only
  Linear lm_head;        // weight is `embed` itself when tie_word_embeddings; none in a classifier
  Linear score;          // sequence classifiers only: [num_labels, hidden], no bias
  // Set while the weights are sharded; copies of the model (sharing its tensors) share it.
  std::shared_ptr<LayerHooks> hooks;
  // Tensor parallel: how the weights are split over the group (cfg then has this rank's head and
  // intermediate counts); null: whole.
  std::shared_ptr<const TensorSplit> tp;
};

inline constexpr int64_t kAllLayers = std::numeric_limits<int64_t>::max();

// What one forward pass reads. Only input_ids is required.
struct ForwardInput {
  at::Tensor input_ids;       // [B, T] int64
  at::Tensor attention_mask;  // [B, T], 1 = token, 0 = padding (left or right)
  at::Tensor position_ids;    // [B, T]; default: count of real tokens before each one
  // [B, T]; packed rows: tokens attend only within their segment. It may stay in host memory
  // (the others go to the model's device), which spares reading the packed layout back from the GPU.
  at::Tensor segment_ids;
  // The first N layers keep only their input for the backward pass and recompute themselves there:
  // activation memory of one layer instead of N, for N layers' extra forward (kAllLayers: every one).
  int64_t checkpointed_layers = 0;
};

// Mixtral's load-balancing loss, as transformers computes it (load_balancing_loss_func over every
// layer's router, padding left out): E x sum_e F_e P_e, F_e the fraction of token choices that went
// to expert e and P_e its mean router probability. While `weight` > 0, each forward_hidden that
// records gradients (a training forward) gives the backward pass weight x the loss's gradient, the
// algorithm's loss unchanged, and adds the loss's value to `sum` (`count` forwards). The trainer
// sets it per update from model.router_aux_loss_coef and reports the mean.
struct RouterAuxLoss {
  double weight = 0;
  double sum = 0;
  int64_t count = 0;
};
RouterAuxLoss& router_aux_loss();  // this thread's

// Uninitialised weights of the config's shapes with the given dtype and device (for loading); with
// `split`, this rank's slices of them.
Transformer allocate_transformer(const ModelConfig& cfg, const at::TensorOptions& options,
                                 std::shared_ptr<const TensorSplit> split = nullptr);
// Uninitialised weights of m's shapes (this rank's slices of a tensor-parallel model).
Transformer allocate_like(const Transformer& m, const at::TensorOptions& options);
// Random init (normal, std 0.02; norms 1; biases 0) in the config's dtype, on `device`.
Transformer init_transformer(const ModelConfig& cfg, at::Device device, uint64_t seed);

// The embeddings of token ids (any shape): [..., hidden].
at::Tensor embed_tokens(const Transformer& m, const at::Tensor& ids);
// Final hidden states after the last norm: [B, T, hidden].
at::Tensor forward_hidden(const Transformer& m, const ForwardInput& in);
// Logits over the vocabulary for the given hidden states: [..., vocab].
at::Tensor lm_logits(const Transformer& m, const at::Tensor& hidden);
// log p(targets | context) per position, computed in float32 (float64 for a float64 model) and in
// chunks so that the full [B, T, vocab] float32 log-softmax is never held at once: [B, T].
at::Tensor token_logprobs(const Transformer& m, const at::Tensor& hidden, const at::Tensor& targets);
// token_logprobs through a plain head (weight [V, H], no bias or adapter): rows [N, H], targets [N]
// (negative: no target, 0 out), chunk_rows rows at a time. Its backward computes the chunks' logits
// again instead of keeping their float32 log-softmax. [N] in float32 (float64 for float64 rows).
at::Tensor head_logprobs(const at::Tensor& rows, const at::Tensor& weight, const at::Tensor& targets,
                         int64_t chunk_rows);
// The distillation loss from a teacher's top-k through a plain head, per row: T^2 * sum_j pt_j
// (log pt_j - log ps_j), pt the softmax of the top-k values / T and ps the student's softmax of
// rows x weight^T / T (the whole vocabulary) read at the top-k ids. As head_logprobs: chunk_rows
// rows at a time, the chunks' logits computed again in the backward pass. rows [N, H], weight
// [V, H], topk_values and topk_ids [N, k]; [N] in float32 (float64 for float64 rows).
at::Tensor head_topk_kd(const at::Tensor& rows, const at::Tensor& weight, const at::Tensor& topk_values,
                        const at::Tensor& topk_ids, double temperature, int64_t chunk_rows);
// Rows of hidden states whose float32 logits over the whole vocabulary take about 256 MB.
int64_t logit_chunk_rows(const Transformer& m);
// Whether a loss over `rows` rows of m's logits, under autograd, should compute them again in the
// backward pass (head_logprobs, head_topk_kd) rather than keep what it keeps of each logit
// (kept_bytes_per_logit): a plain head, and more than 4 GB to keep.
bool recompute_head_logits(const Transformer& m, int64_t rows, int64_t kept_bytes_per_logit);
// The k largest logits of each row of hidden states (rows [N, H]) and their token ids, computed
// `chunk` rows at a time (logit_chunk_rows: about 256 MB of float32 logits): [N, min(k, vocab)] in
// float32 (float64 for a float64 model) and int64.
std::pair<at::Tensor, at::Tensor> lm_topk(const Transformer& m, const at::Tensor& rows, int64_t k,
                                          int64_t chunk);
// A sequence classifier's outputs, [B, num_labels] in float32 (float64 for a float64 model): the
// score head read at each row's last token that is neither padding (attention_mask 0) nor
// cfg.pad_token_id. That is the token transformers' XxxForSequenceClassification reads (the
// rightmost one that is not pad_token_id) when the padding is written with pad_token_id.
at::Tensor sequence_scores(const Transformer& m, const at::Tensor& hidden, const ForwardInput& in);

// Hugging Face parameter names ("model.layers.0.self_attn.q_proj.weight", ...) and the tensors
// behind them. A tied lm_head is not listed, as transformers does not save it; a classifier lists
// "score.weight" instead of lm_head.
// A mixture of experts lists each stacked expert weight once, as "...block_sparse_moe.experts.w1"
// [experts, ...]: a tensor that trains as a whole.
std::vector<std::pair<std::string, at::Tensor>> named_parameters(const Transformer& m);
// The same, as the fields that hold them (to put other tensors in their place).
std::vector<std::pair<std::string, at::Tensor*>> parameter_slots(Transformer& m);
// The tensors of a Hugging Face checkpoint: named_parameters with each expert stack split into
// per-expert views named as Mixtral's checkpoints name them ("...experts.3.w1.weight").
std::vector<std::pair<std::string, at::Tensor>> checkpoint_tensors(const Transformer& m);

}  // namespace aligner
