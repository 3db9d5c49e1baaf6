// Hugging Face tokenizer.json files with a BPE model: byte-level (GPT-2, Llama 3) and
// SentencePiece-style (Metaspace, byte fallback; Mistral, Llama 2 conversions).
#pragma once
#include <nlohmann/json_fwd.hpp>

#include <memory>
#include <string>

#include "text/tokenizer.h"

namespace aligner {

// Supported pieces, as HF `tokenizers` 0.23 runs them:
//   normalizer: null, Prepend, Replace, NFC, Lowercase, Sequence of these
//   pre_tokenizer: null, Split, Metaspace, ByteLevel (last), Sequence of these
//   model: BPE (dropout null, no subword prefix; end_of_word_suffix (CLIP's "</w>"), byte_fallback,
//          fuse_unk, ignore_merges as given)
//   post_processor: null, TemplateProcessing, RobertaProcessing, ByteLevel, Sequence of these
//   decoder: null, ByteLevel, Metaspace, Replace, ByteFallback, Fuse, Strip, Sequence of these
//   added_tokens with special, single_word, lstrip, rstrip and normalized.
// Anything else is an error naming the file and this list. Special ids (bos/eos/unk) default to
// the post-processor's template and the model's unk_token; tokenizer_config.json overrides them.
std::unique_ptr<Tokenizer> load_bpe_tokenizer(const std::string& json_path);

// The same from a tokenizer.json already in memory (a converted SentencePiece model, say); origin
// names it in errors.
std::unique_ptr<Tokenizer> make_bpe_tokenizer(const nlohmann::json& tokenizer_json,
                                              const std::string& origin);

}  // namespace aligner
