// PEFT LoRA adapter folders: adapter_config.json + adapter_model.safetensors, as
// peft.PeftModel.save_pretrained writes them and from_pretrained reads them. Tensor names are
// PEFT's, "base_model.model." + the module's name + ".lora_A.weight" / ".lora_B.weight"; a sequence
// classifier's score head, which trains whole beside the adapters, is "base_model.model.score.weight"
// (PEFT's modules_to_save).
#pragma once
#include <string>

#include "io/hf_checkpoint.h"
#include "model/lora.h"

namespace aligner {

// Adds the adapters of the PEFT folder `dir` to `m` (float32, on m's device) and loads a
// classifier's score head when the folder has one; returns their settings. An adapter whose base
// does not match (a target module m lacks, a tensor of another shape, a tensor missing or unknown)
// or that uses what aligner does not run (DoRA, per-module ranks, bias training, regex targets) is
// an error naming the folder and the key or tensor. A tensor-parallel model takes its slices of the
// adapters (model/tensor_parallel.h).
LoraConfig load_peft_adapter(Transformer& m, const std::string& dir);

// load_transformer(dir, ...) with the adapter of the PEFT folder `adapter_dir` on it, unless that
// is "".
Transformer load_adapted_model(const std::string& dir, const std::string& adapter_dir, at::Device device,
                               std::optional<at::ScalarType> dtype);

// Writes m's adapters (and a classifier's score head) as a PEFT folder at `dir`, with save_folder's
// guarantees; base_model goes into adapter_config.json's base_model_name_or_path. A tensor-parallel
// model is gathered whole first (gather_transformer).
void save_peft_adapter(const Transformer& m, const LoraConfig& c, const std::string& dir,
                       const std::string& base_model, const std::string& tokenizer_from, Replace replace);

}  // namespace aligner
