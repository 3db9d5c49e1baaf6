// LoRA on the UNet's attention projections (to_q, to_k, to_v and to_out.0 of every self- and
// cross-attention), as diffusers' LoRA training scripts and NeMo-Aligner's DRaFT+ add them. The
// adapters live in the Linear structs (model/linear.h), as the language models' do. Saved in
// diffusers' LoRA file (pytorch_lora_weights.safetensors), which
// StableDiffusionPipeline.load_lora_weights reads.
#pragma once
#include <string>
#include <utility>
#include <vector>

#include "diffusion/unet.h"
#include "model/lora.h"

namespace aligner {

// The projections an adapter can target, by their diffusers module names' last part.
extern const std::vector<std::string> kUNetLoraTargets;

// Every attention projection as (module name, Linear), e.g.
// ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", to_q), in the model's order.
std::vector<std::pair<std::string, Linear*>> unet_attention_linears(UNet& u);
std::vector<std::pair<std::string, const Linear*>> unet_attention_linears(const UNet& u);

// Zero-effect adapters (B = 0) on the targeted projections, A drawn as model/lora.h draws it. A target
// outside kUNetLoraTargets is an error.
void add_unet_adapters(UNet& u, const LoraConfig& c, uint64_t seed);
// "<module>.lora_A.weight" and "<module>.lora_B.weight" of every adapter, in the model's order.
std::vector<std::pair<std::string, at::Tensor>> unet_adapter_parameters(const UNet& u);
// The same UNet without adapters, sharing its tensors: the frozen base.
UNet unet_without_adapters(const UNet& u);

// diffusers' LoRA file in `dir` (created if missing): "unet.<module>.lora.down.weight" = A and
// "unet.<module>.lora.up.weight" = scale x B in float32, so that diffusers (no alphas in the file:
// scale 1) computes what aligner does.
void save_unet_adapter(const UNet& u, const std::string& dir);
// Adds the adapters of such a file (diffusers' "lora.down/up" names, or PEFT's "lora_A/lora_B",
// with or without the "unet." prefix) to `u`; scale alpha / rank where the file has "<module>.alpha"
// or a lora_adapter_metadata header with lora_alpha and r, else 1. A module the UNet lacks, a shape that does not fit it, or ranks that differ between
// down and up is an error naming the file and the tensor.
void load_unet_adapter(UNet& u, const std::string& dir);

}  // namespace aligner
