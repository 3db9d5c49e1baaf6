// Machinery the data readers share: prompts and responses as found in records (text or chat
// messages), their tokenization with the chat template, the length policy, and reading a record so
// that a bad one is either an error naming file:line and field or, when asked, skipped and counted.
#pragma once
#include <nlohmann/json.hpp>

#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/error.h"
#include "data/examples.h"
#include "io/jsonl.h"
#include "text/chat_template.h"
#include "text/tokenizer.h"

namespace aligner {

bool is_blank(std::string_view s);

// A record's list of token ids, each in [0, vocab); an error names where, the field `name` and the
// offending element ("input_ids[3]").
std::vector<int32_t> parse_token_ids(const nlohmann::json& value, std::string_view where,
                                     std::string_view name, int64_t vocab);

// A prompt or response as a record gives it: a string, used as is, or a list of chat messages,
// rendered with the chat template.
struct TextOrChat {
  bool is_chat = false;
  std::string text;
  Conversation chat;
};

// `[{"role","content"}, ...]`; a leading system message becomes the conversation's system prompt.
// nonempty_replies: an assistant message with blank content is an error (an empty response).
Conversation parse_messages(const nlohmann::json& value, std::string_view where, std::string_view name,
                            bool nonempty_replies);
TextOrChat parse_text_or_chat(const nlohmann::json& value, std::string_view where, std::string_view name,
                              bool nonempty_replies);

// NeMo's `{"system", "conversations": [{"from", "value", "label"}], "mask", "type"}`, also with
// ShareGPT's human/gpt and Llama 3 header speakers. `format` is the template in use; it becomes
// steerlm for records of type VALUE_TO_TEXT, whose replies are conditioned on their labels.
Conversation parse_nemo_conversation(const nlohmann::json& record, std::string_view where, ChatFormat& format,
                                     bool nonempty_replies);

struct Encoder {
  const Tokenizer* tok = nullptr;
  ChatTemplate tmpl;
  bool add_eos = true;
};

// Text prompts and responses are tokenized apart, as TRL does, so the prompt's ids are the same
// with any response. With a SentencePiece-style tokenizer a response that does not start with a
// space still gets its first word's word-start marker.
// [BOS where the template uses one] + the text's ids.
std::vector<int32_t> encode_prompt_text(const Encoder& enc, std::string_view text);
// The text's ids [+ EOS when add_eos].
std::vector<int32_t> encode_response_text(const Encoder& enc, std::string_view text);
TokenizedText encode_chat(const Encoder& enc, const Conversation& conv, bool add_generation_prompt);
// Prompt then response, the loss on the response only (its end-of-turn included). A chat prompt
// takes a string response as one assistant reply; a text prompt needs a text response.
Sequence encode_prompt_response(const Encoder& enc, const TextOrChat& prompt, const TextOrChat& response,
                                std::string_view where, std::string_view response_name,
                                int64_t* prompt_length);

// Makes every sequence (sharing their first prompt_length tokens) fit in max_length by the
// policy. Truncation drops prompt tokens after the first (kept when keep_first: BOS) and then
// cuts the sequences' ends; prompt_length follows. Returns kOk, kTruncated or kDropped.
ExampleStatus fit_length(const std::vector<Sequence*>& seqs, int64_t& prompt_length, int64_t max_length,
                         Truncation policy, bool keep_first);

// Index of the first trained-on token (the size when there is none).
int64_t first_loss_index(const Sequence& seq);

// Runs make(status) to build example `index`: nullopt from it means dropped for length. An
// aligner::Error is given the record's "file:line" prefix if it lacks it, and with skip_bad_lines
// is counted and gives nullopt instead of propagating.
template <class T, class F>
std::optional<T> read_guarded(const JsonlFile& file, DataStats& stats, bool skip_bad_lines, int64_t index,
                              const std::string& where, F&& make) {
  try {
    try {
      ExampleStatus status = ExampleStatus::kOk;
      std::optional<T> example = make(status);
      record_status(stats, index, example ? status : ExampleStatus::kDropped);
      return example;
    } catch (const Error& e) {
      std::string_view msg = e.what();
      if (msg.substr(0, file.path().size() + 1) == file.path() + ":") throw;
      throw Error(fmt::format("{}: {}", where, msg));
    }
  } catch (const Error& e) {
    if (!skip_bad_lines) throw;
    if (stats.first_error.empty()) stats.first_error = e.what();
    record_status(stats, index, ExampleStatus::kBad);
    return std::nullopt;
  }
}

// Builds every example of a data set once, on `threads` threads, before training reads any: a bad
// line is found now rather than when a batch first reads it (hours into a run), all bad lines are
// reported together (an aligner::Error with the first 10 and their count, unless skip_bad_lines),
// and what is dropped or truncated is counted in `stats` before the first step. build(index, status)
// makes example `index` as the data set's reader does, sets its status and returns the name of its
// record layout, counted in stats.layouts; or it throws aligner::Error.
void check_examples(const JsonlFile& file, DataStats& stats, int64_t n, bool skip_bad_lines, int threads,
                    const std::function<std::string(int64_t, ExampleStatus&)>& build,
                    const std::function<std::string(int64_t)>& where);

// check_examples over data set `ds` (its file, stats, size and options).
template <class Dataset, class Build, class Where>
void check_dataset_examples(Dataset& ds, int threads, Build&& build, Where&& where) {
  check_examples(ds.file, ds.stats, dataset_size(ds), ds.opt.skip_bad_lines, threads, build, where);
}

}  // namespace aligner
