// Supervised fine-tuning data. Record layouts (`format`; "auto" decides per record by its fields):
//   input_output   {"input", "output"} (NeMo) or {"prompt", "completion"} (TRL); the prompt may
//                  be a list of messages; loss on the output only
//   messages       {"messages": [{"role", "content"}, ...]}; loss on the assistant turns
//   conversations  NeMo's {"system", "conversations": [{"from", "value", "label"}], "mask", "type"}
//                  (also ShareGPT's human/gpt); loss on the assistant turns
//   text           {"text"}: language modelling, loss on every token
#pragma once
#include <optional>
#include <string>

#include "data/examples.h"
#include "io/jsonl.h"
#include "text/chat_template.h"
#include "text/tokenizer.h"

namespace aligner {

enum class SftFormat { kAuto, kInputOutput, kMessages, kConversations, kText };

struct SftDataset {
  JsonlFile file;
  SftFormat format = SftFormat::kAuto;
  const Tokenizer* tok = nullptr;  // not owned
  ChatTemplate tmpl;
  DataOptions opt;
  DataStats stats;
};

SftDataset open_sft_dataset(const std::string& path, const Tokenizer& tok, const ChatTemplate& tmpl,
                            const DataOptions& opt);
inline int64_t dataset_size(const SftDataset& ds) {
  return ds.file.size();
}
// Example `index`, tokenized; nullopt when it was dropped for length or skipped as bad.
std::optional<Sequence> sft_example(SftDataset& ds, int64_t index);
// Every example built once before training (check_examples in data/common.h).
void check_dataset(SftDataset& ds, int threads);

}  // namespace aligner
