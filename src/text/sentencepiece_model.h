// Reads a SentencePiece tokenizer.model (a protobuf ModelProto) without libsentencepiece, whose
// protobuf-lite cannot share a process with the full libprotobuf that Debian's libtorch loads.
#pragma once
#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace aligner {

struct SentencePieceModel {
  nlohmann::json tokenizer_json;     // see below
  std::vector<int32_t> control_ids;  // <unk>, <s>, </s>, [INST]...: dropped when decoding
  std::optional<int32_t> bos, eos, unk;
};

// The same tokenizer written as a Hugging Face tokenizer.json (BPE model, byte fallback, dummy
// prefix), as transformers' LlamaConverter builds it, except that control pieces (<s>, [INST])
// are not matched in text: SentencePiece never produces them from text, and this is its model.
// Only BPE models are supported; Unigram, a normalization other than identity, or removal of
// extra whitespace is an error naming the file.
SentencePieceModel read_sentencepiece_model(const std::string& model_path);

}  // namespace aligner
