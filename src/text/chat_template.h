// Prompt templates: how a conversation becomes the token ids a chat model was trained on, and
// which of those ids are trained on. Either the tokenizer's own Jinja chat template, run as
// transformers runs it (text/jinja.h), or one of the built-in templates chosen by name, each of
// which knows where the assistant's turns start and end.
//
// A conversation is rendered as segments of text, each marked as trained on or not, and each
// segment is tokenized on its own, so the loss mask needs no character offsets. Segments are cut
// at special tokens, after a header's newline or before a space, where pre-tokenizers split
// anyway, so the ids are those of tokenizing the whole text except in odd cases (a reply that
// starts with a newline).
#pragma once
#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "text/tokenizer.h"

namespace aligner {

enum class ChatFormat {
  kPlain,    // no template: the texts one after the other, EOS after the last reply
  kLlama3,   // Llama 3 Instruct
  kLlama2,   // Llama 2 Chat: [INST] <<SYS>> ... [/INST]
  kChatml,   // <|im_start|> ... <|im_end|> (Qwen)
  kMistral,  // Mistral Instruct v0.3: [INST] ... [/INST]
  kNemo,     // NeMo-Aligner: <extra_id_0>System ... <extra_id_1>User ... <extra_id_1>Assistant ...
  kSteerlm,  // kNemo with the reply's attribute line <extra_id_2>helpfulness:4,...
  kJinja,    // the tokenizer's own chat template (tokenizer_config.json or chat_template.jinja)
};

struct JinjaChatTemplate;  // kJinja: the parsed template and the special tokens it is given

struct ChatTemplate {
  ChatFormat format = ChatFormat::kPlain;
  bool bos = false;  // the rendering starts with the tokenizer's BOS id
  bool eos = false;  // kPlain: the last reply ends with the tokenizer's EOS id
  // kJinja: the tokenizer's template, parsed once and shared by every copy.
  std::shared_ptr<const JinjaChatTemplate> jinja;
};

// "plain", "llama3", "llama2", "chatml", "mistral", "nemo", "steerlm", "jinja"; anything else is an
// error listing these (and "auto" where that is accepted).
ChatFormat parse_chat_format(std::string_view name);
std::string chat_format_name(ChatFormat format);
// The built-in format a tokenizer's chat_template text or special tokens belong to; kPlain for a
// tokenizer with neither (a base model). A chat template that is none of the built-in ones is an
// error.
ChatFormat detect_chat_format(const Tokenizer& tok);
// name: a format name, or "auto": the tokenizer's own chat template when it has one ("jinja"),
// else the built-in format its special tokens belong to. A template the engine cannot parse is an
// error naming its line. BOS follows the family (Llama, Mistral: yes; ChatML, NeMo: no); for jinja
// it is whether the template writes bos_token first; for plain it follows the tokenizer's own
// encode(add_special), as HF would add it.
ChatTemplate resolve_chat_template(std::string_view name, const Tokenizer& tok);

// kJinja: the template run as transformers' apply_chat_template(tokenize=False) runs it, with the
// tokenizer's special tokens (bos_token, eos_token, ...), then `variables` (messages, tools, ...),
// then add_generation_prompt as its variables.
std::string apply_chat_template(const ChatTemplate& tmpl, const nlohmann::ordered_json& variables,
                                bool add_generation_prompt);

struct Message {
  std::string role;  // "user" or "assistant"
  std::string content;
  std::string label;  // steerlm: the reply's attributes, "helpfulness:4,correctness:3,..."
};

struct Conversation {
  std::optional<std::string> system;  // nullopt: no system turn at all (NeMo always renders one)
  std::vector<Message> messages;
  std::string generation_label;  // steerlm: attributes asked of the reply to be generated
};

struct Segment {
  enum Kind { kText, kBos, kEos };
  Kind kind = kText;
  std::string text;
  bool loss = false;  // the model is trained to produce these tokens
};

// add_generation_prompt: end with the header of an assistant turn, for generation. The loss covers
// each assistant reply and the end-of-turn marker that closes it (<|eot_id|>, <|im_end|>, EOS,
// NeMo's next <extra_id_1>). Roles other than user/assistant, and for llama2/mistral turns that
// do not alternate starting with the user, are errors.
//
// jinja: the text is the template's, BOS included where it writes bos_token (so it is not added
// again). Replies are found as TRL and transformers find them: where the template marks them with
// {% generation %} blocks, those; otherwise each reply is what rendering the messages up to it adds
// to rendering the messages before it with the generation prompt, up to its end-of-turn marker
// (whitespace after that is not trained on). A template that renders the earlier messages
// differently once a reply follows them (Mistral v0.3's with a system prompt) is an error for such
// a conversation. A rendering with add_generation_prompt is a prompt: nothing in it is trained on.
std::vector<Segment> render_segments(const ChatTemplate& tmpl, const Conversation& conv,
                                     bool add_generation_prompt);
// The text of the segments, writing BOS and EOS as the given strings.
std::string segments_text(const std::vector<Segment>& segments, std::string_view bos_text,
                          std::string_view eos_text);
// The rendered text as the Hugging Face chat template would give it, BOS/EOS as the tokenizer
// writes them.
std::string render_text(const ChatTemplate& tmpl, const Conversation& conv, bool add_generation_prompt,
                        const Tokenizer& tok);

struct TokenizedText {
  std::vector<int32_t> ids;
  std::vector<uint8_t> loss_mask;  // 1 where the token is trained on
};

TokenizedText tokenize_segments(const std::vector<Segment>& segments, const Tokenizer& tok);
TokenizedText render_tokens(const ChatTemplate& tmpl, const Conversation& conv, bool add_generation_prompt,
                            const Tokenizer& tok);

}  // namespace aligner
