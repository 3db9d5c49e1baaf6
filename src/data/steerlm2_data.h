// SteerLM 2.0 data, one prompt a line, in NeMo-Aligner's layout (its SteerLM2Dataset):
//   {"system": "...",
//    "prompt_turns": [{"from": "User", "value": "..."}, {"from": "Assistant", "value": "..."}, ...,
//                     {"from": "User", "value": "..."}],
//    "label": "helpfulness:4,correctness:3,...",
//    "responses": [{"from": "Assistant", "value": "...", "log(P(a|x,y))": v, "log(P(y|x))": v,
//                   "log(Q(y|a,x))": v}, ...]}
// rendered with the steerlm template: the prompt turns, then the Assistant's turn with the label as
// its attribute line, then each response; the loss covers the response and the end-of-turn that
// NeMo trains on after it ("\n<extra_id_1>"), and nothing before. `aligner steerlm2 prepare` reads
// the same lines without "responses" (or ignores those it finds) and writes them with.
#pragma once
#include <nlohmann/json.hpp>

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "data/common.h"
#include "data/examples.h"
#include "io/jsonl.h"
#include "text/chat_template.h"
#include "text/tokenizer.h"

namespace aligner {

// The fields of one response that hold its log-probabilities (NeMo-Aligner's names).
inline constexpr const char* kLogPAttributes = "log(P(a|x,y))";  // the attribute model's
inline constexpr const char* kLogPResponse = "log(P(y|x))";      // the unconditional model's
inline constexpr const char* kLogQResponse = "log(Q(y|a,x))";    // the SteerLM model's, sampled from

// The prompt part of a line.
struct Steerlm2Prompt {
  Conversation conv;             // system, prompt turns; generation_label is the label as given
  std::vector<float> values;     // the label's values in the attribute order given to the parser
  std::vector<uint8_t> present;  // 1 where the label names the attribute
};

// "system" (optional; NeMo renders an empty one), "prompt_turns" (an odd number, User and
// Assistant alternating from the User) and "label" (name:value items, each name one of
// `attributes`, each value a number). A missing or empty label, an unknown attribute or a value
// that is not a number is an error naming the field and the attribute.
Steerlm2Prompt parse_steerlm2_prompt(const nlohmann::json& record, std::string_view where,
                                     const std::vector<std::string>& attributes);

// The prompt and one response as token ids, the loss mask on the response alone: with the label's
// attribute line (what Q(y|a,x) sees: enc.tmpl is the steerlm template) or without it (P(y|x): the
// nemo template). *prompt_length: the tokens before the response.
Sequence encode_steerlm2_response(const Encoder& enc, const Conversation& prompt, const std::string& response,
                                  bool labelled, std::string_view where, int64_t* prompt_length);

struct Steerlm2Example {
  std::vector<Sequence> responses;  // the prompt with each response
  // Per response: log P(a|x,y) + log P(y|x) - log Q'(y|a,x), whose softmax over the responses is w'.
  std::vector<double> log_w;
  std::vector<double> log_q;  // log Q'(y|a,x)
};

struct Steerlm2Dataset {
  JsonlFile file;
  const Tokenizer* tok = nullptr;  // not owned
  ChatTemplate tmpl;               // steerlm, BOS as the tokenizer's family writes it
  DataOptions opt;
  std::vector<std::string> attributes;
  DataStats stats;
};

Steerlm2Dataset open_steerlm2_dataset(const std::string& path, const Tokenizer& tok, const DataOptions& opt,
                                      std::vector<std::string> attributes);
inline int64_t dataset_size(const Steerlm2Dataset& ds) {
  return ds.file.size();
}
// Line `index`; nullopt when dropped for length or skipped as bad. Fewer than two responses, a
// response missing a field or one whose log-probability is not a finite number are errors naming
// the field ("responses[1].log(P(y|x))").
std::optional<Steerlm2Example> steerlm2_example(Steerlm2Dataset& ds, int64_t index);
// Every line built once before training (check_examples in data/common.h).
void check_dataset(Steerlm2Dataset& ds, int threads);

}  // namespace aligner
