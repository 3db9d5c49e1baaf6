// Tokenizers produce exactly the ids Hugging Face's `tokenizers` produces for the same files.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace aligner {

struct SpecialTokens {
  std::optional<int32_t> bos, eos, pad, unk;
  std::string bos_text, eos_text, pad_text, unk_text;
  std::string chat_template;  // raw Jinja text from tokenizer_config.json, if any
};

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // As HF `tokenizer.encode(text)`: special tokens written in the text are matched (added tokens),
  // and with add_special the post-processor adds its tokens (BOS for Llama, nothing for GPT-2).
  virtual std::vector<int32_t> encode(std::string_view text, bool add_special = true) const = 0;
  // As HF `tokenizer.decode(ids, skip_special_tokens=skip_special)`.
  virtual std::string decode(const std::vector<int32_t>& ids, bool skip_special = false) const = 0;
  virtual int64_t vocab_size() const = 0;  // including added tokens
  virtual std::optional<int32_t> token_to_id(std::string_view token) const = 0;
  virtual std::string id_to_token(int32_t id) const = 0;

  const SpecialTokens& special() const { return special_; }

 protected:
  SpecialTokens special_;

  // Applies tokenizer_config.json on top of the defaults each loader sets.
  friend std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path);
};

// path: a model folder (tokenizer.json preferred, else tokenizer.model), a tokenizer.json, or a
// SentencePiece tokenizer.model. tokenizer_config.json beside it supplies bos/eos/pad and the chat
// template. Unsupported models, normalizers or pre-tokenizers are errors naming the file and what
// is supported.
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path);

// A tokenizer with more tokens than the model's vocabulary gives ids its embedding lacks: an error
// naming `dir`, the folder they came from.
void check_tokenizer_fits(const Tokenizer& tok, int64_t model_vocab, const std::string& dir);

}  // namespace aligner
