// CLIP (transformers' CLIPModel, CLIPTextModel, CLIPTextModelWithProjection): Stable Diffusion's
// text encoder and the vision and text towers of a PickScore-style reward, as plain structs of
// tensors and free functions that match transformers' eager forward.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "io/hf_checkpoint.h"
#include "model/linear.h"

namespace aligner {

class Tokenizer;

// transformers' CLIPTextConfig, with its defaults where config.json is silent.
struct ClipTextConfig {
  int64_t vocab_size = 49408;
  int64_t hidden_size = 512;
  int64_t intermediate_size = 2048;
  int64_t num_hidden_layers = 12;
  int64_t num_attention_heads = 8;
  int64_t max_position_embeddings = 77;
  std::string hidden_act = "quick_gelu";  // quick_gelu | gelu
  double layer_norm_eps = 1e-5;
  int64_t projection_dim = 512;  // a CLIPModel's is its top-level projection_dim
  // 2 in legacy configs (Stable Diffusion 1.x's text_encoder): the pooled token is then the one with
  // the largest id, as transformers picks it.
  int64_t eos_token_id = 49407;
  int64_t bos_token_id = 49406;
  int64_t pad_token_id = 1;
};

// transformers' CLIPVisionConfig.
struct ClipVisionConfig {
  int64_t hidden_size = 768;
  int64_t intermediate_size = 3072;
  int64_t num_hidden_layers = 12;
  int64_t num_attention_heads = 12;
  int64_t image_size = 224;
  int64_t patch_size = 32;
  int64_t num_channels = 3;
  std::string hidden_act = "quick_gelu";
  double layer_norm_eps = 1e-5;
  int64_t projection_dim = 512;
};

struct ClipConfig {
  std::string model_type;  // "clip" (CLIPModel) or "clip_text_model"
  ClipTextConfig text;
  ClipVisionConfig vision;            // CLIPModel only
  bool has_vision = false;            // CLIPModel
  bool has_text_projection = false;   // CLIPModel, CLIPTextModelWithProjection
  at::ScalarType dtype = at::kFloat;  // config.json's torch_dtype
  double logit_scale_init = 2.6592;   // CLIPModel: logit_scale_init_value, log(1 / 0.07)
};

// A CLIPModel folder's config.json (model_type "clip": text_config, vision_config, projection_dim,
// the legacy text_config_dict and vision_config_dict override them) or a
// CLIPTextModel / CLIPTextModelWithProjection one (model_type "clip_text_model"; the projection when
// architectures names CLIPTextModelWithProjection). Bad values are errors naming the file and key.
ClipConfig load_clip_config(const std::string& config_path);

// One pre-LN encoder layer (CLIPEncoderLayer).
struct ClipLayer {
  at::Tensor norm1, norm1_bias, norm2, norm2_bias;  // layer_norm1, layer_norm2
  Linear q, k, v, out;                              // self_attn.{q,k,v,out}_proj
  Linear fc1, fc2;                                  // mlp
};

struct ClipTextModel {
  ClipTextConfig cfg;
  at::Tensor token_embedding;     // [vocab, hidden]
  at::Tensor position_embedding;  // [max_position_embeddings, hidden]
  std::vector<ClipLayer> layers;
  at::Tensor final_norm, final_norm_bias;
  Linear projection;  // text_projection [projection_dim, hidden], no bias; undefined without one
};

struct ClipVisionModel {
  ClipVisionConfig cfg;
  at::Tensor class_embedding;          // [hidden]
  at::Tensor patch_embedding;          // [hidden, channels, patch, patch], a convolution without bias
  at::Tensor position_embedding;       // [(image / patch)^2 + 1, hidden]
  at::Tensor pre_norm, pre_norm_bias;  // pre_layrnorm (transformers' spelling)
  std::vector<ClipLayer> layers;
  at::Tensor post_norm, post_norm_bias;  // post_layernorm, on the CLS token
  Linear projection;                     // visual_projection [projection_dim, hidden], no bias
};

struct ClipModel {
  ClipConfig cfg;
  ClipTextModel text;
  ClipVisionModel vision;  // empty for a text-only folder (cfg.has_vision false)
  at::Tensor logit_scale;  // scalar; CLIPModel only
};

// config.json and the weights (model.safetensors or a sharded index) under transformers' names
// (text_model.*, vision_model.*, text_projection.weight, visual_projection.weight, logit_scale).
// A missing tensor, a shape config.json does not imply, or a tensor the model does not have is an
// error naming the folder and tensor. dtype: the compute dtype (default: config.json's).
ClipModel load_clip_model(const std::string& dir, at::Device device,
                          std::optional<at::ScalarType> dtype = std::nullopt);

// A CLIPTextModel with random weights as transformers initialises one (embeddings normal(0, 0.02),
// projections normal with CLIP's per-layer scales, norms 1 and 0, biases 0), float32 on the CPU:
// the text encoder of a diffusion model trained from scratch.
ClipTextModel init_clip_text_model(const ClipTextConfig& c, uint64_t seed);
// A CLIPTextModel folder (config.json, model.safetensors in the model's dtype) as Stable Diffusion's
// text_encoder/ is: load_clip_model and transformers read it back exactly.
void save_clip_text_model(const ClipTextModel& m, const std::string& dir);

// Every weight of a CLIPModel under transformers' names: the text tower, and for a CLIPModel the
// vision tower, both projections and logit_scale. What a trainer optimises.
std::vector<std::pair<std::string, at::Tensor>> named_parameters(const ClipModel& m);

// `m` as a CLIPModel folder that transformers and load_clip_model read: the config.json at
// config_path with its dtype the weights', model.safetensors, and the tokenizer and preprocessor
// files of tokenizer_from; with save_folder's guarantees (a new folder renamed into place, `dir`
// replaced only as `replace` allows).
void save_clip_model(const ClipModel& m, const std::string& config_path, const std::string& tokenizer_from,
                     const std::string& dir, Replace replace);

// A CLIPModel (config.json's model_type "clip") with random weights as transformers initialises one,
// logit_scale at logit_scale_init_value; float32 on the CPU: a reward model trained from scratch
// (`aligner init`, then `aligner pickscore`).
ClipModel init_clip_model(const ClipConfig& c, uint64_t seed);

struct ClipTextOutput {
  at::Tensor last_hidden_state;  // [B, T, hidden], after final_layer_norm
  at::Tensor pooled;             // [B, hidden]: the hidden state at each row's eos token
};

// input_ids [B, T] (T <= max_position_embeddings); attention_mask [B, T] (1 token, 0 padding) is
// optional, as Stable Diffusion 1.x leaves it out. The causal mask always applies. The pooled
// token is, as transformers picks it, the first eos (eos_token_id) of the row, or with the legacy
// eos_token_id 2 the largest id of the row; a row without eos pools its first token.
ClipTextOutput clip_text_forward(const ClipTextModel& m, const at::Tensor& input_ids,
                                 const at::Tensor& attention_mask = {});
// text_projection(pooled): CLIPModel.get_text_features, unnormalised. Needs a projection.
at::Tensor clip_text_embeds(const ClipTextModel& m, const ClipTextOutput& out);

struct ClipVisionOutput {
  at::Tensor last_hidden_state;  // [B, 1 + patches, hidden], before post_layernorm
  at::Tensor pooled;             // [B, hidden]: post_layernorm of the CLS token
};

// pixel_values [B, channels, image_size, image_size], already normalised (clip_preprocess).
ClipVisionOutput clip_vision_forward(const ClipVisionModel& m, const at::Tensor& pixel_values);
// visual_projection(pooled): CLIPModel.get_image_features, unnormalised.
at::Tensor clip_image_embeds(const ClipVisionModel& m, const ClipVisionOutput& out);

// CLIPImageProcessor's resize, center crop and normalisation for images [N, 3, H, W] in [0, 1], made
// differentiable: the shorter side resized to image_size by bicubic interpolation, antialiased when
// it shrinks (torch's F.interpolate(mode="bicubic", antialias=True), as torchvision's Resize in
// NeMo-Aligner's PickScore preprocessing; PIL's filter, which the processor uses on uint8 images,
// differs from it in rounding only), the center image_size x image_size crop, then (x - mean) / std
// with CLIP's mean and std. Images already image_size square are only normalised.
at::Tensor clip_preprocess(const at::Tensor& images, int64_t image_size);

// CLIPModel's logits_per_image [images, texts]: exp(logit_scale) x cosine of the projected
// embeddings. pixel_values as clip_vision_forward takes them.
at::Tensor clip_logits_per_image(const ClipModel& m, const at::Tensor& pixel_values,
                                 const at::Tensor& input_ids, const at::Tensor& attention_mask = {});

// The PickScore reward per pair: exp(logit_scale) x cosine(image embeds, text embeds) for images
// [N, 3, H, W] in [0, 1] (clip_preprocess) and input_ids [N, T] or [1, T] (one prompt for all).
// Differentiable in the images. [N].
at::Tensor clip_score(const ClipModel& m, const at::Tensor& images, const at::Tensor& input_ids);

// exp(logit_scale) x cosine of image and text embeddings (clip_image_embeds, clip_text_embeds) along
// their last dimension, broadcast as the product broadcasts them: clip_score's last step.
at::Tensor clip_embedding_scores(const ClipModel& m, const at::Tensor& image_embeds,
                                 const at::Tensor& text_embeds);

// Padded ids [texts, max_length] (int64) for a batch of texts, as text/clip_tokenizer's
// encode_padded makes them.
at::Tensor clip_input_ids(const Tokenizer& tokenizer, const std::vector<std::string>& texts,
                          int64_t max_length);

}  // namespace aligner
