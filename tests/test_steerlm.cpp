// SteerLM, as a user runs it: `aligner steerlm label` writes a regression reward model's rounded
// scores into every reply's label (checked against `aligner rm-score` on the texts NeMo-Aligner's
// labelling script scores), continues a stopped run without duplicating a line, `aligner sft
// data.template=steerlm` trains on the labelled file, and `aligner generate gen.attributes=...`
// asks for a reply with given attributes.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <optional>
#include <set>
#include <sstream>

#include "algo/steerlm_label.h"
#include "data/attribute_data.h"
#include "data/sft_data.h"
#include "run_outputs.h"
#include "test_util.h"

using namespace aligner;
using namespace aligner::test;
namespace fs = std::filesystem;

namespace {

const std::string kTestRm = kRoot + "/examples/data/nemo-aligner/test-rm.jsonl";

// NeMo's SFT lines (user turns labelled null, replies with HelpSteer labels to be replaced), a
// two-reply conversation with a system turn of its own, a ShareGPT one and a chat in "messages".
const std::string kSft =
    R"({"system": "", "mask": "User", "type": "VALUE_TO_TEXT", "conversations": [{"from": "User", "value": "What is the capital of France?", "label": null}, {"from": "Assistant", "value": "Paris is the capital of France.", "label": "helpfulness:4,correctness:4,coherence:4,complexity:1,verbosity:1"}]})"
    "\n"
    R"({"system": "Be brief.", "mask": "User", "conversations": [{"from": "User", "value": "Name a prime number."}, {"from": "Assistant", "value": "Seven."}, {"from": "User", "value": "And an even one?"}, {"from": "Assistant", "value": "Two is the only even prime."}]})"
    "\n\n"
    R"({"mask": "human", "conversations": [{"from": "human", "value": "Say hello in Spanish."}, {"from": "gpt", "value": "Hola."}], "source": "sharegpt"})"
    "\n"
    R"({"messages": [{"role": "system", "content": "You answer in one line."}, {"role": "user", "content": "Why is the sky blue?"}, {"role": "assistant", "content": "Air scatters blue light more than red."}]})"
    "\n"
    R"({"system": "", "mask": "User", "conversations": [{"from": "User", "value": "Write a haiku about rain."}, {"from": "Assistant", "value": "Soft rain on the roof, the garden drinks it slowly, puddles hold the sky."}]})"
    "\n";

std::string read_file(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

std::string write_file(const fs::path& p, const std::string& text) {
  std::ofstream(p, std::ios::binary) << text;
  return p.string();
}

std::vector<nlohmann::json> read_lines(const fs::path& p) {
  std::ifstream f(p);
  std::vector<nlohmann::json> out;
  for (std::string line; std::getline(f, line);)
    if (!line.empty()) out.push_back(nlohmann::json::parse(line));
  return out;
}

// A regression reward model on NeMo's attribute data, trained once per test binary: it fits the
// eight lines' five HelpSteer attributes, so its scores spread over [0, 4] and differ from reply to
// reply (the other four, never labelled, stay near 0).
const std::string& reward_model() {
  static std::string dir;
  if (dir.empty()) {
    const auto out = temp_dir("steerlm_rm");
    const auto r =
        run_aligner("rm rm.type=regression model.path=" + tiny_model() + " data.train=" + kTestRm +
                    " data.max_length=128 model.device=cpu trainer.max_steps=60 trainer.max_epochs=0"
                    " trainer.micro_batch_size=4 trainer.global_batch_size=4 optim.lr=1e-2"
                    " optim.scheduler=constant output_dir=" +
                    (out / "run").string());
    EXPECT_EQ(r.status, 0) << r.output;
    dir = (out / "run" / "final").string();
  }
  return dir;
}

std::string label_args(const std::string& data, const fs::path& out, const std::string& extra = "") {
  return "steerlm label --model " + reward_model() + " --data " + data + " --out " + out.string() +
         " --device cpu " + extra;
}

// The turns of a conversation line, with the roles the parser gives them: NeMo's layout or
// {"messages"}; the system turn apart.
struct Turns {
  std::optional<std::string> system;
  std::vector<std::pair<bool, std::string>> turns;  // (is the assistant, text)
  std::vector<size_t> reply_positions;              // where the replies are in the line's list
};

Turns turns_of(const nlohmann::json& line) {
  Turns t;
  if (line.contains("messages")) {
    const auto& m = line["messages"];
    for (size_t i = 0; i < m.size(); ++i) {
      if (m[i]["role"] == "system") {
        t.system = m[i]["content"].get<std::string>();
        continue;
      }
      if (m[i]["role"] == "assistant") t.reply_positions.push_back(i);
      t.turns.push_back({m[i]["role"] == "assistant", m[i]["content"]});
    }
    return t;
  }
  if (line.contains("system")) t.system = line["system"].get<std::string>();
  const auto& c = line["conversations"];
  for (size_t i = 0; i < c.size(); ++i) {
    const bool reply = c[i]["from"] != line["mask"];
    if (reply) t.reply_positions.push_back(i);
    t.turns.push_back({reply, c[i]["value"]});
  }
  return t;
}

// The rm-score lines for every reply of `data`, in order: NeMo-Aligner's attribute_annotate.py
// text (its own system prompt, the turns up to the reply, then <extra_id_2>), or the line's own
// chat up to the reply.
std::string scored_lines(const std::vector<nlohmann::json>& data, bool nemo) {
  std::string out;
  for (const auto& line : data) {
    const Turns t = turns_of(line);
    for (size_t k = 0; k < t.turns.size(); ++k) {
      if (!t.turns[k].first) continue;
      if (nemo) {
        std::string text =
            "<extra_id_0>System\nA chat between a curious user and an artificial intelligence assistant. The "
            "assistant gives helpful, detailed, and polite answers to the user's questions.\n";
        for (size_t j = 0; j <= k; ++j)
          text += std::string(t.turns[j].first ? "<extra_id_1>Assistant\n" : "<extra_id_1>User\n") +
                  t.turns[j].second + "\n";
        out += nlohmann::json{{"text", text + "<extra_id_2>"}}.dump() + "\n";
      } else {
        nlohmann::json messages = nlohmann::json::array();
        if (t.system) messages.push_back({{"role", "system"}, {"content", *t.system}});
        for (size_t j = 0; j <= k; ++j)
          messages.push_back(
              {{"role", t.turns[j].first ? "assistant" : "user"}, {"content", t.turns[j].second}});
        out += nlohmann::json{{"messages", messages}}.dump() + "\n";
      }
    }
  }
  return out;
}

// Labelling writes each reply's rm-score, clamped to [0, 4] and rounded, under the model's names
// in its order; everything else in the line stays as it was.
void expect_labels_are_rm_scores(const std::string& format) {
  const auto d = temp_dir("steerlm_label_" + format);
  const auto data = write_file(d / "sft.jsonl", kSft);
  const auto r = run_aligner(label_args(data, d / "out.jsonl", "data.format=" + format));
  ASSERT_EQ(r.status, 0) << r.output;
  const auto input = read_lines(data), output = read_lines(d / "out.jsonl");
  ASSERT_EQ(output.size(), input.size());

  write_file(d / "scored.jsonl", scored_lines(input, format == "nemo"));
  const auto scored = run_aligner("rm-score --device cpu --model " + reward_model() + " --data " +
                                  (d / "scored.jsonl").string());
  ASSERT_EQ(scored.status, 0) << scored.output;
  const auto rows = json_lines(scored.output);
  ASSERT_EQ(rows.size(), 6u) << scored.output;

  const auto& names = nemo_attributes();  // what `aligner rm rm.type=regression` names by default
  size_t row = 0;
  std::set<int> seen;
  std::set<std::string> labels;
  for (size_t i = 0; i < input.size(); ++i) {
    const Turns t = turns_of(input[i]);
    const std::string field = input[i].contains("messages") ? "messages" : "conversations";
    nlohmann::json unlabelled = output[i];
    for (size_t p : t.reply_positions) {
      const std::string label = output[i][field][p]["label"];
      labels.insert(label);
      std::vector<std::string> items;
      std::stringstream s(label);
      for (std::string item; std::getline(s, item, ',');) items.push_back(item);
      ASSERT_EQ(items.size(), names.size()) << label;
      const auto& rewards = rows[row++]["rewards"];
      for (size_t a = 0; a < names.size(); ++a) {
        ASSERT_EQ(items[a].substr(0, names[a].size() + 1), names[a] + ":") << label;
        const std::string value = items[a].substr(names[a].size() + 1);
        ASSERT_TRUE(value.size() == 1 && value[0] >= '0' && value[0] <= '4') << label;
        const double score = rewards[names[a]].get<double>();
        // The two runs batch differently, so a score within a hair of a half may round either way.
        if (std::fabs(std::fabs(score - std::floor(score)) - 0.5) > 1e-4) {
          EXPECT_EQ(value[0] - '0', int(std::nearbyint(std::clamp(score, 0.0, 4.0))))
              << names[a] << " " << score;
        }
        seen.insert(value[0] - '0');
      }
      unlabelled[field][p].erase("label");
    }
    nlohmann::json original = input[i];
    for (size_t p : t.reply_positions) original[field][p].erase("label");
    EXPECT_EQ(unlabelled, original) << i;
  }
  EXPECT_EQ(row, rows.size());
  // Values and replies that differ, or the comparison would prove little.
  EXPECT_GE(seen.size(), 3u);
  EXPECT_GE(labels.size(), 2u);
  fs::remove_all(d);
}

TEST(SteerlmLabel, ScoresAreClampedAndRoundedHalfToEvenAsNemo) {
  const std::vector<std::string> names = {"helpfulness", "verbosity", "humor", "quality", "coherence"};
  EXPECT_EQ(steerlm_label_of_scores(names, {2.5, 3.5, -0.7, 4.6, 1.49}),
            "helpfulness:2,verbosity:4,humor:0,quality:4,coherence:1");
  EXPECT_NE(error_of([&] {
              steerlm_label_of_scores(names, {1, 2, NAN, 3, 4});
            }).find("\"humor\" score is nan"),
            std::string::npos);
}

TEST(SteerlmLabel, AttributeStringsAreCheckedAndWrittenInAttributeOrder) {
  EXPECT_EQ(steerlm_label(" verbosity: 1, helpfulness:4 ", nemo_attributes()), "helpfulness:4,verbosity:1");
  EXPECT_EQ(steerlm_label("complexity:2.5", nemo_attributes()), "complexity:2.5");
  EXPECT_EQ(steerlm_label("", nemo_attributes()), "");
  EXPECT_NE(
      error_of([] { steerlm_label("kindness:4", nemo_attributes()); }).find("unknown attribute \"kindness\""),
      std::string::npos);
  EXPECT_NE(
      error_of([] { steerlm_label("humor:x", nemo_attributes()); }).find("\"humor\": \"x\" is not a number"),
      std::string::npos);
  EXPECT_NE(error_of([] { steerlm_label("humor:nan", nemo_attributes()); }).find("not a number"),
            std::string::npos);
  EXPECT_NE(
      error_of([] { steerlm_label("humor:1,humor:2", nemo_attributes()); }).find("\"humor\" given twice"),
      std::string::npos);
}

TEST(SteerlmLabel, EveryReplyGetsTheRoundedScoresOfNemosText) {
  expect_labels_are_rm_scores("nemo");
}

TEST(SteerlmLabel, ChatFormatScoresTheLinesOwnConversation) {
  expect_labels_are_rm_scores("chat");
}

// A run stopped partway (lines written, the last one in part) goes on where it stopped: the file
// ends as an uninterrupted run writes it. A complete file is left as it is; a file that is not this
// input's labels is refused.
TEST(SteerlmLabel, AStoppedRunContinuesWithoutDuplicatingALine) {
  const auto d = temp_dir("steerlm_resume");
  const auto data = write_file(d / "sft.jsonl", kSft);
  auto r = run_aligner(label_args(data, d / "whole.jsonl", "--batch-size 2"));
  ASSERT_EQ(r.status, 0) << r.output;
  const std::string whole = read_file(d / "whole.jsonl");
  ASSERT_EQ(std::count(whole.begin(), whole.end(), '\n'), 5);

  // Two lines and half of the third.
  size_t cut = whole.find('\n', whole.find('\n') + 1) + 1;
  cut += (whole.find('\n', cut) - cut) / 2;
  write_file(d / "stopped.jsonl", whole.substr(0, cut));
  r = run_aligner(label_args(data, d / "stopped.jsonl", "--batch-size 2"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("dropping a partial last line"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("2 of 5 lines labelled by a previous run"), std::string::npos) << r.output;
  EXPECT_EQ(read_file(d / "stopped.jsonl"), whole);

  r = run_aligner(label_args(data, d / "stopped.jsonl"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("all 5 lines of"), std::string::npos) << r.output;
  EXPECT_EQ(read_file(d / "stopped.jsonl"), whole);

  write_file(d / "longer.jsonl", whole + whole.substr(0, whole.find('\n') + 1));
  r = run_aligner(label_args(data, d / "longer.jsonl"));
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("longer.jsonl:6: more lines than the 5 of"), std::string::npos) << r.output;

  // Another input's labels: the second line is not this input's second line.
  const std::string first = whole.substr(0, whole.find('\n') + 1);
  write_file(d / "other.jsonl", first + first);
  r = run_aligner(label_args(data, d / "other.jsonl"));
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("other.jsonl:2: not the labelled " + data + ":2"), std::string::npos) << r.output;
  EXPECT_EQ(read_file(d / "other.jsonl"), first + first);
  fs::remove_all(d);
}

// The labelled file trains with data.template=steerlm: each reply is conditioned on its label
// (in the input, not trained on) and the loss falls.
TEST(SteerlmLabel, LabelledDataTrainsWithTheSteerlmTemplate) {
  const auto d = temp_dir("steerlm_sft");
  const auto data = write_file(d / "sft.jsonl", kSft);
  auto r = run_aligner(label_args(data, d / "labelled.jsonl"));
  ASSERT_EQ(r.status, 0) << r.output;

  const auto tok = load_tokenizer(tiny_model());
  DataOptions opt;
  opt.max_length = 512;
  SftDataset ds =
      open_sft_dataset((d / "labelled.jsonl").string(), *tok, resolve_chat_template("steerlm", *tok), opt);
  const auto labelled = read_lines(d / "labelled.jsonl");
  for (int64_t i = 0; i < dataset_size(ds); ++i) {
    const auto ex = sft_example(ds, i);
    ASSERT_TRUE(ex);
    const std::string text = tok->decode(ex->input_ids, false);
    const std::string trained = loss_text({ex->input_ids, ex->loss_mask}, *tok);
    const Turns t = turns_of(labelled[size_t(i)]);
    const std::string field = labelled[size_t(i)].contains("messages") ? "messages" : "conversations";
    for (size_t p : t.reply_positions) {
      const std::string label = labelled[size_t(i)][field][p]["label"];
      EXPECT_NE(text.find("Assistant\n<extra_id_2>" + label + "\n"), std::string::npos) << text;
      EXPECT_EQ(trained.find(label), std::string::npos) << trained;
    }
  }

  r = run_aligner(
      "sft model.path=" + tiny_model() + " data.train=" + (d / "labelled.jsonl").string() +
      " data.template=steerlm model.device=cpu trainer.max_steps=4 trainer.max_epochs=0"
      " trainer.micro_batch_size=5 trainer.global_batch_size=5 optim.lr=3e-3 optim.scheduler=constant"
      " output_dir=" +
      (d / "sft").string());
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(fs::exists(d / "sft/final/config.json"));
  const auto train = metrics(d / "sft");
  ASSERT_EQ(train.size(), 4u);
  EXPECT_LT(train.back()["loss"].get<double>(), train.front()["loss"].get<double>());
  fs::remove_all(d);
}

// gen.attributes ends every chat prompt with the reply's attribute line, as NeMo writes it; a
// prompt's own "label" replaces it.
TEST(SteerlmGenerate, AttributesEndThePromptAfterTheAssistantHeader) {
  const auto d = temp_dir("steerlm_generate");
  const auto data = write_file(
      d / "prompts.jsonl",
      R"({"messages": [{"role": "user", "content": "Tell me about tea."}]})"
      "\n"
      R"({"system": "", "mask": "User", "conversations": [{"from": "User", "value": "Hi"}], "label": "verbosity: 0, quality:4"})"
      "\n");
  const std::string args = "generate --model " + tiny_model() + " --data " + data + " --out " +
                           (d / "out.jsonl").string() +
                           " --device cpu gen.greedy=true gen.max_new_tokens=3 data.template=steerlm ";
  auto r = run_aligner(args + "gen.attributes=helpfulness:4,verbosity:1");
  ASSERT_EQ(r.status, 0) << r.output;
  const auto lines = read_lines(d / "out.jsonl");
  ASSERT_EQ(lines.size(), 2u);
  const auto ends_with = [](const std::string& s, const std::string& tail) {
    return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
  };
  const std::string first = lines[0]["prompt"], second = lines[1]["prompt"];
  EXPECT_TRUE(ends_with(first,
                        "<extra_id_1>User\nTell me about tea.\n<extra_id_1>Assistant\n"
                        "<extra_id_2>helpfulness:4,verbosity:1\n"))
      << first;
  EXPECT_TRUE(ends_with(second, "<extra_id_1>Assistant\n<extra_id_2>quality:4,verbosity:0\n")) << second;

  // Without gen.attributes only the line with its own label gets one.
  r = run_aligner(args);
  ASSERT_EQ(r.status, 0) << r.output;
  const auto plain = read_lines(d / "out.jsonl");
  EXPECT_TRUE(ends_with(plain[0]["prompt"].get<std::string>(), "<extra_id_1>Assistant\n")) << plain[0];
  EXPECT_EQ(plain[1]["prompt"], lines[1]["prompt"]);

  // Names of one's own.
  r = run_aligner(args + "gen.attributes=warmth:3 'gen.attribute_names=[warmth, quality, verbosity]'");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(
      ends_with(read_lines(d / "out.jsonl")[0]["prompt"].get<std::string>(), "<extra_id_2>warmth:3\n"));
  fs::remove_all(d);
}

TEST(SteerlmGenerate, BadAttributesAreErrorsNamingThem) {
  const auto d = temp_dir("steerlm_generate_bad");
  const auto chat = write_file(d / "chat.jsonl", R"({"messages": [{"role": "user", "content": "Hi"}]})"
                                                 "\n");
  const std::string args = "generate --model " + tiny_model() + " --out " + (d / "out.jsonl").string() +
                           " --device cpu gen.max_new_tokens=2 ";
  auto r =
      run_aligner(args + "--data " + chat + " data.template=steerlm gen.attributes=helpfulness:4,kindness:2");
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("config key 'gen.attributes': unknown attribute \"kindness\""), std::string::npos)
      << r.output;
  r = run_aligner(args + "--data " + chat + " data.template=steerlm gen.attributes=verbosity:lots");
  EXPECT_NE(r.output.find("config key 'gen.attributes': attribute \"verbosity\": \"lots\" is not a number"),
            std::string::npos)
      << r.output;
  r = run_aligner(args + "--data " + chat + " data.template=llama3 gen.attributes=verbosity:1");
  EXPECT_NE(r.output.find("'gen.attributes' needs data.template=steerlm"), std::string::npos) << r.output;

  const auto own = write_file(
      d / "own.jsonl", R"({"messages": [{"role": "user", "content": "Hi"}]})"
                       "\n"
                       R"({"messages": [{"role": "user", "content": "Hi"}], "label": "humor:4,humor:0"})"
                       "\n");
  r = run_aligner(args + "--data " + own + " data.template=steerlm");
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("own.jsonl:2: field \"label\": attribute \"humor\" given twice"), std::string::npos)
      << r.output;
  const auto text = write_file(d / "text.jsonl", R"({"text": "<extra_id_1>User\nHi\n"})"
                                                 "\n");
  r = run_aligner(args + "--data " + text + " data.template=steerlm gen.attributes=humor:1");
  EXPECT_NE(
      r.output.find("text.jsonl:1: field \"text\": a prompt used as is cannot be given steerlm attributes"),
      std::string::npos)
      << r.output;
  fs::remove_all(d);
}

TEST(SteerlmLabel, BadInputIsAnErrorNamingFileLineAndKey) {
  const auto d = temp_dir("steerlm_bad");
  const std::string good = kSft.substr(0, kSft.find('\n') + 1);
  auto expect_error = [&](const std::string& args, const std::string& message) {
    const auto r = run_aligner(args);
    EXPECT_EQ(r.status, 1) << args;
    EXPECT_NE(r.output.find(message), std::string::npos) << args << "\n" << r.output;
    EXPECT_FALSE(fs::exists(d / "out.jsonl")) << args;
  };
  const auto no_turns = write_file(d / "no_turns.jsonl", good + R"({"input": "Q", "output": "A"})"
                                                                "\n");
  expect_error(label_args(no_turns, d / "out.jsonl"),
               no_turns + ":2: nothing to label: expected NeMo's \"conversations\"");
  const auto no_reply = write_file(
      d / "no_reply.jsonl", good + R"({"mask": "User", "conversations": [{"from": "User", "value": "Q"}]})"
                                   "\n");
  expect_error(label_args(no_reply, d / "out.jsonl"),
               no_reply + ":2: field \"conversations\": no assistant turn to label");
  const auto bad_turn = write_file(
      d / "bad_turn.jsonl", good + R"({"mask": "User", "conversations": [{"from": "User", "text": "Q"}]})"
                                   "\n");
  expect_error(label_args(bad_turn, d / "out.jsonl"),
               bad_turn + ":2: missing field \"conversations[0].value\"");
  const auto data = write_file(d / "sft.jsonl", good);
  expect_error(label_args(data, d / "out.jsonl", "data.format=text"),
               "config key 'data.format' expects nemo or chat, got 'text'");
  expect_error(
      "steerlm label --model " + tiny_model() + " --data " + data + " --out " + (d / "out.jsonl").string(),
      "is not a reward model");
  expect_error(label_args(data, d / "out.jsonl", "'attributes=[helpfulness, verbosity]'"),
               "config key 'attributes': 2 names for the 9 outputs of the reward model");
  expect_error(label_args(data, d / "sft.jsonl"), "is the input file");

  // A reward model whose outputs have no names (config.json without id2label).
  const auto unnamed = d / "unnamed";
  fs::copy(reward_model(), unnamed);
  auto config = nlohmann::json::parse(read_file(unnamed / "config.json"));
  config.erase("id2label");
  config.erase("label2id");
  write_file(unnamed / "config.json", config.dump());
  const std::string unnamed_args = "steerlm label --model " + unnamed.string() + " --data " + data +
                                   " --out " + (d / "out.jsonl").string();
  expect_error(unnamed_args, "outputs have no attribute names");
  const auto named =
      run_aligner(unnamed_args + " 'attributes=[q, t, h, c, help, corr, coh, comp, verb]' model.device=cpu");
  ASSERT_EQ(named.status, 0) << named.output;
  EXPECT_EQ(read_lines(d / "out.jsonl")[0]["conversations"][1]["label"].get<std::string>().substr(0, 2),
            "q:");
  fs::remove_all(d);
}

// The keys under --help: Cli.HelpListsEveryKeyWithItsDefault.
TEST(SteerlmLabel, BareCommandIsAnError) {
  EXPECT_NE(run_aligner("steerlm").status, 0);
}

}  // namespace
