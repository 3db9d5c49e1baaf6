// Whole sequences to score, one per line of a JSONL file: what `aligner perplexity` and
// `aligner rm-score` read. A line gives its token ids as "input_ids", or fields that the command
// encodes its own way.
#pragma once
#include <nlohmann/json.hpp>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace aligner {

// The ids of a line without "input_ids"; `where` is its "path:line".
using EncodeRecord =
    std::function<std::vector<int32_t>(const nlohmann::json& record, const std::string& where)>;

// Every line's ids in file order. An empty sequence, or an id outside [0, vocab) (the model's
// vocabulary, which a tokenizer may exceed), is an error naming the file, the line and the field.
std::vector<std::vector<int32_t>> read_token_sequences(const std::string& path, int64_t vocab,
                                                       const EncodeRecord& encode);

}  // namespace aligner
