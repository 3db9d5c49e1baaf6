#include "text/sentencepiece_tokenizer.h"

#include <algorithm>

#include "text/bpe_tokenizer.h"
#include "text/sentencepiece_model.h"

namespace aligner {
namespace {

class SentencePieceTokenizer final : public Tokenizer {
 public:
  SentencePieceTokenizer(SentencePieceModel model, const std::string& path)
      : bpe_(make_bpe_tokenizer(model.tokenizer_json, path)), control_(std::move(model.control_ids)) {
    std::sort(control_.begin(), control_.end());
    auto set = [&](std::optional<int32_t> id, std::optional<int32_t>& slot, std::string& text) {
      if (!id) return;
      slot = id;
      text = bpe_->id_to_token(*id);
    };
    set(model.bos, special_.bos, special_.bos_text);
    set(model.eos, special_.eos, special_.eos_text);
    set(model.unk, special_.unk, special_.unk_text);
  }

  std::vector<int32_t> encode(std::string_view text, bool add_special) const override {
    return bpe_->encode(text, add_special);
  }

  std::string decode(const std::vector<int32_t>& ids, bool /*skip_special*/) const override {
    std::vector<int32_t> kept;
    kept.reserve(ids.size());
    for (int32_t id : ids)
      if (!std::binary_search(control_.begin(), control_.end(), id)) kept.push_back(id);
    return bpe_->decode(kept, false);
  }

  int64_t vocab_size() const override { return bpe_->vocab_size(); }
  std::optional<int32_t> token_to_id(std::string_view token) const override {
    return bpe_->token_to_id(token);
  }
  std::string id_to_token(int32_t id) const override { return bpe_->id_to_token(id); }

 private:
  std::unique_ptr<Tokenizer> bpe_;
  std::vector<int32_t> control_;
};

}  // namespace

std::unique_ptr<Tokenizer> load_sentencepiece_tokenizer(const std::string& model_path) {
  return std::make_unique<SentencePieceTokenizer>(read_sentencepiece_model(model_path), model_path);
}

}  // namespace aligner
