// The data readers on the real files in examples/data and on small made-up ones, the sampler, and
// the batches (the packed-equals-padded loss check with the model is in test_packing.cpp).
#include <gtest/gtest.h>

#include <algorithm>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include "core/error.h"
#include "data/attribute_data.h"
#include "data/packing.h"
#include "data/preference_data.h"
#include "data/prompt_data.h"
#include "data/sampler.h"
#include "data/sequence_data.h"
#include "data/sft_data.h"
#include "test_util.h"

namespace aligner {
namespace {

using test::ByteTokenizer;
using test::error_of;
using test::write_temp;

// The special tokens of every layout the tests read, so that one tokenizer reads them all.
ByteTokenizer byte_tok(const std::string& bos, const std::string& eos) {
  return ByteTokenizer({"<s>", "</s>", "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>",
                        "<|end_header_id|>", "<extra_id_0>", "<extra_id_1>", "<extra_id_2>"},
                       bos, eos);
}

const ByteTokenizer& llama_tok() {
  static const ByteTokenizer tok = byte_tok("<s>", "</s>");
  return tok;
}
const ByteTokenizer& llama3_tok() {
  static const ByteTokenizer tok = byte_tok("<|begin_of_text|>", "<|eot_id|>");
  return tok;
}

std::string example_data(const std::string& rel) {
  return std::string(ALIGNER_SOURCE_DIR) + "/examples/data/" + rel;
}

std::vector<nlohmann::json> read_all_json(const std::string& path) {
  std::vector<nlohmann::json> out;
  std::ifstream in(path);
  for (std::string line; std::getline(in, line);) {
    if (!line.empty()) out.push_back(nlohmann::json::parse(line));
  }
  return out;
}

std::string text_of(const std::vector<int32_t>& ids, size_t from = 0, size_t to = SIZE_MAX) {
  to = std::min(to, ids.size());
  return llama_tok().decode(std::vector<int32_t>(ids.begin() + from, ids.begin() + to), false);
}

// The text of the trained-on tokens.
std::string loss_text(const Sequence& s) {
  std::vector<int32_t> ids;
  for (size_t i = 0; i < s.input_ids.size(); ++i) {
    if (s.loss_mask[i]) ids.push_back(s.input_ids[i]);
  }
  return text_of(ids);
}

DataOptions options(std::string format = "auto", bool add_eos = true) {
  DataOptions o;
  o.format = std::move(format);
  o.add_eos = add_eos;
  o.max_length = 1 << 20;
  return o;
}

ChatTemplate tmpl(const std::string& name, const Tokenizer& tok = llama_tok()) {
  return resolve_chat_template(name, tok);
}

std::string trim(const std::string& s) {
  size_t b = s.find_first_not_of(" \t\n\r\v\f");
  if (b == std::string::npos) return {};
  return s.substr(b, s.find_last_not_of(" \t\n\r\v\f") - b + 1);
}

// ---------------------------------------------------------------- NeMo-Aligner's own test files

TEST(NemoFiles, ExtraIdChatSftRendersAsNemoDoes) {
  std::string path = example_data("nemo-aligner/sft_256_sample_extra_id_format.jsonl");
  SftDataset ds = open_sft_dataset(path, llama_tok(), tmpl("nemo"), options("auto", false));
  ASSERT_EQ(dataset_size(ds), 256);
  std::vector<nlohmann::json> records = read_all_json(path);
  for (int64_t i = 0; i < dataset_size(ds); ++i) {
    std::optional<Sequence> s = sft_example(ds, i);
    ASSERT_TRUE(s) << i;
    // NeMo's _add_speaker_and_signal with its default tokens, and the loss on each reply, its
    // newline and the <extra_id_1> after it.
    const nlohmann::json& r = records[static_cast<size_t>(i)];
    std::string expected = "<extra_id_0>System\n" + r["system"].get<std::string>() + "\n";
    std::string trained;
    for (const auto& turn : r["conversations"]) {
      expected +=
          "<extra_id_1>" + turn["from"].get<std::string>() + "\n" + turn["value"].get<std::string>() + "\n";
      if (turn["from"] == "Assistant") trained += turn["value"].get<std::string>() + "\n<extra_id_1>";
    }
    expected += "<extra_id_1>";
    ASSERT_EQ(text_of(s->input_ids), expected) << i;
    ASSERT_EQ(loss_text(*s), trained) << i;
  }
  EXPECT_EQ(ds.stats.bad_lines + ds.stats.dropped + ds.stats.truncated, 0);
}

TEST(NemoFiles, ExtraIdFileAsSteerlmConditionsRepliesOnTheirLabels) {
  std::string path = example_data("nemo-aligner/sft_256_sample_extra_id_format.jsonl");
  SftDataset ds = open_sft_dataset(path, llama_tok(), tmpl("steerlm"), options("conversations", false));
  nlohmann::json r = read_all_json(path)[0];
  std::string label = r["conversations"][1]["label"];
  std::optional<Sequence> s = sft_example(ds, 0);
  ASSERT_TRUE(s);
  std::string text = text_of(s->input_ids);
  EXPECT_NE(text.find("<extra_id_1>Assistant\n<extra_id_2>" + label + "\n"), std::string::npos);
  // The attribute line is given, not learned.
  EXPECT_EQ(loss_text(*s), r["conversations"][1]["value"].get<std::string>() + "\n<extra_id_1>");
}

TEST(NemoFiles, Llama3ChatSftRendersAsLlama3Instruct) {
  std::string path = example_data("nemo-aligner/sft_256_sample_llama3_format.jsonl");
  SftDataset ds = open_sft_dataset(path, llama3_tok(), tmpl("llama3", llama3_tok()), options("auto", false));
  ASSERT_EQ(dataset_size(ds), 256);
  std::vector<nlohmann::json> records = read_all_json(path);
  int multi_turn = 0;
  for (int64_t i = 0; i < dataset_size(ds); ++i) {
    std::optional<Sequence> s = sft_example(ds, i);
    ASSERT_TRUE(s) << i;
    const nlohmann::json& r = records[static_cast<size_t>(i)];
    // NeMo's rendering with its Llama 3 tokens; contents trimmed as the HF template trims them.
    std::string expected = "<|begin_of_text|>" + r["system_token"].get<std::string>() + "\n\n" +
                           trim(r["system"].get<std::string>()) + "<|eot_id|>";
    std::string trained;
    for (const auto& turn : r["conversations"]) {
      std::string from = turn["from"];
      expected += from + "\n\n" + trim(turn["value"].get<std::string>()) + "<|eot_id|>";
      if (from.find("assistant") != std::string::npos)
        trained += trim(turn["value"].get<std::string>()) + "<|eot_id|>";
    }
    ASSERT_EQ(text_of(s->input_ids), expected) << i;
    ASSERT_EQ(loss_text(*s), trained) << i;
    multi_turn += r["conversations"].size() > 2;
  }
  EXPECT_GT(multi_turn, 0);
}

TEST(NemoFiles, DummySft) {
  SftDataset ds = open_sft_dataset(example_data("nemo-aligner/dummy-sft.jsonl"), llama_tok(), tmpl("nemo"),
                                   options("auto", false));
  ASSERT_EQ(dataset_size(ds), 30);
  for (int64_t i = 0; i < 30; ++i) {
    std::optional<Sequence> s = sft_example(ds, i);
    ASSERT_TRUE(s);
    EXPECT_GT(std::count(s->loss_mask.begin(), s->loss_mask.end(), 1), 0);
  }
}

TEST(NemoFiles, DummyDpoIsPromptChosenResponseRejectedResponse) {
  std::string path = example_data("nemo-aligner/dummy-dpo.jsonl");
  PreferenceDataset ds = open_preference_dataset(path, llama_tok(), tmpl("nemo"), options("auto", false));
  ASSERT_EQ(dataset_size(ds), 100);
  std::vector<nlohmann::json> records = read_all_json(path);
  ASSERT_EQ(records.size(), 100u);  // the last line has no newline
  for (int64_t i = 0; i < 100; ++i) {
    std::optional<PreferenceExample> p = preference_example(ds, i);
    ASSERT_TRUE(p);
    const nlohmann::json& r = records[static_cast<size_t>(i)];
    EXPECT_EQ(text_of(p->chosen.input_ids, 0, p->prompt_length), r["prompt"]);
    EXPECT_EQ(text_of(p->rejected.input_ids, 0, p->prompt_length), r["prompt"]);
    EXPECT_EQ(loss_text(p->chosen), r["chosen_response"]);
    EXPECT_EQ(loss_text(p->rejected), r["rejected_response"]);
  }
}

TEST(NemoFiles, TestRmIsNineAttributeRegressionData) {
  std::string path = example_data("nemo-aligner/test-rm.jsonl");
  AttributeDataset ds =
      open_attribute_dataset(path, llama_tok(), tmpl("nemo"), options("auto", false), nemo_attributes());
  ASSERT_EQ(dataset_size(ds), 8);
  std::optional<AttributeExample> e = attribute_example(ds, 0);
  ASSERT_TRUE(e);
  EXPECT_EQ(e->present, (std::vector<uint8_t>{0, 0, 0, 0, 1, 1, 1, 1, 1}));
  EXPECT_EQ(e->values, (std::vector<float>{0, 0, 0, 0, 4, 4, 4, 3, 2}));
  EXPECT_EQ(text_of(e->input_ids), read_all_json(path)[0]["text"]);
  for (int64_t i = 1; i < 8; ++i) EXPECT_TRUE(attribute_example(ds, i));
}

TEST(NemoFiles, TestRmAlsoReadsAsChosenRejectedTextPairs) {
  std::string path = example_data("nemo-aligner/test-rm.jsonl");
  PreferenceDataset ds = open_preference_dataset(path, llama_tok(), tmpl("nemo"), options("auto", false));
  EXPECT_EQ(ds.format, PreferenceFormat::kTextPairs);
  ASSERT_EQ(dataset_size(ds), 4);
  std::vector<nlohmann::json> records = read_all_json(path);
  for (int64_t i = 0; i < 4; ++i) {
    std::optional<PreferenceExample> p = preference_example(ds, i);
    ASSERT_TRUE(p);
    EXPECT_EQ(text_of(p->chosen.input_ids), records[2 * i]["text"]);
    EXPECT_EQ(text_of(p->rejected.input_ids), records[2 * i + 1]["text"]);
    // The prompt is the tokens the two share, so each answer starts where they differ.
    ASSERT_LT(p->prompt_length,
              static_cast<int64_t>(std::min(p->chosen.input_ids.size(), p->rejected.input_ids.size())));
    EXPECT_NE(p->chosen.input_ids[p->prompt_length], p->rejected.input_ids[p->prompt_length]);
    EXPECT_EQ(p->chosen.loss_mask[p->prompt_length], 1);
    EXPECT_EQ(p->chosen.loss_mask[p->prompt_length - 1], 0);
  }
}

TEST(NemoFiles, SyntheticKdIsInputOutput) {
  SftDataset ds = open_sft_dataset(example_data("nemo-aligner/synthetic-kd.jsonl"), llama_tok(),
                                   tmpl("plain"), options());
  ASSERT_EQ(dataset_size(ds), 50);
  for (int64_t i = 0; i < 50; ++i) {
    std::optional<Sequence> s = sft_example(ds, i);
    ASSERT_TRUE(s);
    EXPECT_EQ(text_of(s->input_ids), "<s>1 2 3 4 55 4 3 2 1</s>");
    EXPECT_EQ(loss_text(*s), "5 4 3 2 1</s>");
  }
}

TEST(NemoFiles, Synthetic123IsPromptsAndText) {
  std::string path = example_data("nemo-aligner/synthetic-123.jsonl");
  PromptDataset prompts = open_prompt_dataset(path, llama_tok(), tmpl("plain"), options());
  ASSERT_EQ(dataset_size(prompts), 50);
  std::optional<PromptExample> p = prompt_example(prompts, 2);
  ASSERT_TRUE(p);
  EXPECT_EQ(p->text, "1 2 3");
  EXPECT_EQ(text_of(p->input_ids), "<s>1 2 3");
  EXPECT_EQ(p->record["text"], "1 2 3");
  for (int64_t i = 0; i < 50; ++i) EXPECT_TRUE(prompt_example(prompts, i));

  SftDataset lm = open_sft_dataset(path, llama_tok(), tmpl("plain"), options("text"));
  ASSERT_EQ(dataset_size(lm), 50);
  std::optional<Sequence> s = sft_example(lm, 49);
  ASSERT_TRUE(s);
  EXPECT_EQ(text_of(s->input_ids), "<s>10 11 12 13 14</s>");
  EXPECT_EQ(loss_text(*s), "10 11 12 13 14</s>");  // all but BOS, which nothing predicts
}

TEST(NemoFiles, ChatFilesGiveGenerationPrompts) {
  std::string path = example_data("nemo-aligner/sft_256_sample_llama3_format.jsonl");
  PromptDataset ds = open_prompt_dataset(path, llama3_tok(), tmpl("llama3", llama3_tok()), options());
  std::optional<PromptExample> p = prompt_example(ds, 0);
  ASSERT_TRUE(p);
  EXPECT_EQ(p->text.rfind("<|start_header_id|>assistant<|end_header_id|>\n\n"),
            p->text.size() - std::string("<|start_header_id|>assistant<|end_header_id|>\n\n").size());
  EXPECT_EQ(text_of(p->input_ids), p->text);
  // The last reply is what is to be generated.
  const nlohmann::json& turns = p->record["conversations"];
  EXPECT_EQ(p->text.find(trim(turns.back()["value"].get<std::string>())), std::string::npos);
  EXPECT_NE(p->text.find(trim(turns[turns.size() - 2]["value"].get<std::string>())), std::string::npos);
}

// ---------------------------------------------------------------- other real data

TEST(HhRlhf, SplitsIntoSharedPromptAndAnswers) {
  std::string path = example_data("hh-rlhf/harmless-test-600.jsonl");
  DataOptions opt = options();
  opt.skip_bad_lines = true;
  PreferenceDataset ds = open_preference_dataset(path, llama_tok(), tmpl("plain"), opt);
  ASSERT_EQ(ds.format, PreferenceFormat::kAuto);
  ASSERT_EQ(dataset_size(ds), 600);
  int ok = 0;
  for (int64_t i = 0; i < 600; ++i) {
    std::optional<PreferenceExample> p = preference_example(ds, i);
    if (!p) continue;
    ++ok;
    std::string prompt = text_of(p->chosen.input_ids, 1, p->prompt_length);
    ASSERT_GE(prompt.size(), 12u);
    ASSERT_EQ(prompt.substr(prompt.size() - 12), "\n\nAssistant:") << i;
    ASSERT_EQ(prompt.substr(0, 9), "\n\nHuman: ") << i;
    EXPECT_EQ(text_of(p->rejected.input_ids, 1, p->prompt_length), prompt);
    std::string chosen = loss_text(p->chosen), rejected = loss_text(p->rejected);
    ASSERT_EQ(chosen.substr(chosen.size() - 4), "</s>");
    EXPECT_FALSE(trim(chosen.substr(0, chosen.size() - 4)).empty()) << i;
    EXPECT_FALSE(trim(rejected.substr(0, rejected.size() - 4)).empty()) << i;
  }
  // Pairs 86 and 516 have an empty chosen answer.
  EXPECT_EQ(ok, 598);
  EXPECT_EQ(ds.stats.bad_lines, 2);
  EXPECT_NE(ds.stats.first_error.find(path + ":87: field \"chosen\": empty response"), std::string::npos)
      << ds.stats.first_error;
  EXPECT_NE(data_report(ds.stats, path, opt.max_length).find("2 bad lines skipped"), std::string::npos);

  PreferenceDataset strict = open_preference_dataset(path, llama_tok(), tmpl("plain"), options());
  EXPECT_NE(error_of([&] { preference_example(strict, 516); }).find(path + ":517: field \"chosen\""),
            std::string::npos);
}

TEST(HhRlhf, SplitUsesTheLastAssistantTurnBothShare) {
  HhSplit s = split_hh_pair("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: yes",
                            "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: no");
  EXPECT_EQ(s.prompt, "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:");
  EXPECT_EQ(s.chosen, " yes");
  EXPECT_EQ(s.rejected, " no");
  // Answers that differ from an earlier turn on: the prompt stops at the last shared header.
  s = split_hh_pair("\n\nHuman: a\n\nAssistant: x\n\nHuman: c\n\nAssistant: d",
                    "\n\nHuman: a\n\nAssistant: y");
  EXPECT_EQ(s.prompt, "\n\nHuman: a\n\nAssistant:");
  EXPECT_EQ(s.chosen, " x\n\nHuman: c\n\nAssistant: d");
  EXPECT_THROW(split_hh_pair("\n\nHuman: a", "\n\nHuman: b"), Error);
}

TEST(CodeAlpaca, ConvertedInputOutputReads) {
  std::string path = example_data("code-alpaca/code-alpaca-300.jsonl");
  SftDataset ds = open_sft_dataset(path, llama_tok(), tmpl("plain"), options());
  ASSERT_EQ(dataset_size(ds), 300);
  std::vector<nlohmann::json> records = read_all_json(path);
  for (int64_t i = 0; i < 300; ++i) {
    std::optional<Sequence> s = sft_example(ds, i);
    ASSERT_TRUE(s);
    ASSERT_EQ(loss_text(*s), records[static_cast<size_t>(i)]["output"].get<std::string>() + "</s>");
  }
}

// ---------------------------------------------------------------- formats and errors

TEST(SftData, MessagesWithSystemAndPromptCompletion) {
  std::string path =
      write_temp("messages.jsonl",
                 R"({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},)"
                 R"( {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},)"
                 R"( {"role": "assistant", "content": "A2"}]})"
                 "\n"
                 R"({"prompt": [{"role": "user", "content": "Q"}], "completion": "C"})"
                 "\n");
  SftDataset ds = open_sft_dataset(path, llama3_tok(), tmpl("llama3", llama3_tok()), options());
  std::optional<Sequence> s = sft_example(ds, 0);
  ASSERT_TRUE(s);
  EXPECT_EQ(loss_text(*s), "A1<|eot_id|>A2<|eot_id|>");
  EXPECT_NE(text_of(s->input_ids).find("system<|end_header_id|>\n\nS<|eot_id|>"), std::string::npos);
  s = sft_example(ds, 1);
  ASSERT_TRUE(s);
  EXPECT_EQ(text_of(s->input_ids),
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nC<|eot_id|>");
  EXPECT_EQ(loss_text(*s), "C<|eot_id|>");
}

TEST(SftData, BadLinesNameFileLineAndField) {
  std::string path = write_temp("bad.jsonl",
                                "{\"input\": \"q\", \"output\": \"a\"}\n"   // 1: fine
                                "{\"input\": \"q\", \"output\": \n"         // 2: not JSON
                                "\n"                                        // 3: blank
                                "{\"input\": \"q\"}\n"                      // 4: no output
                                "{\"input\": \"q\", \"output\": 7}\n"       // 5: wrong type
                                "{\"input\": \"q\", \"output\": \"  \"}\n"  // 6: empty response
                                "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}]}\n"  // 7: no reply
                                "{\"messages\": [{\"role\": \"user\", \"content\": 1}]}\n"      // 8
                                "{\"answer\": \"a\"}\n");                                       // 9
  SftDataset ds = open_sft_dataset(path, llama_tok(), tmpl("plain"), options());
  ASSERT_EQ(dataset_size(ds), 8);
  EXPECT_TRUE(sft_example(ds, 0));
  EXPECT_NE(error_of([&] { sft_example(ds, 1); }).find(path + ":2: invalid JSON"), std::string::npos);
  EXPECT_NE(error_of([&] { sft_example(ds, 2); }).find(path + ":4: missing field \"output\""),
            std::string::npos);
  EXPECT_EQ(error_of([&] { sft_example(ds, 3); }),
            path + ":5: field \"output\": expected a string or a list of messages, got integer");
  EXPECT_EQ(error_of([&] { sft_example(ds, 4); }), path + ":6: field \"output\": empty response");
  EXPECT_EQ(error_of([&] { sft_example(ds, 5); }), path + ":7: no assistant turn to train on");
  EXPECT_EQ(error_of([&] { sft_example(ds, 6); }),
            path + ":8: field \"messages[0].content\": expected a string, got integer");
  EXPECT_NE(error_of([&] { sft_example(ds, 7); }).find(path + ":9: not an SFT record"), std::string::npos);

  DataOptions opt = options();
  opt.skip_bad_lines = true;
  SftDataset skip = open_sft_dataset(path, llama_tok(), tmpl("plain"), opt);
  int ok = 0;
  for (int epoch = 0; epoch < 2; ++epoch) {
    for (int64_t i = 0; i < dataset_size(skip); ++i) ok += sft_example(skip, i).has_value();
  }
  EXPECT_EQ(ok, 2);
  EXPECT_EQ(skip.stats.bad_lines, 7);  // each bad line counted once, however often read
  EXPECT_NE(skip.stats.first_error.find(":2: invalid JSON"), std::string::npos);
  std::string report = data_report(skip.stats, path, opt.max_length);
  EXPECT_NE(report.find("warning: " + path + ": 7 bad lines skipped"), std::string::npos) << report;
}

// Every record is built before training, on several threads: all bad lines at once, in file
// order, and the same counts (and layouts) a sequential read gives.
TEST(SftData, CheckFindsEveryBadLineAndCountsWhatIsCut) {
  std::string text;
  for (int i = 0; i < 200; ++i) {
    if (i % 15 == 7)
      text += "{\"input\": \"q\"}\n";  // no output: bad
    else if (i % 40 == 3)
      text += "{\"text\": \"" + std::string(90, 'x') + "\"}\n";  // longer than max_length
    else
      text += "{\"input\": \"q" + std::to_string(i) + "\", \"output\": \"a\"}\n";
  }
  const std::string path = write_temp("check.jsonl", text);
  DataOptions opt = options();
  opt.max_length = 64;
  SftDataset ds = open_sft_dataset(path, llama_tok(), tmpl("plain"), opt);
  const std::string error = error_of([&] { check_dataset(ds, 4); });
  EXPECT_NE(error.find(path + ": 13 bad records, the first 10:\n  " + path + ":8: missing field \"output\""),
            std::string::npos)
      << error;
  EXPECT_NE(error.find(path + ":143: missing field"), std::string::npos) << "the 10th, line 143";
  EXPECT_EQ(error.find(path + ":158:"), std::string::npos) << "only the first 10 are listed";
  EXPECT_NE(error.find("data.skip_bad_lines=true"), std::string::npos);

  opt.skip_bad_lines = true;
  SftDataset checked = open_sft_dataset(path, llama_tok(), tmpl("plain"), opt);
  SftDataset read = open_sft_dataset(path, llama_tok(), tmpl("plain"), opt);
  check_dataset(checked, 4);
  for (int64_t i = 0; i < dataset_size(read); ++i) sft_example(read, i);
  EXPECT_EQ(checked.stats.bad_lines, 13);
  EXPECT_EQ(checked.stats.truncated, read.stats.truncated);
  EXPECT_EQ(checked.stats.truncated, 5);
  EXPECT_EQ(checked.stats.status, read.stats.status);
  EXPECT_EQ(checked.stats.layouts, (std::map<std::string, int64_t>{{"input_output", 182}, {"text", 5}}));
  EXPECT_NE(checked.stats.first_error.find(":8: missing field"), std::string::npos);
}

TEST(SftData, NemoFieldsAreChecked) {
  std::string path = write_temp(
      "nemo_bad.jsonl",
      R"({"system": "", "mask": "Assistant", "conversations": [{"from": "User", "value": "q"}, {"from": "Assistant", "value": "a"}]})"
      "\n"
      R"({"system": "", "conversations": [{"from": "Bot", "value": "q"}]})"
      "\n"
      R"({"system": "", "type": "TEXT_TO_VALUE", "conversations": []})"
      "\n");
  SftDataset ds = open_sft_dataset(path, llama_tok(), tmpl("nemo"), options());
  EXPECT_NE(error_of([&] { sft_example(ds, 0); }).find(path + ":1: field \"mask\""), std::string::npos);
  EXPECT_NE(error_of([&] {
              sft_example(ds, 1);
            }).find(path + ":2: field \"conversations[0].from\": unknown speaker"),
            std::string::npos);
  EXPECT_NE(error_of([&] { sft_example(ds, 2); }).find(path + ":3: field \"type\""), std::string::npos);
}

TEST(SftData, EmptyFileIsAnError) {
  std::string path = write_temp("empty.jsonl", "\n\n");
  EXPECT_NE(
      error_of([&] { open_sft_dataset(path, llama_tok(), tmpl("plain"), options()); }).find("empty file"),
      std::string::npos);
}

TEST(Truncation, LeftDropsPromptStartKeepingBos) {
  std::string path = write_temp("trunc.jsonl",
                                "{\"input\": \"abcdefghij\", \"output\": \"XYZ\"}\n"
                                "{\"input\": \"ab\", \"output\": \"0123456789ABCDEF\"}\n"
                                "{\"input\": \"ab\", \"output\": \"XY\"}\n");
  DataOptions opt = options();
  opt.max_length = 10;
  SftDataset ds = open_sft_dataset(path, llama_tok(), tmpl("plain"), opt);
  std::optional<Sequence> s = sft_example(ds, 0);  // 1 + 10 + 3 + 1 = 15 tokens
  ASSERT_TRUE(s);
  EXPECT_EQ(text_of(s->input_ids), "<s>fghijXYZ</s>");
  EXPECT_EQ(loss_text(*s), "XYZ</s>");
  s = sft_example(ds, 1);  // the response alone does not fit: its end goes
  ASSERT_TRUE(s);
  EXPECT_EQ(text_of(s->input_ids), "<s>012345678");
  EXPECT_EQ(loss_text(*s), "012345678");
  s = sft_example(ds, 2);
  ASSERT_TRUE(s);
  EXPECT_EQ(text_of(s->input_ids), "<s>abXY</s>");
  EXPECT_EQ(ds.stats.truncated, 2);
  EXPECT_EQ(ds.stats.dropped, 0);

  opt.truncation = parse_truncation("drop");
  SftDataset drop = open_sft_dataset(path, llama_tok(), tmpl("plain"), opt);
  EXPECT_FALSE(sft_example(drop, 0));
  EXPECT_FALSE(sft_example(drop, 1));
  EXPECT_FALSE(sft_example(drop, 0));
  EXPECT_TRUE(sft_example(drop, 2));
  EXPECT_EQ(drop.stats.dropped, 2);
  EXPECT_NE(data_report(drop.stats, path, 10).find("2 examples dropped as longer than 10 tokens"),
            std::string::npos);
  EXPECT_THROW(parse_truncation("truncate_right"), Error);
}

TEST(Truncation, PreferencePairsLoseTheSamePromptTokens) {
  std::string path =
      write_temp("pref_trunc.jsonl", R"({"prompt": "abcdefgh", "chosen": "XYZ", "rejected": "W"})"
                                     "\n");
  DataOptions opt = options();
  opt.max_length = 8;
  PreferenceDataset ds = open_preference_dataset(path, llama_tok(), tmpl("plain"), opt);
  std::optional<PreferenceExample> p = preference_example(ds, 0);  // chosen: 1 + 8 + 3 + 1 = 13
  ASSERT_TRUE(p);
  EXPECT_EQ(text_of(p->chosen.input_ids), "<s>fghXYZ</s>");
  EXPECT_EQ(text_of(p->rejected.input_ids), "<s>fghW</s>");
  EXPECT_EQ(p->prompt_length, 4);
  EXPECT_EQ(loss_text(p->rejected), "W</s>");
}

TEST(PreferenceData, ChatPromptsRewardsAndWholeConversations) {
  std::string path = write_temp(
      "pref_chat.jsonl",
      R"({"prompt": [{"role": "user", "content": "Q"}], "chosen": [{"role": "assistant", "content": "good"}], "rejected": "bad", "chosen_reward": 2, "rejected_reward": -1.5, "margin": 3.5})"
      "\n"
      R"({"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "yes"}], "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "no"}]})"
      "\n"
      R"({"prompt": "Q", "chosen": [{"role": "assistant", "content": "good"}], "rejected": "bad"})"
      "\n"
      R"({"prompt": "Q", "chosen": "good", "rejected": "bad", "margin": "big"})"
      "\n");
  const Tokenizer& tok = llama3_tok();
  PreferenceDataset ds = open_preference_dataset(path, tok, tmpl("llama3", tok), options());
  const std::string head =
      "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|><|start_header_id|>assistant<|"
      "end_header_id|>\n\n";
  for (int64_t i : {0, 1}) {
    std::optional<PreferenceExample> p = preference_example(ds, i);
    ASSERT_TRUE(p);
    EXPECT_EQ(text_of(p->chosen.input_ids, 0, p->prompt_length), head);
    EXPECT_EQ(loss_text(p->chosen), i == 0 ? "good<|eot_id|>" : "yes<|eot_id|>");
    EXPECT_EQ(loss_text(p->rejected), i == 0 ? "bad<|eot_id|>" : "no<|eot_id|>");
  }
  std::optional<PreferenceExample> p = preference_example(ds, 0);
  EXPECT_EQ(p->chosen_reward, 2.0);
  EXPECT_EQ(p->rejected_reward, -1.5);
  EXPECT_EQ(p->margin, 3.5);
  EXPECT_EQ(preference_example(ds, 1)->margin, std::nullopt);
  EXPECT_NE(error_of([&] {
              preference_example(ds, 2);
            }).find(":3: field \"chosen\": a text prompt needs a text response"),
            std::string::npos);
  EXPECT_EQ(error_of([&] { preference_example(ds, 3); }),
            path + ":4: field \"margin\": expected a number, got string");
}

TEST(PreferenceData, OddTextPairsFileIsAnError) {
  std::string path =
      write_temp("pairs_odd.jsonl", "{\"text\": \"a\"}\n{\"text\": \"b\"}\n{\"text\": \"c\"}\n");
  EXPECT_NE(error_of([&] {
              open_preference_dataset(path, llama_tok(), tmpl("plain"), options());
            }).find("even number"),
            std::string::npos);
}

TEST(AttributeData, LabelStringsFieldsAndMissingValues) {
  std::string path = write_temp(
      "attr.jsonl",
      R"({"prompt": "Q", "response": "A", "helpfulness": 3, "verbosity": 1.5})"
      "\n"
      R"({"text": "T", "label": "correctness:2, coherence:4"})"
      "\n"
      R"({"system": "", "conversations": [{"from": "User", "value": "Q"}, {"from": "Assistant", "value": "A", "label": "helpfulness:1"}]})"
      "\n"
      R"({"text": "T", "label": "kindness:2"})"
      "\n"
      R"({"text": "T", "label": [1, 2]})"
      "\n"
      R"({"text": "T"})"
      "\n");
  std::vector<std::string> names = {"helpfulness", "correctness", "coherence", "complexity", "verbosity"};
  AttributeDataset ds =
      open_attribute_dataset(path, llama_tok(), tmpl("steerlm"), options("auto", false), names);
  std::optional<AttributeExample> e = attribute_example(ds, 0);
  ASSERT_TRUE(e);
  EXPECT_EQ(e->values, (std::vector<float>{3, 0, 0, 0, 1.5}));
  EXPECT_EQ(e->present, (std::vector<uint8_t>{1, 0, 0, 0, 1}));
  EXPECT_EQ(text_of(e->input_ids), "QA");
  e = attribute_example(ds, 1);
  EXPECT_EQ(e->present, (std::vector<uint8_t>{0, 1, 1, 0, 0}));
  EXPECT_EQ(e->values[2], 4.0f);
  e = attribute_example(ds, 2);
  ASSERT_TRUE(e);
  EXPECT_EQ(e->present, (std::vector<uint8_t>{1, 0, 0, 0, 0}));
  // The scored text is the conversation without the attribute line it is labelled with.
  EXPECT_EQ(text_of(e->input_ids),
            "<extra_id_0>System\n\n<extra_id_1>User\nQ\n<extra_id_1>Assistant\nA\n<extra_id_1>");
  EXPECT_NE(
      error_of([&] { attribute_example(ds, 3); }).find(":4: field \"label\": unknown attribute \"kindness\""),
      std::string::npos);
  EXPECT_NE(
      error_of([&] { attribute_example(ds, 4); }).find(":5: field \"label\": 2 values for 5 attributes"),
      std::string::npos);
  EXPECT_NE(error_of([&] { attribute_example(ds, 5); }).find(":6: no attribute values"), std::string::npos);
}

TEST(PromptData, ChatIdsAndTruncation) {
  std::string path = write_temp(
      "prompts.jsonl",
      R"({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "reference"}], "answer": "42"})"
      "\n"
      R"({"input_ids": [1, 2, 3]})"
      "\n"
      R"({"prompt": "0123456789"})"
      "\n"
      R"({"input_ids": [1, 99999]})"
      "\n");
  const Tokenizer& tok = llama3_tok();
  DataOptions opt = options();
  opt.max_length = 6;
  PromptDataset ds = open_prompt_dataset(path, tok, tmpl("chatml", tok), opt);
  opt.max_length = 1000;
  PromptDataset wide = open_prompt_dataset(path, tok, tmpl("chatml", tok), opt);
  std::optional<PromptExample> p = prompt_example(wide, 0);
  ASSERT_TRUE(p);
  EXPECT_EQ(p->text, "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n");
  EXPECT_EQ(p->record["answer"], "42");
  EXPECT_EQ(prompt_example(ds, 1)->input_ids, (std::vector<int32_t>{1, 2, 3}));
  PromptDataset llama = open_prompt_dataset(path, tok, tmpl("llama3", tok), DataOptions{"auto", 6});
  p = prompt_example(llama, 2);
  ASSERT_TRUE(p);
  EXPECT_EQ(text_of(p->input_ids), "<|begin_of_text|>56789");
  EXPECT_EQ(p->text, "<|begin_of_text|>56789");
  EXPECT_EQ(llama.stats.truncated, 1);
  EXPECT_NE(
      error_of([&] { prompt_example(ds, 3); }).find(":4: field \"input_ids[1]\": token id 99999 is outside"),
      std::string::npos);
}

// What `aligner perplexity` and `aligner rm-score` read: ids as given, or as the command encodes
// the line, and errors that name the file, the line and the field.
TEST(SequenceData, IdsAsGivenOrEncodedAndErrorsNameTheLine) {
  auto encode = [](const nlohmann::json& record, const std::string& where) {
    return llama_tok().encode(get_field<std::string>(record, "text", where), false);
  };
  const std::string path =
      write_temp("sequences.jsonl", "{\"input_ids\": [1, 2, 3]}\n\n{\"text\": \"ab\"}\n");
  EXPECT_EQ(read_token_sequences(path, 300, encode),
            (std::vector<std::vector<int32_t>>{{1, 2, 3}, {'a', 'b'}}));
  const auto error = [&](const std::string& line, int64_t vocab) {
    const std::string bad = write_temp("sequences_bad.jsonl", "{\"input_ids\": [1]}\n" + line + "\n");
    const std::string message = error_of([&] { read_token_sequences(bad, vocab, encode); });
    EXPECT_EQ(message.rfind(bad + ":2: ", 0), 0u) << message;
    return message.substr(bad.size() + 4);
  };
  EXPECT_EQ(error("{\"input_ids\": [1, 300]}", 300),
            "field \"input_ids[1]\": token id 300 is outside the vocabulary [0, 300)");
  EXPECT_EQ(error("{\"input_ids\": [-1]}", 300),
            "field \"input_ids[0]\": token id -1 is outside the vocabulary [0, 300)");
  EXPECT_EQ(error("{\"input_ids\": 7}", 300),
            "field \"input_ids\": expected a list of token ids, got integer");
  EXPECT_EQ(error("{\"input_ids\": []}", 300), "empty sequence");
  EXPECT_EQ(error("{\"text\": \"\"}", 300), "empty sequence");
  EXPECT_EQ(error("{\"text\": \"a<s>\"}", 256),
            "the tokenizer gives token id 256, outside the model's vocabulary [0, 256)");
  EXPECT_EQ(error("{\"other\": 1}", 300).rfind("missing field \"text\"", 0), 0u);
}

// ---------------------------------------------------------------- sampler

TEST(Sampler, SeededReproducibleAndNewOrderEachEpoch) {
  Sampler a = make_sampler(100, 0, 1, true, 7), b = make_sampler(100, 0, 1, true, 7);
  EXPECT_EQ(epoch_order(a, 0), epoch_order(b, 0));
  EXPECT_NE(epoch_order(a, 0), epoch_order(a, 1));
  EXPECT_NE(epoch_order(a, 0), epoch_order(make_sampler(100, 0, 1, true, 8), 0));
  std::vector<int64_t> order = epoch_order(a, 3);
  std::sort(order.begin(), order.end());
  for (int64_t i = 0; i < 100; ++i) EXPECT_EQ(order[static_cast<size_t>(i)], i);
  std::vector<int64_t> plain = epoch_order(make_sampler(5, 0, 1, false, 7), 2);
  EXPECT_EQ(plain, (std::vector<int64_t>{0, 1, 2, 3, 4}));
}

TEST(Sampler, RankShardsAreDisjointAndCover) {
  for (int64_t n : {12, 13}) {
    std::vector<int64_t> seen;
    for (int64_t r = 0; r < 4; ++r) {
      Sampler s = make_sampler(n, r, 4, true, 1);
      EXPECT_EQ(epoch_size(s), 3);
      std::vector<int64_t> mine = epoch_order(s, 5);
      seen.insert(seen.end(), mine.begin(), mine.end());
    }
    std::set<int64_t> unique(seen.begin(), seen.end());
    EXPECT_EQ(unique.size(), seen.size());  // disjoint
    EXPECT_EQ(seen.size(), 12u);
    if (n == 12) {
      EXPECT_EQ(*unique.rbegin(), 11);  // covering
    }
  }
  EXPECT_THROW(make_sampler(3, 0, 4, true, 1), Error);
  EXPECT_THROW(make_sampler(8, 4, 4, true, 1), Error);
}

TEST(Sampler, CrossesEpochsAndResumes) {
  Sampler s = make_sampler(10, 1, 2, true, 3);
  std::vector<int64_t> first;
  for (int i = 0; i < 12; ++i) first.push_back(next_index(s));
  std::vector<int64_t> e0 = epoch_order(s, 0), e1 = epoch_order(s, 1), e2 = epoch_order(s, 2);
  EXPECT_EQ(std::vector<int64_t>(first.begin(), first.begin() + 5), e0);
  EXPECT_EQ(std::vector<int64_t>(first.begin() + 5, first.begin() + 10), e1);
  EXPECT_EQ(first[10], e2[0]);
  EXPECT_EQ(current_epoch(s), 2);
  // A sampler rebuilt from the saved settings and position goes on identically.
  Sampler resumed = make_sampler(10, 1, 2, true, 3);
  resumed.position = 7;
  Sampler replay = make_sampler(10, 1, 2, true, 3);
  for (int i = 0; i < 7; ++i) next_index(replay);
  for (int i = 0; i < 9; ++i) EXPECT_EQ(next_index(resumed), next_index(replay));
}

// ---------------------------------------------------------------- batches

Sequence seq(std::vector<int32_t> ids, std::vector<uint8_t> mask) {
  return {std::move(ids), std::move(mask)};
}

std::vector<int64_t> row(const at::Tensor& t, int64_t r) {
  at::Tensor x = t[r].contiguous();
  return std::vector<int64_t>(x.data_ptr<int64_t>(), x.data_ptr<int64_t>() + x.numel());
}

TEST(Packing, PositionsRestartSegmentsCountAndLabelsStayInside) {
  std::vector<Sequence> seqs = {seq({10, 11, 12, 13}, {0, 0, 1, 1}), seq({20, 21, 22}, {0, 1, 1}),
                                seq({30, 31, 32, 33, 34}, {0, 0, 0, 1, 1}), seq({40, 41}, {0, 1})};
  EXPECT_EQ(plan_packing({4, 3, 5, 2}, 8), (std::vector<std::vector<int64_t>>{{0, 1}, {2, 3}}));
  EXPECT_EQ(plan_packing({5, 4, 3}, 8), (std::vector<std::vector<int64_t>>{{0, 2}, {1}}));  // first fit
  Batch b = pack_sequences(seqs, 8, 0);
  ASSERT_EQ(b.input_ids.sizes(), (at::IntArrayRef{2, 7}));
  EXPECT_EQ(b.input_ids.scalar_type(), at::kLong);
  EXPECT_EQ(row(b.input_ids, 0), (std::vector<int64_t>{10, 11, 12, 13, 20, 21, 22}));
  EXPECT_EQ(row(b.input_ids, 1), (std::vector<int64_t>{30, 31, 32, 33, 34, 40, 41}));
  EXPECT_EQ(row(b.position_ids, 0), (std::vector<int64_t>{0, 1, 2, 3, 0, 1, 2}));
  EXPECT_EQ(row(b.position_ids, 1), (std::vector<int64_t>{0, 1, 2, 3, 4, 0, 1}));
  EXPECT_EQ(row(b.segment_ids, 0), (std::vector<int64_t>{1, 1, 1, 1, 2, 2, 2}));
  EXPECT_EQ(row(b.segment_ids, 1), (std::vector<int64_t>{1, 1, 1, 1, 1, 2, 2}));
  // Each label is the next token of the same example; an example's last token has none, so 20
  // is never the target of 13.
  EXPECT_EQ(row(b.labels, 0), (std::vector<int64_t>{-100, 12, 13, -100, 21, 22, -100}));
  EXPECT_EQ(row(b.labels, 1), (std::vector<int64_t>{-100, -100, 33, 34, -100, 41, -100}));
  EXPECT_EQ(row(b.attention_mask, 0), (std::vector<int64_t>(7, 1)));
}

TEST(Packing, PaddingHasNoLabelsAndNoSegment) {
  std::vector<Sequence> seqs = {seq({1, 2, 3}, {0, 1, 1}), seq({4, 5, 6, 7, 8}, {0, 0, 1, 1, 1})};
  Batch packed = pack_sequences(seqs, 6, 99);
  ASSERT_EQ(packed.input_ids.size(0), 2);
  EXPECT_EQ(row(packed.input_ids, 0), (std::vector<int64_t>{1, 2, 3, 99, 99}));
  EXPECT_EQ(row(packed.segment_ids, 0), (std::vector<int64_t>{1, 1, 1, 0, 0}));
  EXPECT_EQ(row(packed.attention_mask, 0), (std::vector<int64_t>{1, 1, 1, 0, 0}));
  EXPECT_EQ(row(packed.labels, 0), (std::vector<int64_t>{2, 3, -100, -100, -100}));
  EXPECT_THROW(pack_sequences(seqs, 4, 0), Error);

  Batch padded = collate_padded(seqs, 99);
  EXPECT_FALSE(padded.segment_ids.defined());
  EXPECT_EQ(row(padded.input_ids, 0), (std::vector<int64_t>{1, 2, 3, 99, 99}));
  EXPECT_EQ(row(padded.labels, 1), (std::vector<int64_t>{-100, 6, 7, 8, -100}));
  EXPECT_EQ(row(padded.position_ids, 0), (std::vector<int64_t>{0, 1, 2, 0, 0}));
  EXPECT_EQ(row(padded.attention_mask, 0), (std::vector<int64_t>{1, 1, 1, 0, 0}));
  // The same tokens carry the same labels packed or not.
  EXPECT_EQ(packed.labels.ne(-100).sum().item<int64_t>(), padded.labels.ne(-100).sum().item<int64_t>());
}

TEST(Packing, PreferencePromptAndAttributeBatches) {
  PreferenceExample a{seq({1, 2, 3}, {0, 1, 1}), seq({1, 2, 4, 5}, {0, 1, 1, 1}), 1, 1.0, 0.5, std::nullopt};
  PreferenceExample b{seq({7, 8}, {0, 1}), seq({7, 9}, {0, 1}), 1, 2.0, std::nullopt, std::nullopt};
  PreferenceBatch pb = collate_preferences({a, b}, 0);
  ASSERT_EQ(pb.seqs.input_ids.sizes(), (at::IntArrayRef{4, 4}));
  EXPECT_EQ(row(pb.seqs.input_ids, 1), (std::vector<int64_t>{7, 8, 0, 0}));
  EXPECT_EQ(row(pb.seqs.input_ids, 2), (std::vector<int64_t>{1, 2, 4, 5}));
  EXPECT_EQ(row(pb.prompt_lengths.unsqueeze(0), 0), (std::vector<int64_t>{1, 1}));
  ASSERT_TRUE(pb.chosen_rewards.defined());
  EXPECT_FLOAT_EQ(pb.chosen_rewards[1].item<float>(), 2.0f);
  EXPECT_FALSE(pb.rejected_rewards.defined());
  EXPECT_FALSE(pb.margins.defined());

  PromptExample p1, p2;
  p1.input_ids = {5, 6, 7};
  p2.input_ids = {8};
  Batch prompts = collate_prompts({p1, p2}, 0);
  EXPECT_EQ(row(prompts.input_ids, 1), (std::vector<int64_t>{0, 0, 8}));
  EXPECT_EQ(row(prompts.attention_mask, 1), (std::vector<int64_t>{0, 0, 1}));
  EXPECT_EQ(row(prompts.position_ids, 1), (std::vector<int64_t>{0, 0, 0}));
  EXPECT_EQ(row(prompts.position_ids, 0), (std::vector<int64_t>{0, 1, 2}));
  EXPECT_FALSE(prompts.labels.defined());

  AttributeExample e1{{1, 2}, {4, 0}, {1, 0}}, e2{{3}, {1, 2}, {1, 1}};
  AttributeBatch ab = collate_attributes({e1, e2}, 0);
  EXPECT_EQ(ab.values.sizes(), (at::IntArrayRef{2, 2}));
  EXPECT_FLOAT_EQ(ab.values[0][0].item<float>(), 4.0f);
  EXPECT_FLOAT_EQ(ab.present[0][1].item<float>(), 0.0f);
  EXPECT_EQ(row(ab.seqs.attention_mask, 1), (std::vector<int64_t>{1, 0}));
  EXPECT_EQ(pad_id_for(llama_tok()), *llama_tok().special().eos);
}

}  // namespace
}  // namespace aligner
