// SentencePiece tokenizer.model files (Llama 2, Mistral), read by text/sentencepiece_model and run
// on the BPE engine of text/bpe_tokenizer.
#pragma once
#include <memory>
#include <string>

#include "text/tokenizer.h"

namespace aligner {

// encode(text, add_special) adds the model's BOS first, as Llama's Hugging Face tokenizer does.
// decode drops control pieces (BOS, EOS) whatever skip_special says, as SentencePiece does.
std::unique_ptr<Tokenizer> load_sentencepiece_tokenizer(const std::string& model_path);

}  // namespace aligner
