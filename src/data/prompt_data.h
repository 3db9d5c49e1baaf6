// Prompts alone, for generation and online RL. Each record gives one of (first found wins):
//   "input_ids"      token ids, used as they are
//   "messages"       a chat; rendered up to its last user turn, ending with the assistant header
//   "conversations"  NeMo's chat layout, likewise
//   "prompt"         a string (used as is) or a list of messages
//   "text", "input"  a string used as is (NeMo's PPO and SFT layouts)
// max_length bounds the prompt; longer prompts are truncated at the left or dropped.
#pragma once
#include <optional>
#include <string>

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
