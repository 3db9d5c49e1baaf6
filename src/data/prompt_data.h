// Prompts alone, for generation and online RL. Each record gives one of (first found wins):
//   "input_ids"      token ids, used as they are
//   "messages"       a chat; rendered up to its last user turn, ending with the assistant header
//   "conversations"  NeMo's chat layout, likewise
//   "prompt"         a string (used as is) or a list of messages
//   "text", "input"  a string used as is (NeMo's PPO and SFT layouts)
// With the steerlm template a chat prompt ends with the attribute line of the reply to generate:
// the record's "label" string, else the data set's generation_label; either is checked against
// attribute_names (data/attribute_data.h steerlm_label).
// max_length bounds the prompt; longer prompts are truncated at the left or dropped.
#pragma once
#include <optional>
#include <string>
#include <vector>

#include "data/attribute_data.h"
#include "data/examples.h"
#include "io/jsonl.h"
#include "text/chat_template.h"
#include "text/tokenizer.h"

namespace aligner {

struct PromptDataset {
  JsonlFile file;
  const Tokenizer* tok = nullptr;  // not owned
  ChatTemplate tmpl;
  DataOptions opt;
  DataStats stats;
  std::string generation_label;  // steerlm: "helpfulness:4,verbosity:1", "" for none
  std::vector<std::string> attribute_names = nemo_attributes();  // the names labels may use
};

PromptDataset open_prompt_dataset(const std::string& path, const Tokenizer& tok, const ChatTemplate& tmpl,
                                  const DataOptions& opt);
inline int64_t dataset_size(const PromptDataset& ds) {
  return ds.file.size();
}
std::optional<PromptExample> prompt_example(PromptDataset& ds, int64_t index);
// Every prompt built once, bad lines reported together (data/common.h check_examples).
void check_dataset(PromptDataset& ds, int threads);

}  // namespace aligner
