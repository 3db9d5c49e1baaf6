#include "text/chat_template.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "core/error.h"
#include "test_util.h"

namespace aligner {
namespace {

using test::ByteTokenizer;
using test::loss_text;
using test::prompt_of;

ByteTokenizer llama3_tok() {
  return ByteTokenizer(
      {"<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"},
      "<|begin_of_text|>", "<|eot_id|>");
}
ByteTokenizer llama_tok(std::string chat_template = "") {
  return ByteTokenizer({"<s>", "</s>", "[INST]", "[/INST]"}, "<s>", "</s>", std::move(chat_template));
}
ByteTokenizer chatml_tok() {
  return ByteTokenizer({"<|endoftext|>", "<|im_start|>", "<|im_end|>"}, "", "<|im_end|>");
}
ByteTokenizer nemo_tok() {
  return ByteTokenizer({"<s>", "</s>", "<extra_id_0>", "<extra_id_1>", "<extra_id_2>"}, "<s>", "</s>");
}

Conversation two_turns() {
  Conversation c;
  c.system = "You are terse.";
  c.messages = {{"user", "Hi there", ""},
                {"assistant", "Hello!", "helpfulness:4"},
                {"user", "2+2?", ""},
                {"assistant", "4", "helpfulness:2,verbosity:0"}};
  return c;
}

struct Case {
  ChatFormat format;
  ByteTokenizer tok;
  std::string full, prompt, trained;
};

// full and prompt are what the HF chat templates render for the same messages (checked with
// jinja2 on the Llama 3 Instruct, Llama 2 Chat, Qwen2 and Mistral v0.3 templates), NeMo's are
// what NeMo's _add_speaker_and_signal builds with the default special tokens.
std::vector<Case> cases() {
  return {
      {ChatFormat::kLlama3, llama3_tok(),
       "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
       "<|start_header_id|>user<|end_header_id|>\n\nHi "
       "there<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
       "\n\nHello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
       "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>",
       "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
       "<|start_header_id|>user<|end_header_id|>\n\nHi "
       "there<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
       "\n\nHello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
       "<|start_header_id|>assistant<|end_header_id|>\n\n",
       "Hello!<|eot_id|>4<|eot_id|>"},
      {ChatFormat::kChatml, chatml_tok(),
       "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi "
       "there<|im_end|>\n<|im_start|>assistant\n"
       "Hello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
       "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi "
       "there<|im_end|>\n<|im_start|>assistant\n"
       "Hello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n",
       "Hello!<|im_end|>4<|im_end|>"},
      {ChatFormat::kLlama2, llama_tok(),
       "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi there [/INST] Hello! </s><s>[INST] 2+2? [/INST] 4 "
       "</s>",
       "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi there [/INST] Hello! </s><s>[INST] 2+2? [/INST]",
       " Hello! </s> 4 </s>"},
      // HF's Mistral v0.3 template drops the system prompt when the last message is a reply; the
      // prompt (ending with the user turn) is exactly HF's.
      {ChatFormat::kMistral, llama_tok(),
       "<s>[INST] Hi there[/INST] Hello!</s>[INST] You are terse.\n\n2+2?[/INST] 4</s>",
       "<s>[INST] Hi there[/INST] Hello!</s>[INST] You are terse.\n\n2+2?[/INST]", " Hello!</s> 4</s>"},
      {ChatFormat::kNemo, nemo_tok(),
       "<extra_id_0>System\nYou are terse.\n<extra_id_1>User\nHi there\n<extra_id_1>Assistant\nHello!\n"
       "<extra_id_1>User\n2+2?\n<extra_id_1>Assistant\n4\n<extra_id_1>",
       "<extra_id_0>System\nYou are terse.\n<extra_id_1>User\nHi there\n<extra_id_1>Assistant\nHello!\n"
       "<extra_id_1>User\n2+2?\n<extra_id_1>Assistant\n",
       "Hello!\n<extra_id_1>4\n<extra_id_1>"},
      {ChatFormat::kSteerlm, nemo_tok(),
       "<extra_id_0>System\nYou are terse.\n<extra_id_1>User\nHi there\n<extra_id_1>Assistant\n"
       "<extra_id_2>helpfulness:4\nHello!\n<extra_id_1>User\n2+2?\n<extra_id_1>Assistant\n"
       "<extra_id_2>helpfulness:2,verbosity:0\n4\n<extra_id_1>",
       "<extra_id_0>System\nYou are terse.\n<extra_id_1>User\nHi there\n<extra_id_1>Assistant\n"
       "<extra_id_2>helpfulness:4\nHello!\n<extra_id_1>User\n2+2?\n<extra_id_1>Assistant\n",
       "Hello!\n<extra_id_1>4\n<extra_id_1>"},
      {ChatFormat::kPlain, llama_tok(), "<s>You are terse.Hi thereHello!2+2?4</s>",
       "<s>You are terse.Hi thereHello!2+2?", "Hello!4</s>"},
  };
}

TEST(ChatTemplate, RendersTheTextHuggingFaceAndNemoRender) {
  for (const Case& c : cases()) {
    SCOPED_TRACE(chat_format_name(c.format));
    ChatTemplate t = resolve_chat_template(chat_format_name(c.format), c.tok);
    EXPECT_EQ(render_text(t, two_turns(), false, c.tok), c.full);
    EXPECT_EQ(render_text(t, prompt_of(two_turns()), true, c.tok), c.prompt);
  }
}

TEST(ChatTemplate, LossCoversExactlyTheRepliesAndTheirEndOfTurn) {
  for (const Case& c : cases()) {
    SCOPED_TRACE(chat_format_name(c.format));
    ChatTemplate t = resolve_chat_template(chat_format_name(c.format), c.tok);
    TokenizedText full = render_tokens(t, two_turns(), false, c.tok);
    ASSERT_EQ(full.ids.size(), full.loss_mask.size());
    EXPECT_EQ(c.tok.decode(full.ids, false), c.full);
    EXPECT_EQ(loss_text(full, c.tok), c.trained);
    // The generation prompt is the start of the full conversation, and nothing in it is trained on
    // past the earlier replies.
    TokenizedText prompt = render_tokens(t, prompt_of(two_turns()), true, c.tok);
    ASSERT_LE(prompt.ids.size(), full.ids.size());
    EXPECT_TRUE(std::equal(prompt.ids.begin(), prompt.ids.end(), full.ids.begin()));
  }
}

TEST(ChatTemplate, BosIsOneIdAtTheStartNotText) {
  ByteTokenizer tok = llama3_tok();
  TokenizedText t = render_tokens(resolve_chat_template("llama3", tok), two_turns(), false, tok);
  EXPECT_EQ(t.ids.front(), *tok.special().bos);
  EXPECT_EQ(std::count(t.ids.begin(), t.ids.end(), *tok.special().bos), 1);
  EXPECT_EQ(t.loss_mask.front(), 0);
  // Llama 2 Chat writes BOS before every [INST], as its template does.
  ByteTokenizer l2 = llama_tok();
  TokenizedText u = render_tokens(resolve_chat_template("llama2", l2), two_turns(), false, l2);
  EXPECT_EQ(std::count(u.ids.begin(), u.ids.end(), *l2.special().bos), 2);
}

TEST(ChatTemplate, Llama3TrimsAndChatmlKeepsWhitespace) {
  Conversation c;
  c.messages = {{"user", "  hi \n", ""}, {"assistant", "\n yo  ", ""}};
  ByteTokenizer l3 = llama3_tok();
  EXPECT_EQ(render_text(resolve_chat_template("llama3", l3), c, false, l3),
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nyo<|eot_id|>");
  ByteTokenizer cm = chatml_tok();
  EXPECT_EQ(render_text(resolve_chat_template("chatml", cm), c, false, cm),
            "<|im_start|>user\n  hi \n<|im_end|>\n<|im_start|>assistant\n\n yo  <|im_end|>\n");
}

TEST(ChatTemplate, NemoRendersAnEmptySystemTurnAndSteerlmTheGenerationLabel) {
  Conversation c;
  c.messages = {{"user", "Q", ""}};
  c.generation_label = "quality:4,toxicity:0";
  ByteTokenizer tok = nemo_tok();
  EXPECT_EQ(render_text(resolve_chat_template("nemo", tok), c, true, tok),
            "<extra_id_0>System\n\n<extra_id_1>User\nQ\n<extra_id_1>Assistant\n");
  EXPECT_EQ(
      render_text(resolve_chat_template("steerlm", tok), c, true, tok),
      "<extra_id_0>System\n\n<extra_id_1>User\nQ\n<extra_id_1>Assistant\n<extra_id_2>quality:4,toxicity:0\n");
}

TEST(ChatTemplate, PlainFollowsTheTokenizersOwnSpecialTokens) {
  ByteTokenizer with_bos = llama_tok();
  ChatTemplate t = resolve_chat_template("plain", with_bos);
  EXPECT_TRUE(t.bos);
  EXPECT_TRUE(t.eos);
  ByteTokenizer no_bos = chatml_tok();  // like GPT-2: encode adds nothing
  t = resolve_chat_template("plain", no_bos);
  EXPECT_FALSE(t.bos);
  Conversation c;
  c.messages = {{"user", "a", ""}, {"assistant", "b", ""}};
  EXPECT_EQ(render_text(t, c, false, no_bos), "ab<|im_end|>");
}

TEST(ChatTemplate, DetectsTheFamily) {
  EXPECT_EQ(detect_chat_format(llama3_tok()), ChatFormat::kLlama3);
  EXPECT_EQ(detect_chat_format(chatml_tok()), ChatFormat::kChatml);
  EXPECT_EQ(detect_chat_format(nemo_tok()), ChatFormat::kNemo);
  EXPECT_EQ(detect_chat_format(llama_tok()), ChatFormat::kPlain);
  EXPECT_EQ(
      detect_chat_format(llama_tok("{{ bos_token }}{% for m in messages %}[INST] ... [/INST]{% endfor %}")),
      ChatFormat::kMistral);
  EXPECT_EQ(detect_chat_format(llama_tok("{{ '<<SYS>>\\n' + system_message }}[INST]")), ChatFormat::kLlama2);
  EXPECT_EQ(detect_chat_format(llama_tok("{{ '<|im_start|>' + message['role'] }}")), ChatFormat::kChatml);
  EXPECT_EQ(resolve_chat_template("auto", llama3_tok()).format, ChatFormat::kLlama3);
  EXPECT_THROW(detect_chat_format(llama_tok("{{ '### Human: ' + content }}")), Error);
}

TEST(ChatTemplate, BadNamesAndRolesAreErrors) {
  ByteTokenizer tok = llama_tok();
  try {
    resolve_chat_template("vicuna", tok);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("llama3, llama2, chatml, mistral, nemo, steerlm"),
              std::string::npos);
  }
  Conversation c;
  c.messages = {{"assistant", "a", ""}, {"user", "b", ""}};
  EXPECT_THROW(render_segments(resolve_chat_template("llama2", tok), c, false), Error);
  EXPECT_NO_THROW(render_segments(resolve_chat_template("chatml", tok), c, false));
  c.messages = {{"tool", "a", ""}};
  EXPECT_THROW(render_segments(resolve_chat_template("chatml", tok), c, false), Error);
  // Llama templates need the tokenizer's BOS.
  ByteTokenizer no_bos = chatml_tok();
  EXPECT_THROW(resolve_chat_template("llama3", no_bos), Error);
}

}  // namespace
}  // namespace aligner
