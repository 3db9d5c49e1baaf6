// A JSONL file of arbitrary bytes read by every data reader (SFT, preference, prompt, attribute
// and token-sequence data) with a real tokenizer, and the raw JsonlFile access underneath them.
#include "core/error.h"
#include "data/attribute_data.h"
#include "data/preference_data.h"
#include "data/prompt_data.h"
#include "data/sequence_data.h"
#include "data/sft_data.h"
#include "fuzz_util.h"
#include "io/jsonl.h"

namespace {

using namespace aligner;

struct Setup {
  std::unique_ptr<Tokenizer> tok;
  std::vector<ChatTemplate> templates;
};

const Setup& setup() {
  static const Setup s = [] {
    Setup s;
    s.tok = load_tokenizer(ALIGNER_SOURCE_DIR "/tests/fixtures/tokenizers/llama3-style-bpe6k");
    for (const char* name : {"plain", "llama3", "llama2", "chatml", "mistral", "nemo", "steerlm"})
      s.templates.push_back(resolve_chat_template(name, *s.tok));
    return s;
  }();
  return s;
}

// Each reader on its own: one rejecting the file must not keep the others from reading it.
template <class F>
void guarded(F&& read) {
  try {
    read();
  } catch (const Error&) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const Setup& s = setup();
  const std::string path = fuzz::write_scratch("data.jsonl", data, size);
  // Template and length policy are decided by the input, so each input replays the same way; a
  // short max_length makes truncation and dropping common.
  const ChatTemplate& tmpl = s.templates[size % s.templates.size()];
  DataOptions opt;
  opt.max_length = 48;
  opt.truncation = (size / 7) % 2 ? Truncation::kDrop : Truncation::kTruncateLeft;
  opt.skip_bad_lines = true;

  guarded([&] {
    JsonlFile file(path);
    for (int64_t i = 0; i < file.size(); ++i) {
      file.read_text(i);
      guarded([&] { file.read(i); });
    }
  });
  guarded([&] {
    SftDataset ds = open_sft_dataset(path, *s.tok, tmpl, opt);
    for (int64_t i = 0; i < dataset_size(ds); ++i) sft_example(ds, i);
    data_report(ds.stats, path, opt.max_length);
  });
  guarded([&] {
    PreferenceDataset ds = open_preference_dataset(path, *s.tok, tmpl, opt);
    for (int64_t i = 0; i < dataset_size(ds); ++i) preference_example(ds, i);
  });
  guarded([&] {
    PromptDataset ds = open_prompt_dataset(path, *s.tok, tmpl, opt);
    for (int64_t i = 0; i < dataset_size(ds); ++i) prompt_example(ds, i);
  });
  guarded([&] {
    AttributeDataset ds = open_attribute_dataset(path, *s.tok, tmpl, opt, nemo_attributes());
    for (int64_t i = 0; i < dataset_size(ds); ++i) attribute_example(ds, i);
  });
  guarded([&] {
    read_token_sequences(path, s.tok->vocab_size(),
                         [&](const nlohmann::json& record, const std::string& where) {
                           return s.tok->encode(get_field<std::string>(record, "text", where));
                         });
  });
  return 0;
}
