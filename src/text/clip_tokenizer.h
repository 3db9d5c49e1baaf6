// CLIPTokenizer's slow files (vocab.json + merges.txt, as Stable Diffusion's tokenizer/ folder holds
// them), with the ids transformers' CLIPTokenizer gives when ftfy is not installed. CLIP's
// tokenizer.json (CLIPTokenizerFast) goes through text/bpe_tokenizer instead.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "text/tokenizer.h"

namespace aligner {

// dir holds vocab.json and merges.txt. As CLIPTokenizer without ftfy, encode(text):
//   1. BERT's BasicTokenizer(strip_accents=False, do_split_on_punc=False) cleanup: characters of
//      category C (but \t \n \r), NUL and U+FFFD dropped; \t \n \r and Zs made spaces; spaces put
//      around CJK ideographs; NFC; split on Python's whitespace, each word lowercased, rejoined with
//      one space; lowercased again;
//   2. split by CLIP's regex <\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|
//      [\p{N}]|[^\s\p{L}\p{N}]+ (the two special texts come out as their own ids);
//   3. each piece byte-level mapped, "</w>" joined to its last symbol, merged by merges.txt's ranks
//      (its first line is dropped and at most 48894 merges are read, as CLIPTokenizer slices it);
//   4. with add_special, <|startoftext|> first and <|endoftext|> last (bos and eos).
// Known differences from Python: str.lower()'s final sigma (a word-final capital sigma becomes
// U+03C2 there, U+03C3 here), and the Unicode version (14.0 here, Python's own there). decode joins
// the tokens' bytes, ends words at "</w>" and strips, without clean_up_tokenization_spaces.
// load_tokenizer(dir) calls this for a folder without tokenizer.json or tokenizer.model.
std::unique_ptr<Tokenizer> load_clip_tokenizer(const std::string& dir);

// The ids Stable Diffusion pipelines feed the text encoder (padding="max_length", truncation=True):
// bos, at most max_length - 2 tokens of the text, eos, then pad ids up to max_length. A tokenizer
// without bos, eos or pad ids, or max_length < 2, is an error.
std::vector<int32_t> encode_padded(const Tokenizer& tokenizer, std::string_view text, int64_t max_length);

}  // namespace aligner
