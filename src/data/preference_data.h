// Pairwise preference data (DPO and its relatives, pairwise reward models). Record layouts
// (`format`; "auto" decides per record by its fields, except text_pairs, decided by the first):
//   trl         {"prompt", "chosen", "rejected"}; the prompt a string or a list of messages, the
//               answers strings or lists of assistant messages
//   nemo        {"prompt", "chosen_response", "rejected_response"}
//   hh          {"chosen", "rejected"} without a prompt: whole conversations sharing a prefix.
//               Anthropic hh-rlhf text is cut after the last "\n\nAssistant:" they share; message
//               lists after the messages they share.
//   text_pairs  NeMo's reward-model layout: records 2k and 2k+1 are the chosen and the rejected
//               whole `text`; the prompt is the tokens they share
// Optional numbers on any layout but text_pairs: "chosen_reward", "rejected_reward", "margin".
#pragma once
#include <optional>
#include <string>

#include "data/examples.h"
#include "io/jsonl.h"
#include "text/chat_template.h"
#include "text/tokenizer.h"

namespace aligner {

enum class PreferenceFormat { kAuto, kTrl, kNemo, kHh, kTextPairs };

struct PreferenceDataset {
  JsonlFile file;
  PreferenceFormat format = PreferenceFormat::kAuto;  // kTextPairs is decided when opening
  const Tokenizer* tok = nullptr;                     // not owned
  ChatTemplate tmpl;
  DataOptions opt;
  DataStats stats;  // per pair
};

PreferenceDataset open_preference_dataset(const std::string& path, const Tokenizer& tok,
                                          const ChatTemplate& tmpl, const DataOptions& opt);
int64_t dataset_size(const PreferenceDataset& ds);  // pairs
// Pair `index`; nullopt when it was dropped for length or skipped as bad.
std::optional<PreferenceExample> preference_example(PreferenceDataset& ds, int64_t index);
// Every pair built once before training (check_examples in data/common.h).
void check_dataset(PreferenceDataset& ds, int threads);

// hh-rlhf: the shared prompt, up to and including the last "\n\nAssistant:" that both texts share,
// and the two answers after it. A pair sharing no such prefix is an error.
struct HhSplit {
  std::string prompt, chosen, rejected;
};
HhSplit split_hh_pair(const std::string& chosen, const std::string& rejected);

}  // namespace aligner
