// Prompt templates: how a conversation becomes the token ids a chat model was trained on, and
// which of those ids are trained on. The templates are built in and chosen by name rather than
// interpreted from Jinja, so that each one also knows where the assistant's turns start and end.
//
// A conversation is rendered as segments of text, each marked as trained on or not, and each
// segment is tokenized on its own, so the loss mask needs no character offsets. Segments are cut
// at special tokens, after a header's newline or before a space, where pre-tokenizers split
// anyway, so the ids are those of tokenizing the whole text except in odd cases (a reply that
// starts with a newline).
#pragma once
#include <cstdint>
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
};

struct ChatTemplate {
  ChatFormat format = ChatFormat::kPlain;
  bool bos = false;  // the rendering starts with the tokenizer's BOS id
  bool eos = false;  // kPlain: the last reply ends with the tokenizer's EOS id
};

// "plain", "llama3", "llama2", "chatml", "mistral", "nemo", "steerlm"; anything else is an error
// listing these (and "auto" where that is accepted).
ChatFormat parse_chat_format(std::string_view name);
std::string chat_format_name(ChatFormat format);
// The format a tokenizer's chat_template text or special tokens belong to; kPlain for a tokenizer
// with neither (a base model). A chat template that is none of the built-in ones is an error.
ChatFormat detect_chat_format(const Tokenizer& tok);
// name: a format name, or "auto" to detect it. BOS follows the family (Llama, Mistral: yes; ChatML,
// NeMo: no); for plain it follows the tokenizer's own encode(add_special), as HF would add it.
ChatTemplate resolve_chat_template(std::string_view name, const Tokenizer& tok);

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
