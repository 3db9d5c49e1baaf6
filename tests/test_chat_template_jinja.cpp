// The tokenizer's own chat template as a ChatTemplate (data.template=auto or jinja): its text is
// jinja2's, its loss covers the replies, it matches the built-in templates where those render the
// same text, and `aligner chat-template` prints it.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "test_util.h"
#include "text/chat_template.h"

namespace aligner {
namespace {

namespace fs = std::filesystem;
using test::ByteTokenizer;
using test::loss_text;
using test::prompt_of;
using ojson = nlohmann::ordered_json;

const fs::path kFixtures = fs::path(test::kRoot) / "tests" / "fixtures";

// As Meta-Llama-3-8B-Instruct's tokenizer_config.json writes it.
const char* kLlama3Template =
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}";
// The ChatML template many fine-tunes ship.
const char* kChatmlTemplate =
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% "
    "endif %}";

std::string mistral_template() {
  std::ifstream in(kFixtures / "tokenizers" / "mistral-v0.3" / "tokenizer_config.json");
  return ojson::parse(in)["chat_template"].get<std::string>();
}

ByteTokenizer llama3_tok(std::string chat_template = kLlama3Template) {
  return ByteTokenizer(
      {"<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"},
      "<|begin_of_text|>", "<|eot_id|>", std::move(chat_template));
}
ByteTokenizer chatml_tok(std::string chat_template = kChatmlTemplate) {
  return ByteTokenizer({"<|endoftext|>", "<|im_start|>", "<|im_end|>"}, "", "<|im_end|>",
                       std::move(chat_template));
}
ByteTokenizer mistral_tok(std::string chat_template = mistral_template()) {
  return ByteTokenizer({"<s>", "</s>", "[INST]", "[/INST]"}, "<s>", "</s>", std::move(chat_template));
}

Conversation conversation(std::optional<std::string> system, std::vector<Message> messages) {
  Conversation c;
  c.system = std::move(system);
  c.messages = std::move(messages);
  return c;
}

std::vector<Conversation> conversations(bool with_system) {
  std::vector<Conversation> out = {
      conversation(std::nullopt, {{"user", "Hi there", ""}, {"assistant", "Hello!", ""}}),
      conversation(
          std::nullopt,
          {{"user", "Hi", ""}, {"assistant", "Hello.", ""}, {"user", "2+2?", ""}, {"assistant", "4", ""}}),
      conversation(std::nullopt, {{"user", "Grüße 🙂", ""}, {"assistant", "¡Hola! café", ""}}),
  };
  if (with_system) {
    out.push_back(conversation("You are terse.", {{"user", "Hi", ""}, {"assistant", "Hello.", ""}}));
    out.push_back(conversation(
        "Sys", {{"user", "a", ""}, {"assistant", "b", ""}, {"user", "c", ""}, {"assistant", "d", ""}}));
  }
  return out;
}

TEST(ChatTemplateJinja, AutoUsesTheTokenizersOwnTemplate) {
  ByteTokenizer l3 = llama3_tok();
  ChatTemplate t = resolve_chat_template("auto", l3);
  EXPECT_EQ(t.format, ChatFormat::kJinja);
  EXPECT_EQ(chat_format_name(t.format), "jinja");
  EXPECT_TRUE(t.bos);  // the template writes bos_token
  EXPECT_EQ(resolve_chat_template("jinja", l3).format, ChatFormat::kJinja);
  EXPECT_FALSE(resolve_chat_template("auto", chatml_tok()).bos);
  // The built-in templates stay as named choices, and a tokenizer without a template is detected
  // by its special tokens as before.
  EXPECT_EQ(resolve_chat_template("llama3", l3).format, ChatFormat::kLlama3);
  EXPECT_EQ(resolve_chat_template("auto", llama3_tok("")).format, ChatFormat::kLlama3);
  const std::string error = test::error_of([] { resolve_chat_template("jinja", llama3_tok("")); });
  EXPECT_NE(error.find("has no chat template"), std::string::npos) << error;
}

// Where a built-in template renders what the model's own template renders, running the template
// gives the same ids and the same loss mask.
TEST(ChatTemplateJinja, MatchesTheBuiltInTemplatesWhereTheyAgree) {
  struct Case {
    const char* name;
    ByteTokenizer tok;
    bool with_system;  // Mistral v0.3's template drops a system prompt before a final reply
  };
  for (const Case& c : {Case{"llama3", llama3_tok(), true}, Case{"chatml", chatml_tok(), true},
                        Case{"mistral", mistral_tok(), false}}) {
    const ChatTemplate builtin = resolve_chat_template(c.name, c.tok);
    const ChatTemplate own = resolve_chat_template("auto", c.tok);
    EXPECT_EQ(own.bos, builtin.bos) << c.name;
    for (const Conversation& conv : conversations(c.with_system)) {
      SCOPED_TRACE(std::string(c.name) + ": " + conv.messages.front().content);
      EXPECT_EQ(render_text(own, conv, false, c.tok), render_text(builtin, conv, false, c.tok));
      const TokenizedText a = render_tokens(own, conv, false, c.tok);
      const TokenizedText b = render_tokens(builtin, conv, false, c.tok);
      EXPECT_EQ(a.ids, b.ids);
      EXPECT_EQ(a.loss_mask, b.loss_mask) << loss_text(a, c.tok) << " | " << loss_text(b, c.tok);
      EXPECT_EQ(render_tokens(own, prompt_of(conv), true, c.tok).ids,
                render_tokens(builtin, prompt_of(conv), true, c.tok).ids);
    }
  }
}

TEST(ChatTemplateJinja, LossCoversTheRepliesAndTheirEndOfTurnOnly) {
  ByteTokenizer tok = chatml_tok();
  const ChatTemplate t = resolve_chat_template("auto", tok);
  const Conversation conv = conversations(true).back();
  const TokenizedText full = render_tokens(t, conv, false, tok);
  EXPECT_EQ(loss_text(full, tok), "b<|im_end|>d<|im_end|>");
  // A generation prompt is a prefix of the conversation and trains on nothing.
  const TokenizedText prompt = render_tokens(t, prompt_of(conv), true, tok);
  EXPECT_TRUE(std::equal(prompt.ids.begin(), prompt.ids.end(), full.ids.begin()));
  EXPECT_EQ(std::count(prompt.loss_mask.begin(), prompt.loss_mask.end(), 1), 0);
}

TEST(ChatTemplateJinja, LossOfRealTemplatesCoversTheRepliesNotThePrompts) {
  const Conversation conv = conversation(
      "Sys", {{"user", "Hi", ""}, {"assistant", "Hello.", ""}, {"user", "2+2?", ""}, {"assistant", "4", ""}});
  // Templates whose generation prompt is how they start a reply: exactly the replies and their
  // end-of-turn. The others in the folder are indented for reading, and render the generation prompt
  // with other whitespace than a reply's header, so the header is trained on too.
  const std::map<std::string, std::string> exact = {
      {"chatml.jinja", "Hello.<|im_end|>4<|im_end|>"},
      {"qwen2.5-instruct.jinja", "Hello.<|im_end|>4<|im_end|>"},
      {"zephyr.jinja", "Hello.</s>4</s>"},
      {"phi-3.jinja", "Hello.<|end|>4<|end|>"},
      {"llama-3-instruct.jinja", "Hello.<|eot_id|>4<|eot_id|>"}};
  size_t templates = 0;
  for (const auto& entry : fs::directory_iterator(kFixtures / "chat_templates")) {
    if (entry.path().extension() != ".jinja") continue;
    const std::string name = entry.path().filename().string();
    SCOPED_TRACE(name);
    std::ifstream in(entry.path(), std::ios::binary);
    ByteTokenizer tok({"<s>", "</s>"}, "<s>", "</s>", std::string(std::istreambuf_iterator<char>(in), {}));
    const ChatTemplate t = resolve_chat_template("auto", tok);
    const std::string loss = loss_text(render_tokens(t, conv, false, tok), tok);
    if (exact.count(name)) {
      EXPECT_EQ(loss, exact.at(name));
    }
    EXPECT_NE(loss.find("Hello."), std::string::npos);
    EXPECT_EQ(loss.find("Hi"), std::string::npos) << loss;
    EXPECT_EQ(loss.find("2+2?"), std::string::npos) << loss;
    EXPECT_EQ(loss.find("Sys"), std::string::npos) << loss;
    ++templates;
  }
  EXPECT_EQ(templates, 10u);
}

TEST(ChatTemplateJinja, BosComesFromTheTemplateOnce) {
  ByteTokenizer tok = llama3_tok();
  const TokenizedText t =
      render_tokens(resolve_chat_template("auto", tok), conversations(true)[1], false, tok);
  EXPECT_EQ(t.ids.front(), *tok.special().bos);
  EXPECT_EQ(std::count(t.ids.begin(), t.ids.end(), *tok.special().bos), 1);
}

TEST(ChatTemplateJinja, GenerationBlocksMarkTheLoss) {
  // The reply is trained on, its end-of-turn too, the role header and the newline after it not.
  ByteTokenizer tok = chatml_tok(
      "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}{% if m.role == 'assistant' %}"
      "{% generation %}{{ m.content + '<|im_end|>' }}{% endgeneration %}{% else %}{{ m.content + "
      "'<|im_end|>' }}"
      "{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% "
      "endif %}");
  const ChatTemplate t = resolve_chat_template("auto", tok);
  const TokenizedText full = render_tokens(t, conversations(true).back(), false, tok);
  EXPECT_EQ(loss_text(full, tok), "b<|im_end|>d<|im_end|>");
  EXPECT_EQ(
      render_text(t, conversations(true).back(), false, tok),
      "<|im_start|>system\nSys<|im_end|>\n<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n"
      "<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\nd<|im_end|>\n");
}

TEST(ChatTemplateJinja, TemplateThatMovesEarlierTurnsIsAnErrorForTraining) {
  // Mistral v0.3's template puts the system prompt before the last user message only when the
  // conversation ends with it: the reply's text cannot be cut from the rendering of its prompt.
  ByteTokenizer tok = mistral_tok();
  const ChatTemplate t = resolve_chat_template("auto", tok);
  const Conversation conv = conversations(true).back();
  const std::string error = test::error_of([&] { render_segments(t, conv, false); });
  EXPECT_NE(error.find("message 2: the chat template renders the messages before this reply differently"),
            std::string::npos)
      << error;
  EXPECT_NE(error.find("data.template=mistral"), std::string::npos) << error;
  // As a prompt it renders as transformers renders it.
  EXPECT_EQ(render_text(t, prompt_of(conv), true, tok), "<s>[INST] a[/INST] b</s>[INST] Sys\n\nc[/INST]");
}

TEST(ChatTemplateJinja, TheTemplatesOwnErrorsSurface) {
  ByteTokenizer tok = mistral_tok();
  const ChatTemplate t = resolve_chat_template("auto", tok);
  const std::string error = test::error_of([&] {
    render_segments(t, conversation(std::nullopt, {{"assistant", "a", ""}, {"user", "b", ""}}), false);
  });
  EXPECT_NE(error.find("chat template, line "), std::string::npos) << error;
  EXPECT_NE(error.find("conversation roles must alternate user/assistant"), std::string::npos) << error;
  const std::string syntax = test::error_of([] { resolve_chat_template("auto", llama3_tok("{% if %}")); });
  EXPECT_EQ(
      syntax,
      "chat template, line 1: expected an expression, got end of statement block; data.template can name a "
      "built-in template instead (plain, llama3, llama2, chatml, mistral, nemo, steerlm, jinja)");
}

TEST(ChatTemplateJinja, RealTokenizerGetsTheIdsOfTheWholeText) {
  const auto tok = load_tokenizer((kFixtures / "tokenizers" / "mistral-v0.3").string());
  const ChatTemplate t = resolve_chat_template("auto", *tok);
  ASSERT_EQ(t.format, ChatFormat::kJinja);
  EXPECT_TRUE(t.bos);
  for (const Conversation& conv : conversations(false)) {
    const std::string text = render_text(t, conv, false, *tok);
    const TokenizedText ids = render_tokens(t, conv, false, *tok);
    // As transformers' apply_chat_template(tokenize=True): the text tokenized without adding BOS.
    EXPECT_EQ(ids.ids, tok->encode(text, false)) << text;
    EXPECT_EQ(std::count(ids.ids.begin(), ids.ids.end(), *tok->special().bos), 1);
  }
  EXPECT_EQ(render_text(t, conversations(false)[1], false, *tok),
            "<s>[INST] Hi[/INST] Hello.</s>[INST] 2+2?[/INST] 4</s>");
}

TEST(ChatTemplateJinja, CommandPrintsWhatJinja2Renders) {
  // The Mistral v0.3 rows of expected.jsonl (jinja2's renderings), as command input and output.
  std::vector<ojson> rows;
  std::ifstream in(kFixtures / "chat_templates" / "expected.jsonl");
  std::string line;
  while (std::getline(in, line)) {
    ojson row = ojson::parse(line);
    if (row["template"] == "mistral-v0.3/tokenizer_config.json" && row.contains("text")) rows.push_back(row);
  }
  ASSERT_EQ(rows.size(), 14u);
  const std::string tokenizer = (kFixtures / "tokenizers" / "mistral-v0.3").string();
  for (bool gen : {false, true}) {
    std::string data;
    std::vector<std::string> want;
    for (const ojson& row : rows) {
      if (row["add_generation_prompt"] != gen) continue;
      ojson record = row["variables"];
      for (const char* k : {"add_generation_prompt", "bos_token", "eos_token"}) record.erase(k);
      data += record.dump() + "\n";
      want.push_back(row["text"]);
    }
    const std::string path = test::write_temp(gen ? "chat_gen.jsonl" : "chat.jsonl", data);
    const auto r = test::run_aligner("chat-template --tokenizer " + tokenizer + " --data " + path +
                                     (gen ? " --add-generation-prompt" : ""));
    ASSERT_EQ(r.status, 0) << r.output;
    std::vector<std::string> got;
    std::istringstream out(r.output);
    while (std::getline(out, line)) {
      const ojson j = ojson::parse(line);
      EXPECT_EQ(j["index"], got.size());
      got.push_back(j["text"]);
    }
    EXPECT_EQ(got, want);
  }
  const std::string bad =
      test::write_temp("chat_bad.jsonl", "{\"messages\": [{\"role\": \"assistant\", \"content\": \"a\"}]}\n");
  const auto r = test::run_aligner("chat-template --tokenizer " + tokenizer + " --data " + bad);
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find(bad + ":1: chat template, line "), std::string::npos) << r.output;
  const auto none = test::run_aligner("chat-template --tokenizer " +
                                      (kFixtures / "tokenizers" / "gpt2").string() + " --data " + bad);
  EXPECT_NE(none.status, 0);
  EXPECT_NE(none.output.find("has no chat template"), std::string::npos) << none.output;
}

}  // namespace
}  // namespace aligner
