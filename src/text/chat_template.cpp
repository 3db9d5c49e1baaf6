#include "text/chat_template.h"
#include "text/trim.h"

#include <algorithm>

#include "core/error.h"
#include "text/jinja.h"

namespace aligner {

struct JinjaChatTemplate {
  std::shared_ptr<const jinja::Template> program;
  nlohmann::ordered_json special_tokens;  // bos_token, eos_token, ... as transformers passes them
  std::string instead;  // the end of an error message: which built-in template could be used instead
};

namespace {

constexpr const char* kFormatNames = "plain, llama3, llama2, chatml, mistral, nemo, steerlm, jinja";

bool contains(std::string_view text, std::string_view what) {
  return text.find(what) != std::string_view::npos;
}

struct Builder {
  std::vector<Segment> out;
  void text(std::string t, bool loss = false) {
    if (!t.empty()) out.push_back({Segment::kText, std::move(t), loss});
  }
  void bos() { out.push_back({Segment::kBos, {}, false}); }
  void eos(bool loss) { out.push_back({Segment::kEos, {}, loss}); }
};

void check_roles(const Conversation& conv, bool alternate, ChatFormat format) {
  for (size_t i = 0; i < conv.messages.size(); ++i) {
    const std::string& role = conv.messages[i].role;
    if (role != "user" && role != "assistant") {
      fail(
          "message {}: role \"{}\" is not supported by the {} template (user, assistant; the system "
          "prompt is given on its own)",
          i, role, chat_format_name(format));
    }
    if (alternate && (role == "user") != (i % 2 == 0)) {
      fail("message {}: the {} template needs turns alternating user/assistant/user/..., got \"{}\"", i,
           chat_format_name(format), role);
    }
  }
}

void render_llama3(Builder& b, const Conversation& conv, bool gen) {
  auto header = [](std::string_view role) {
    return fmt::format("<|start_header_id|>{}<|end_header_id|>\n\n", role);
  };
  b.bos();
  if (conv.system) b.text(header("system") + trim(*conv.system) + "<|eot_id|>");
  for (const Message& m : conv.messages) {
    if (m.role == "assistant") {
      b.text(header("assistant"));
      b.text(trim(m.content), true);
      b.text("<|eot_id|>", true);
    } else {
      b.text(header(m.role) + trim(m.content) + "<|eot_id|>");
    }
  }
  if (gen) b.text(header("assistant"));
}

void render_chatml(Builder& b, const Conversation& conv, bool gen) {
  if (conv.system) b.text("<|im_start|>system\n" + *conv.system + "<|im_end|>\n");
  for (const Message& m : conv.messages) {
    if (m.role == "assistant") {
      b.text("<|im_start|>assistant\n");
      b.text(m.content, true);
      b.text("<|im_end|>", true);
      b.text("\n");
    } else {
      b.text("<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n");
    }
  }
  if (gen) b.text("<|im_start|>assistant\n");
}

// As Llama 2 Chat's template: BOS before every [INST], the system prompt inside the first one.
void render_llama2(Builder& b, const Conversation& conv) {
  for (size_t i = 0; i < conv.messages.size(); ++i) {
    const Message& m = conv.messages[i];
    if (m.role == "user") {
      std::string content = m.content;
      if (i == 0 && conv.system) content = "<<SYS>>\n" + *conv.system + "\n<</SYS>>\n\n" + content;
      b.bos();
      b.text("[INST] " + trim(content) + " [/INST]");
    } else {
      b.text(" " + trim(m.content) + " ", true);
      b.eos(true);
    }
  }
}

// As Mistral Instruct v0.3's template, except where that template drops the system prompt: it
// puts it before the last user message only when that message ends the conversation, so a
// training conversation ending with a reply loses it. Here it goes before the last user message
// always (as mistral-common does), which gives the HF text for every generation prompt and keeps
// a prompt's ids a prefix of the ids of the prompt with its reply.
void render_mistral(Builder& b, const Conversation& conv) {
  size_t last_user = conv.messages.size();
  for (size_t i = 0; i < conv.messages.size(); ++i) {
    if (conv.messages[i].role == "user") last_user = i;
  }
  b.bos();
  for (size_t i = 0; i < conv.messages.size(); ++i) {
    const Message& m = conv.messages[i];
    if (m.role == "user") {
      if (i == last_user && conv.system) {
        b.text("[INST] " + *conv.system + "\n\n" + m.content + "[/INST]");
      } else {
        b.text("[INST] " + m.content + "[/INST]");
      }
    } else {
      b.text(" " + trim(m.content), true);
      b.eos(true);
    }
  }
}

// NeMo-Aligner's chat format with its default special tokens (system_turn_start <extra_id_0>,
// turn_start <extra_id_1>, label_start <extra_id_2>, end_of_turn and end_of_name "\n"). As in
// NeMo, the <extra_id_1> that starts the turn after a reply is the reply's end-of-turn signal and
// is trained on; after the last reply one more <extra_id_1> is added for that.
void render_nemo(Builder& b, const Conversation& conv, bool gen, bool labels) {
  b.text("<extra_id_0>System\n" + conv.system.value_or("") + "\n");
  bool after_reply = false;  // the previous reply already wrote this turn's <extra_id_1>
  for (const Message& m : conv.messages) {
    const std::string start = after_reply ? "" : "<extra_id_1>";
    if (m.role == "assistant") {
      b.text(start + "Assistant\n");
      if (labels && !m.label.empty()) b.text("<extra_id_2>" + m.label + "\n");
      b.text(m.content + "\n", true);
      b.text("<extra_id_1>", true);
      after_reply = true;
    } else {
      b.text(start + "User\n" + m.content + "\n");
      after_reply = false;
    }
  }
  if (gen) {
    b.text(std::string(after_reply ? "" : "<extra_id_1>") + "Assistant\n");
    if (labels && !conv.generation_label.empty()) b.text("<extra_id_2>" + conv.generation_label + "\n");
  }
}

// Which built-in family a Jinja chat template writes, by the markers only that family uses.
std::optional<ChatFormat> template_family(std::string_view t) {
  if (contains(t, "<|start_header_id|>")) return ChatFormat::kLlama3;
  if (contains(t, "<|im_start|>")) return ChatFormat::kChatml;
  if (contains(t, "<<SYS>>")) return ChatFormat::kLlama2;
  if (contains(t, "[INST]")) return ChatFormat::kMistral;
  if (contains(t, "<extra_id_1>")) return ChatFormat::kNemo;
  return std::nullopt;
}

jinja::Rendered run_jinja(const JinjaChatTemplate& j, nlohmann::ordered_json variables,
                          bool add_generation_prompt) {
  nlohmann::ordered_json all = j.special_tokens;
  for (auto& [k, v] : variables.items()) all[k] = std::move(v);
  all["add_generation_prompt"] = add_generation_prompt;
  return jinja::render(*j.program, all);
}

// `messages` as the template sees them: the system prompt first, then the turns.
nlohmann::ordered_json jinja_messages(const Conversation& conv, size_t count) {
  nlohmann::ordered_json messages = nlohmann::ordered_json::array();
  if (conv.system) messages.push_back({{"role", "system"}, {"content", *conv.system}});
  for (size_t i = 0; i < count; ++i) {
    messages.push_back({{"role", conv.messages[i].role}, {"content", conv.messages[i].content}});
  }
  return messages;
}

std::string_view rtrim(std::string_view s) {
  size_t e = s.find_last_not_of(" \t\n\r");
  return e == std::string_view::npos ? std::string_view() : s.substr(0, e + 1);
}

size_t common_prefix(std::string_view a, std::string_view b) {
  const size_t n = std::min(a.size(), b.size());
  return static_cast<size_t>(std::mismatch(a.begin(), a.begin() + n, b.begin()).first - a.begin());
}

bool starts_with(std::string_view s, std::string_view prefix) {
  return s.substr(0, prefix.size()) == prefix;
}

void render_jinja(Builder& b, const JinjaChatTemplate& j, const Conversation& conv, bool gen) {
  auto render = [&](size_t count, bool g) {
    return run_jinja(j, {{"messages", jinja_messages(conv, count)}}, g);
  };
  const jinja::Rendered full = render(conv.messages.size(), gen);
  if (gen) {
    b.text(full.text);
    return;
  }
  size_t cursor = 0;
  auto cut = [&](size_t begin, size_t end) {
    b.text(full.text.substr(cursor, begin - cursor));
    b.text(full.text.substr(begin, end - begin), true);
    cursor = end;
  };
  if (jinja::uses_generation(*j.program)) {
    for (const auto& [begin, end] : full.generation) {
      if (begin < cursor) fail("the chat template's {{% generation %}} blocks overlap");
      cut(begin, end);
    }
    b.text(full.text.substr(cursor));
    return;
  }
  const size_t system = conv.system ? 1 : 0;
  for (size_t i = 0; i < conv.messages.size(); ++i) {
    if (conv.messages[i].role != "assistant") continue;
    jinja::Rendered before, head;
    try {
      before = render(i, false);
      head = render(i, true);
    } catch (const Error& e) {
      fail(
          "message {}: the chat template fails on the messages before this reply, so the reply cannot "
          "be found: {}",
          i + system, e.what());
    }
    const jinja::Rendered upto = render(i + 1, false);
    // Whitespace after a turn's end (ChatML's newline) is the next turn's: it is not trained on.
    const std::string_view prefix = rtrim(before.text), turn = rtrim(upto.text);
    if (!starts_with(turn, prefix) || !starts_with(full.text, turn)) {
      fail(
          "message {}: the chat template renders the messages before this reply differently once the "
          "reply follows them, so the reply cannot be found{}",
          i + system, j.instead);
    }
    // The reply starts where the generation prompt ends, or where rendering with it and rendering
    // the reply part ways (a prompt that opens the reply, as DeepSeek-R1's <think>).
    const size_t begin = std::max({prefix.size(), common_prefix(head.text, turn), cursor});
    cut(begin, std::max(begin, turn.size()));
  }
  b.text(full.text.substr(cursor));
}

void render_plain(Builder& b, const ChatTemplate& tmpl, const Conversation& conv) {
  if (tmpl.bos) b.bos();
  if (conv.system) b.text(*conv.system);
  for (const Message& m : conv.messages) b.text(m.content, m.role == "assistant");
  if (tmpl.eos && !conv.messages.empty() && conv.messages.back().role == "assistant") b.eos(true);
}

}  // namespace

ChatFormat parse_chat_format(std::string_view name) {
  if (name == "plain") return ChatFormat::kPlain;
  if (name == "llama3") return ChatFormat::kLlama3;
  if (name == "llama2") return ChatFormat::kLlama2;
  if (name == "chatml") return ChatFormat::kChatml;
  if (name == "mistral") return ChatFormat::kMistral;
  if (name == "nemo") return ChatFormat::kNemo;
  if (name == "steerlm") return ChatFormat::kSteerlm;
  if (name == "jinja") return ChatFormat::kJinja;
  fail("unknown chat template \"{}\": expected one of {}, auto", name, kFormatNames);
}

std::string chat_format_name(ChatFormat format) {
  switch (format) {
    case ChatFormat::kPlain:
      return "plain";
    case ChatFormat::kLlama3:
      return "llama3";
    case ChatFormat::kLlama2:
      return "llama2";
    case ChatFormat::kChatml:
      return "chatml";
    case ChatFormat::kMistral:
      return "mistral";
    case ChatFormat::kNemo:
      return "nemo";
    case ChatFormat::kSteerlm:
      return "steerlm";
    case ChatFormat::kJinja:
      return "jinja";
  }
  return "?";
}

ChatFormat detect_chat_format(const Tokenizer& tok) {
  const std::string& t = tok.special().chat_template;
  if (t.empty()) {
    if (tok.token_to_id("<|eot_id|>") && tok.token_to_id("<|start_header_id|>")) return ChatFormat::kLlama3;
    if (tok.token_to_id("<|im_start|>") && tok.token_to_id("<|im_end|>")) return ChatFormat::kChatml;
    if (tok.token_to_id("<extra_id_1>")) return ChatFormat::kNemo;
    return ChatFormat::kPlain;
  }
  if (std::optional<ChatFormat> family = template_family(t)) return *family;
  fail("the tokenizer's chat template is not one of the built-in ones; set the template to one of {}",
       kFormatNames);
}

namespace {

std::shared_ptr<const JinjaChatTemplate> load_jinja(const Tokenizer& tok) {
  const std::string& source = tok.special().chat_template;
  if (source.empty()) {
    fail(
        "the tokenizer has no chat template (tokenizer_config.json chat_template or "
        "chat_template.jinja); set the template to one of {}",
        kFormatNames);
  }
  auto j = std::make_shared<JinjaChatTemplate>();
  std::optional<ChatFormat> family = template_family(source);
  j->instead = family
                   ? fmt::format("; data.template={} uses the built-in {} template instead",
                                 chat_format_name(*family), chat_format_name(*family))
                   : fmt::format("; data.template can name a built-in template instead ({})", kFormatNames);
  try {
    j->program = jinja::parse(source, "chat template");
  } catch (const Error& e) {
    fail("{}{}", e.what(), j->instead);
  }
  const SpecialTokens& special = tok.special();
  for (const auto& [key, text] : {std::pair<const char*, const std::string*>{"bos_token", &special.bos_text},
                                  {"eos_token", &special.eos_text},
                                  {"unk_token", &special.unk_text},
                                  {"pad_token", &special.pad_text}}) {
    if (!text->empty()) j->special_tokens[key] = *text;
  }
  return j;
}

}  // namespace

ChatTemplate resolve_chat_template(std::string_view name, const Tokenizer& tok) {
  ChatTemplate t;
  if (name == "auto") {
    t.format = tok.special().chat_template.empty() ? detect_chat_format(tok) : ChatFormat::kJinja;
  } else {
    t.format = parse_chat_format(name);
  }
  switch (t.format) {
    case ChatFormat::kLlama3:
    case ChatFormat::kLlama2:
    case ChatFormat::kMistral:
      t.bos = true;
      break;
    case ChatFormat::kPlain: {
      // What the tokenizer's post-processor adds around a text: BOS for Llama, nothing for GPT-2.
      std::vector<int32_t> added = tok.encode("", true);
      const auto& bos = tok.special().bos;
      t.bos = bos && !added.empty() && added.front() == *bos;
      t.eos = tok.special().eos.has_value();
      break;
    }
    case ChatFormat::kJinja: {
      t.jinja = load_jinja(tok);
      // Whether the template writes BOS itself, seen on a one-message prompt: text (not chat)
      // prompts then start with BOS as its chat prompts do. A template that rejects that prompt
      // (one that needs a system message) is taken not to.
      const std::string& bos = tok.special().bos_text;
      try {
        nlohmann::ordered_json probe = {{"messages", {{{"role", "user"}, {"content", "x"}}}}};
        t.bos = !bos.empty() && starts_with(run_jinja(*t.jinja, probe, true).text, bos);
      } catch (const Error&) {
        t.bos = false;
      }
      break;
    }
    default:
      break;
  }
  if (t.bos && !tok.special().bos) {
    fail("the {} template starts with BOS, but the tokenizer has no BOS token", chat_format_name(t.format));
  }
  if ((t.format == ChatFormat::kLlama2 || t.format == ChatFormat::kMistral) && !tok.special().eos) {
    fail("the {} template ends replies with EOS, but the tokenizer has no EOS token",
         chat_format_name(t.format));
  }
  return t;
}

std::string apply_chat_template(const ChatTemplate& tmpl, const nlohmann::ordered_json& variables,
                                bool add_generation_prompt) {
  if (!tmpl.jinja)
    fail("the {} template is built in, not a Jinja chat template", chat_format_name(tmpl.format));
  return run_jinja(*tmpl.jinja, variables, add_generation_prompt).text;
}

std::vector<Segment> render_segments(const ChatTemplate& tmpl, const Conversation& conv,
                                     bool add_generation_prompt) {
  bool alternate = tmpl.format == ChatFormat::kLlama2 || tmpl.format == ChatFormat::kMistral;
  // A Jinja template checks roles and their order itself (raise_exception).
  if (tmpl.format != ChatFormat::kJinja) check_roles(conv, alternate, tmpl.format);
  Builder b;
  switch (tmpl.format) {
    case ChatFormat::kPlain:
      render_plain(b, tmpl, conv);
      break;
    case ChatFormat::kLlama3:
      render_llama3(b, conv, add_generation_prompt);
      break;
    case ChatFormat::kLlama2:
      render_llama2(b, conv);
      break;
    case ChatFormat::kChatml:
      render_chatml(b, conv, add_generation_prompt);
      break;
    case ChatFormat::kMistral:
      render_mistral(b, conv);
      break;
    case ChatFormat::kNemo:
      render_nemo(b, conv, add_generation_prompt, false);
      break;
    case ChatFormat::kSteerlm:
      render_nemo(b, conv, add_generation_prompt, true);
      break;
    case ChatFormat::kJinja:
      render_jinja(b, *tmpl.jinja, conv, add_generation_prompt);
      break;
  }
  return std::move(b.out);
}

std::string segments_text(const std::vector<Segment>& segments, std::string_view bos_text,
                          std::string_view eos_text) {
  std::string out;
  for (const Segment& s : segments) {
    if (s.kind == Segment::kBos) {
      out += bos_text;
    } else if (s.kind == Segment::kEos) {
      out += eos_text;
    } else {
      out += s.text;
    }
  }
  return out;
}

std::string render_text(const ChatTemplate& tmpl, const Conversation& conv, bool add_generation_prompt,
                        const Tokenizer& tok) {
  return segments_text(render_segments(tmpl, conv, add_generation_prompt), tok.special().bos_text,
                       tok.special().eos_text);
}

TokenizedText tokenize_segments(const std::vector<Segment>& segments, const Tokenizer& tok) {
  TokenizedText out;
  auto push = [&](int32_t id, bool loss) {
    out.ids.push_back(id);
    out.loss_mask.push_back(loss ? 1 : 0);
  };
  for (const Segment& s : segments) {
    if (s.kind == Segment::kBos || s.kind == Segment::kEos) {
      const auto& id = s.kind == Segment::kBos ? tok.special().bos : tok.special().eos;
      if (!id)
        fail("the template needs a {} token, but the tokenizer has none",
             s.kind == Segment::kBos ? "BOS" : "EOS");
      push(*id, s.loss);
      continue;
    }
    for (int32_t id : tok.encode(s.text, false)) push(id, s.loss);
  }
  return out;
}

TokenizedText render_tokens(const ChatTemplate& tmpl, const Conversation& conv, bool add_generation_prompt,
                            const Tokenizer& tok) {
  return tokenize_segments(render_segments(tmpl, conv, add_generation_prompt), tok);
}

}  // namespace aligner
