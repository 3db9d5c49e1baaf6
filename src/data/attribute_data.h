// Attribute-labelled data, for regression reward models and SteerLM attribute models.
// The text scored, first found:
//   "text"                a string used as is (NeMo's regression reward-model layout)
//   "prompt" + "response" HelpSteer; the prompt may be a list of messages
//   "messages"            a chat, rendered whole
//   "conversations"       NeMo's chat layout, rendered whole without its attribute lines
// The values, first found:
//   "label" as a list     numbers in attribute order; -100 or null where missing (NeMo)
//   "label" as a string   "helpfulness:4,correctness:3,..." (NeMo SteerLM)
//   fields named after the attributes (HelpSteer: "helpfulness": 3, ...)
//   the label string of the last reply in "conversations"
// Attributes an example has no value for are masked out (present = 0).
#pragma once
#include <optional>
#include <string>
#include <vector>

#include "data/examples.h"
#include "io/jsonl.h"
#include "text/chat_template.h"
#include "text/tokenizer.h"

namespace aligner {

// NeMo-Aligner's SteerLM attributes, in the order its regression reward models use.
const std::vector<std::string>& nemo_attributes();

struct AttributeDataset {
  JsonlFile file;
  const Tokenizer* tok = nullptr;  // not owned
  ChatTemplate tmpl;
  DataOptions opt;
  std::vector<std::string> attributes;
  DataStats stats;
};

AttributeDataset open_attribute_dataset(const std::string& path, const Tokenizer& tok,
                                        const ChatTemplate& tmpl, const DataOptions& opt,
                                        std::vector<std::string> attributes);
inline int64_t dataset_size(const AttributeDataset& ds) {
  return ds.file.size();
}
std::optional<AttributeExample> attribute_example(AttributeDataset& ds, int64_t index);
// Every example built once before training (check_examples in data/common.h).
void check_dataset(AttributeDataset& ds, int threads);

// "helpfulness:4,correctness:3" into values in `attributes` order. An unknown name, a value that
// is not a number or a name given twice is an error.
void parse_attribute_label(std::string_view label, const std::vector<std::string>& attributes,
                           std::vector<float>& values, std::vector<uint8_t>& present);

// NeMo's attribute string of the present values, in `attributes` order, without spaces:
// "quality:4,toxicity:0,...". Whole numbers are written without decimals.
std::string attribute_label_text(const std::vector<std::string>& attributes, const std::vector<float>& values,
                                 const std::vector<uint8_t>& present);

// A SteerLM attribute string as a prompt writes it (a conversation's generation_label): checked
// as parse_attribute_label checks it, then rewritten by attribute_label_text, so "verbosity: 1,
// helpfulness:4" asks for what training saw, "helpfulness:4,verbosity:1". "" stays "".
std::string steerlm_label(std::string_view label, const std::vector<std::string>& attributes);

}  // namespace aligner
