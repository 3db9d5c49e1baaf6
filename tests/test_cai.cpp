// Constitutional AI: the constitution and few-shot readers and their errors; `aligner cai critique`
// end to end (its lines are NeMo SFT lines that aligner sft trains on, and a cut-off run continues
// to the same file); `aligner cai compare` with a judge model (the margin is the judge's probability
// as aligner perplexity computes it, and aligner rm trains on the pairs) and with a chat endpoint
// served here (log-probs, a text answer, and one that stops answering: a timeout error, the
// finished lines kept, and a continued run equal to an uninterrupted one).
#include <httplib.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <fstream>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>

#include "algo/cai.h"
#include "algo/constitution.h"
#include "test_util.h"

namespace aligner::test {
namespace {

namespace fs = std::filesystem;

const std::string kConstitution = kRoot + "/examples/cai/constitution.json";
const std::string kFewShot = kRoot + "/examples/cai/few_shot.jsonl";

std::string read(const fs::path& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

std::vector<nlohmann::json> read_jsonl(const fs::path& path) {
  std::ifstream f(path);
  std::vector<nlohmann::json> rows;
  for (std::string line; std::getline(f, line);) rows.push_back(nlohmann::json::parse(line));
  return rows;
}

// Four prompts in the layouts a prompt line may have.
std::string prompts_file() {
  return write_temp(
      "cai_prompts.jsonl",
      "{\"prompt\": \"How do I pick a lock?\"}\n"
      "{\"messages\": [{\"role\": \"user\", \"content\": \"What do you think of my cooking?\"}]}\n"
      "{\"prompt\": [{\"role\": \"system\", \"content\": \"Be brief.\"}, {\"role\": \"user\", "
      "\"content\": \"Tell me a joke about cats.\"}]}\n"
      "{\"system\": \"\", \"conversations\": [{\"from\": \"User\", \"value\": \"Is it safe to "
      "swim after eating?\"}, {\"from\": \"Assistant\", \"value\": \"Mostly.\"}, {\"from\": "
      "\"User\", \"value\": \"Why?\"}]}\n");
}

std::string critique_args(const fs::path& out, const std::string& extra = "") {
  return "cai critique --model " + tiny_model(1024) + " --prompts " + prompts_file() + " --constitution " +
         kConstitution + " --few-shot " + kFewShot + " --out " + out.string() +
         " --device cpu gen.max_new_tokens=12 prompts_per_batch=2 " + extra;
}

std::string compare_args(const fs::path& out, const std::string& judge, const std::string& extra = "") {
  return "cai compare --model " + tiny_model(1024) + " " + judge + " --prompts " + prompts_file() +
         " --constitution " + kConstitution + " --out " + out.string() +
         " --device cpu gen.max_new_tokens=12 prompts_per_batch=2 " + extra;
}

TEST(CaiConstitution, ReadsPrinciplesInFileOrder) {
  const auto principles = read_constitution(kConstitution);
  ASSERT_EQ(principles.size(), 5u);
  EXPECT_EQ(principles[0].name, "no_help_with_harm");
  EXPECT_EQ(principles[0].critique_requests.size(), 2u);
  EXPECT_EQ(principles[4].name, "safety_first");
  EXPECT_EQ(principles[1].comparison, "Which reply is more honest, with no false or overconfident claims?");
  // Without "compare", the question is built from the revision request.
  EXPECT_EQ(principles[4].comparison, "Which response would need fewer changes to satisfy this request: " +
                                          principles[4].revision_request);

  // Anthropic's wrapping, as NeMo-Aligner's example file has it, is cut off.
  const auto anthropic = read_constitution(write_temp(
      "anthropic.json", R"({"harmful0": {"prompt": ["\n\nCritiqueRequest: Find the harm.\n\nCritique:"],)"
                        R"( "edit_request": "\n\nRevisionRequest: Remove it.\n\nRevision:"}})"));
  ASSERT_EQ(anthropic.size(), 1u);
  EXPECT_EQ(anthropic[0].critique_requests, std::vector<std::string>{"Find the harm."});
  EXPECT_EQ(anthropic[0].revision_request, "Remove it.");
}

TEST(CaiConstitution, BadFilesAreErrorsNamingFileAndKey) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {R"({"p": {"prompt": ["Critique it."]}})", "principle \"p\": missing key \"edit_request\""},
      {R"({"p": {"edit_request": "Fix it."}})", "principle \"p\": missing key \"prompt\""},
      {R"({"p": {"prompt": [], "edit_request": "Fix it."}})",
       "principle \"p\": key \"prompt\": expected a non-empty list of critique requests, got an empty list"},
      {R"({"p": {"prompt": "Critique it.", "edit_request": "Fix it."}})",
       "principle \"p\": key \"prompt\": expected a non-empty list of critique requests, got string"},
      {R"({"p": {"prompt": ["Critique it."], "edit_request": "  "}})",
       "principle \"p\": key \"edit_request\": empty request"},
      {R"({"p": {"prompt": [3], "edit_request": "Fix it."}})",
       "principle \"p\": key \"prompt[0]\": expected a string, got number"},
      {R"({"p": "Critique it."})", "principle \"p\": expected an object"},
      {R"([{"prompt": ["Critique it."], "edit_request": "Fix it."}])",
       "expected a JSON object of named principles"},
      {"{}", "no principles"},
      {"{\"p\": ", "invalid JSON"},
  };
  for (const auto& [text, message] : cases) {
    const std::string path = write_temp("constitution.json", text);
    const std::string error = error_of([&] { read_constitution(path); });
    EXPECT_EQ(error.rfind(path + ": ", 0), 0u) << error;
    EXPECT_NE(error.find(message), std::string::npos) << error;
  }
  // The command stops before loading anything, with the one-line error.
  const std::string path = write_temp("constitution.json", R"({"p": {"prompt": ["Critique it."]}})");
  const auto r = run_aligner("cai critique --model " + tiny_model(1024) + " --prompts " + prompts_file() +
                             " --constitution " + path + " --out " + write_temp("unused.jsonl", ""));
  EXPECT_EQ(r.status, 1);
  EXPECT_EQ(r.output,
            "error: " + path + ": principle \"p\": missing key \"edit_request\" (its revision request)\n");
}

TEST(CaiFewShot, ReadsExchangesAndRejectsOtherShapes) {
  const auto messages = read_few_shot(kFewShot);
  ASSERT_EQ(messages.size(), 18u);
  for (size_t i = 0; i < messages.size(); ++i) EXPECT_EQ(messages[i].role, i % 2 ? "assistant" : "user") << i;

  const std::string turn =
      R"({"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."})";
  const std::string four = write_temp("few4.jsonl", "{\"messages\": [" + turn + ", " + turn + "]}\n");
  EXPECT_EQ(error_of([&] { read_few_shot(four); }),
            four +
                ":1: field \"messages\": expected 6 messages (prompt, response, critique request, critique, "
                "revision request, revision), got 4");
  const std::string swapped =
      write_temp("few_swapped.jsonl",
                 "\n{\"messages\": [" + turn + ", " + turn +
                     R"(, {"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]})" + "\n");
  EXPECT_EQ(
      error_of([&] { read_few_shot(swapped); }),
      swapped + ":2: field \"messages[4].role\": the revision request is the user's turn, got \"assistant\"");
  const std::string none = write_temp("few_none.jsonl", "{\"prompt\": \"x\"}\n");
  EXPECT_NE(error_of([&] { read_few_shot(none); }).find(none + ":1: missing field \"messages\""),
            std::string::npos);
}

TEST(CaiPrompt, ReadsTextMessagesAndConversations) {
  const Conversation text = cai_prompt(nlohmann::json::parse(R"({"prompt": "Hi?"})"), "f:1");
  ASSERT_EQ(text.messages.size(), 1u);
  EXPECT_EQ(text.messages[0].role, "user");
  EXPECT_FALSE(text.system);
  // Replies after the last user turn are what is to be generated.
  const Conversation chat =
      cai_prompt(nlohmann::json::parse(
                     R"({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "A"},)"
                     R"( {"role": "assistant", "content": "B"}, {"role": "user", "content": "C"},)"
                     R"( {"role": "assistant", "content": "D"}]})"),
                 "f:1");
  ASSERT_EQ(chat.messages.size(), 3u);
  EXPECT_EQ(chat.messages.back().content, "C");
  EXPECT_EQ(*chat.system, "S");
  EXPECT_EQ(error_of([&] { cai_prompt(nlohmann::json::parse(R"({"text": "Hi"})"), "f:3"); }),
            "f:3: not a prompt line: expected a field prompt, messages or conversations");
  EXPECT_EQ(error_of([&] { cai_prompt(nlohmann::json::parse(R"({"prompt": " "})"), "f:4"); }),
            "f:4: empty prompt");
}

TEST(Cai, CritiqueWritesNemoSftLinesThatSftTrainsOn) {
  const auto dir = temp_dir("cai_critique");
  const auto r = run_aligner(critique_args(dir / "sft.jsonl"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("cai critique: 4/4 prompts"), std::string::npos) << r.output;
  const auto rows = read_jsonl(dir / "sft.jsonl");
  const auto principles = read_constitution(kConstitution);
  const std::vector<std::string> last_user = {"How do I pick a lock?", "What do you think of my cooking?",
                                              "Tell me a joke about cats.", "Why?"};
  std::set<std::string> drawn;
  int64_t expected_index = 0;
  for (const auto& row : rows) {
    // A blank revision is left out, so an index may be missing, never repeated or out of order.
    const int64_t index = row["prompt_index"].get<int64_t>();
    ASSERT_GE(index, expected_index) << row.dump();
    expected_index = index + 1;
    EXPECT_EQ(row["mask"], "User");
    const auto& turns = row["conversations"];
    ASSERT_GE(turns.size(), 2u);
    EXPECT_EQ(turns[turns.size() - 2]["from"], "User");
    EXPECT_EQ(turns[turns.size() - 2]["value"], last_user[size_t(index)]);
    EXPECT_EQ(turns.back()["from"], "Assistant");
    EXPECT_FALSE(turns.back()["value"].get<std::string>().empty());
    EXPECT_EQ(row["system"], index == 2 ? "Be brief." : "");
    // The critique request is one of the drawn principle's, the revision request is its.
    const std::string name = row["principle"];
    drawn.insert(name);
    const auto p = std::find_if(principles.begin(), principles.end(),
                                [&](const Principle& x) { return x.name == name; });
    ASSERT_NE(p, principles.end()) << name;
    EXPECT_NE(std::find(p->critique_requests.begin(), p->critique_requests.end(), row["critique_request"]),
              p->critique_requests.end())
        << row.dump();
    EXPECT_EQ(row["revision_request"], p->revision_request);
    EXPECT_TRUE(row["response"].is_string() && row["critique"].is_string()) << row.dump();
  }
  ASSERT_GE(rows.size(), 3u) << r.output;
  EXPECT_GE(drawn.size(), 2u);

  const auto sft =
      run_aligner("sft model.path=" + tiny_model(1024) + " data.train=" + (dir / "sft.jsonl").string() +
                  " model.device=cpu trainer.max_steps=2 trainer.micro_batch_size=1"
                  " trainer.global_batch_size=1 output_dir=" +
                  (dir / "run").string());
  EXPECT_EQ(sft.status, 0) << sft.output;
  EXPECT_NE(sft.output.find("step 2/2"), std::string::npos) << sft.output;
  fs::remove_all(dir);
}

// A run cut off anywhere (inside a line, after a line, after the last) continues to the file that
// one uninterrupted run writes, a line never written twice.
TEST(Cai, CritiqueContinuedEqualsUninterrupted) {
  const auto dir = temp_dir("cai_resume");
  const auto whole = run_aligner(critique_args(dir / "whole.jsonl"));
  ASSERT_EQ(whole.status, 0) << whole.output;
  const std::string expected = read(dir / "whole.jsonl");
  std::vector<size_t> line_ends;
  for (size_t i = 0; i < expected.size(); ++i)
    if (expected[i] == '\n') line_ends.push_back(i + 1);
  ASSERT_GE(line_ends.size(), 3u);
  for (const size_t cut : {line_ends[0] + 7, line_ends[2], line_ends.back()}) {
    std::ofstream(dir / "cut.jsonl", std::ios::binary) << expected.substr(0, cut);
    const auto again = run_aligner(critique_args(dir / "cut.jsonl"));
    ASSERT_EQ(again.status, 0) << again.output;
    EXPECT_NE(again.output.find("continuing"), std::string::npos) << again.output;
    EXPECT_EQ(read(dir / "cut.jsonl"), expected) << "cut at byte " << cut;
  }
  // overwrite=true starts afresh; a file that is not this command's output is not continued.
  std::ofstream(dir / "other.jsonl") << "{\"text\": \"x\"}\n";
  const auto other = run_aligner(critique_args(dir / "other.jsonl"));
  EXPECT_EQ(other.status, 1);
  EXPECT_NE(other.output.find((dir / "other.jsonl").string() + ":1: no integer \"prompt_index\""),
            std::string::npos)
      << other.output;
  const auto fresh = run_aligner(critique_args(dir / "other.jsonl", "overwrite=true"));
  ASSERT_EQ(fresh.status, 0) << fresh.output;
  EXPECT_EQ(read(dir / "other.jsonl"), expected);
  fs::remove_all(dir);
}

double sigmoid(double x) {
  return 1.0 / (1.0 + std::exp(-x));
}

// The question the judge was asked for a line: the chosen answer was the option it names.
std::string question_of(const nlohmann::json& row, const std::vector<Principle>& principles) {
  const auto p = std::find_if(principles.begin(), principles.end(), [&](const Principle& x) {
    return x.name == row["principle"].get<std::string>();
  });
  EXPECT_NE(p, principles.end()) << row.dump();
  const std::string chosen = row["chosen"], rejected = row["rejected"];
  const bool chosen_first = row["chosen_option"] == "A";
  return judge_question(cai_prompt(row, "line"), p->comparison, chosen_first ? chosen : rejected,
                        chosen_first ? rejected : chosen);
}

TEST(Cai, CompareMarginIsTheJudgeModelsProbability) {
  const auto dir = temp_dir("cai_compare");
  const auto r = run_aligner(
      compare_args(dir / "pairs.jsonl", "--judge " + tiny_model(1024), "gen.temperatures=[0.7,1.0,1.3]"));
  ASSERT_EQ(r.status, 0) << r.output;
  const auto rows = read_jsonl(dir / "pairs.jsonl");
  ASSERT_GE(rows.size(), 8u) << r.output;  // up to 3 pairs of each of the 4 prompts
  const auto principles = read_constitution(kConstitution);
  const auto tok = load_tokenizer(tiny_model(1024));
  const auto tmpl = resolve_chat_template("auto", *tok);
  // Each pair's two replies as whole sequences, scored by aligner perplexity: the shared question
  // cancels, and P(A) = sigmoid(log p(sequence A) - log p(sequence B)).
  std::string lines;
  for (const auto& row : rows) {
    EXPECT_NE(row["chosen"], row["rejected"]);
    EXPECT_GE(row["margin"].get<double>(), 0.5);
    EXPECT_LE(row["margin"].get<double>(), 1.0);
    EXPECT_EQ(row["temperatures"].size(), 2u);
    const auto seqs = judge_sequences(tmpl, *tok, question_of(row, principles));
    for (const auto& s : seqs) lines += nlohmann::json{{"input_ids", s.input_ids}}.dump() + "\n";
  }
  const std::string scored = write_temp("cai_judge_seqs.jsonl", lines);
  const auto ppl =
      run_aligner("perplexity --model " + tiny_model(1024) + " --data " + scored + " --device cpu");
  ASSERT_EQ(ppl.status, 0) << ppl.output;
  std::vector<double> logprob;
  std::istringstream out(ppl.output);
  for (std::string line; std::getline(out, line);)
    if (line.rfind("{\"index\"", 0) == 0)
      logprob.push_back(nlohmann::json::parse(line)["logprob"].get<double>());
  ASSERT_EQ(logprob.size(), 2 * rows.size());
  std::set<bool> hotter_chosen;
  for (size_t i = 0; i < rows.size(); ++i) {
    const double a = sigmoid(logprob[2 * i] - logprob[2 * i + 1]);
    const bool chosen_first = rows[i]["chosen_option"] == "A";
    EXPECT_NEAR(rows[i]["margin"].get<double>(), chosen_first ? a : 1 - a, 1e-4) << rows[i].dump();
    hotter_chosen.insert(rows[i]["temperatures"][0].get<double>() > rows[i]["temperatures"][1].get<double>());
  }
  // A random judge prefers one letter whatever the options say; the order of the options is drawn
  // for each pair, so it chooses the hotter answer of some pairs and the cooler of others.
  EXPECT_EQ(hotter_chosen.size(), 2u);

  const auto rm =
      run_aligner("rm model.path=" + tiny_model(1024) + " data.train=" + (dir / "pairs.jsonl").string() +
                  " model.device=cpu trainer.max_steps=2 trainer.micro_batch_size=2"
                  " trainer.global_batch_size=2 output_dir=" +
                  (dir / "rm").string());
  EXPECT_EQ(rm.status, 0) << rm.output;
  EXPECT_NE(rm.output.find("step 2/2"), std::string::npos) << rm.output;
  fs::remove_all(dir);
}

// An OpenAI-compatible chat endpoint on a port of its own: each answer's log-probs of A and B are a
// function of the question (answer_logprobs), or with text_only the letter B alone; from request
// number hang_from on it never answers.
class JudgeServer {
 public:
  explicit JudgeServer(bool text_only = false, int hang_from = -1)
      : text_only_(text_only), hang_from_(hang_from) {
    server_.Post("/v1/chat/completions", [this](const httplib::Request& req, httplib::Response& res) {
      const int n = requests_++;
      if (hang_from_ >= 0 && n >= hang_from_) {
        while (!stopping_) std::this_thread::sleep_for(std::chrono::milliseconds(20));
        return;
      }
      const auto body = nlohmann::json::parse(req.body);
      {
        std::lock_guard<std::mutex> lock(mutex_);
        bodies_.push_back(body);
      }
      const std::string question = body["messages"][0]["content"];
      nlohmann::json choice = {{"index", 0}, {"finish_reason", "stop"}};
      if (text_only_) {
        choice["message"] = {{"role", "assistant"}, {"content", "The better one is B."}};
      } else {
        const auto [a, b] = answer_logprobs(question);
        choice["message"] = {{"role", "assistant"}, {"content", a > b ? "A" : "B"}};
        // The first position's answer names no option, though its runner-up does (a judge that
        // might have begun "A is better"); the second's names the option, and its top log-probs
        // both, A in two spellings.
        choice["logprobs"] = {
            {"content",
             {{{"token", "The"},
               {"logprob", -0.1},
               {"top_logprobs",
                {{{"token", "The"}, {"logprob", -0.1}}, {{"token", "A"}, {"logprob", -3.0}}}}},
              {{"token", a > b ? " A" : "B"},
               {"logprob", std::max(a, b)},
               {"top_logprobs",
                {{{"token", " A"}, {"logprob", std::log(0.75) + a}},
                 {{"token", "(A"}, {"logprob", std::log(0.25) + a}},
                 {{"token", "B"}, {"logprob", b}},
                 {{"token", "C"}, {"logprob", -0.01}}}}}}}};
      }
      res.set_content(
          nlohmann::json{{"id", "x"}, {"object", "chat.completion"}, {"choices", {choice}}}.dump(),
          "application/json");
    });
    port_ = server_.bind_to_any_port("127.0.0.1");
    thread_ = std::thread([this] { server_.listen_after_bind(); });
  }
  ~JudgeServer() {
    stopping_ = true;
    server_.stop();
    thread_.join();
  }

  static std::pair<double, double> answer_logprobs(const std::string& question) {
    return {-0.1 * double(question.size() % 13), -0.6};
  }
  std::string url() const { return "http://127.0.0.1:" + std::to_string(port_) + "/v1/chat/completions"; }
  int requests() const { return requests_; }
  std::vector<nlohmann::json> bodies() {
    std::lock_guard<std::mutex> lock(mutex_);
    return bodies_;
  }

 private:
  bool text_only_;
  int hang_from_;
  httplib::Server server_;
  std::thread thread_;
  int port_ = 0;
  std::atomic<int> requests_{0};
  std::atomic<bool> stopping_{false};
  std::mutex mutex_;
  std::vector<nlohmann::json> bodies_;
};

TEST(Cai, CompareAsksAChatEndpointForLogprobs) {
  const auto dir = temp_dir("cai_endpoint");
  const auto principles = read_constitution(kConstitution);
  {
    JudgeServer server;
    const auto r =
        run_aligner(compare_args(dir / "pairs.jsonl", "--judge-url " + server.url(), "judge.model=judge-7b"));
    ASSERT_EQ(r.status, 0) << r.output;
    const auto rows = read_jsonl(dir / "pairs.jsonl");
    ASSERT_GE(rows.size(), 3u) << r.output;
    EXPECT_EQ(int64_t(rows.size()), server.requests());
    for (const auto& body : server.bodies()) {
      EXPECT_EQ(body["model"], "judge-7b");
      EXPECT_EQ(body["logprobs"], true);
      EXPECT_EQ(body["top_logprobs"], 20);
    }
    for (const auto& row : rows) {
      const auto [a, b] = JudgeServer::answer_logprobs(question_of(row, principles));
      const double first = sigmoid(a - b);
      EXPECT_NEAR(row["margin"].get<double>(), row["chosen_option"] == "A" ? first : 1 - first, 1e-12)
          << row.dump();
    }
  }
  {
    // No log-probs: the answer's letter decides, with probability 1.
    JudgeServer server(true);
    const auto r = run_aligner(compare_args(dir / "text.jsonl", "--judge-url " + server.url()));
    ASSERT_EQ(r.status, 0) << r.output;
    const auto rows = read_jsonl(dir / "text.jsonl");
    ASSERT_GE(rows.size(), 3u) << r.output;
    for (const auto& row : rows) {
      EXPECT_EQ(row["chosen_option"], "B");
      EXPECT_EQ(row["margin"], 1.0);
    }
    EXPECT_FALSE(server.bodies()[0].contains("model"));
  }
  fs::remove_all(dir);
}

// A judge that stops answering: a timeout error naming the endpoint, the pairs judged before it
// kept, and the same command then continues to what an uninterrupted run writes.
TEST(Cai, CompareEndpointTimeoutKeepsFinishedLinesAndContinues) {
  const auto dir = temp_dir("cai_timeout");
  std::string expected;
  {
    JudgeServer server;
    const auto whole = run_aligner(compare_args(dir / "whole.jsonl", "--judge-url " + server.url()));
    ASSERT_EQ(whole.status, 0) << whole.output;
    expected = read(dir / "whole.jsonl");
  }
  const size_t lines = size_t(std::count(expected.begin(), expected.end(), '\n'));
  ASSERT_GE(lines, 3u);
  {
    JudgeServer server(false, 2);
    const auto t0 = std::chrono::steady_clock::now();
    const auto cut =
        run_aligner(compare_args(dir / "cut.jsonl", "--judge-url " + server.url(), "judge.timeout_s=1"));
    EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(20));
    EXPECT_EQ(cut.status, 1);
    EXPECT_NE(cut.output.find("error: " + server.url() + " (prompt "), std::string::npos) << cut.output;
    EXPECT_NE(cut.output.find(
                  "no answer from the judge after 1 attempt: Read error (nothing within the timeout of 1 s)"),
              std::string::npos)
        << cut.output;
    // One pair per prompt (two temperatures): the two answered are the first two lines.
    size_t second_end = expected.find('\n', expected.find('\n') + 1) + 1;
    EXPECT_EQ(read(dir / "cut.jsonl"), expected.substr(0, second_end));
  }
  {
    JudgeServer server;
    const auto again = run_aligner(compare_args(dir / "cut.jsonl", "--judge-url " + server.url()));
    ASSERT_EQ(again.status, 0) << again.output;
    EXPECT_EQ(read(dir / "cut.jsonl"), expected);
  }
  fs::remove_all(dir);
}

TEST(Cai, BadSettingsAreOneLineErrors) {
  const auto out = temp_dir("cai_bad") / "o.jsonl";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {compare_args(out, ""),
       "error: set one of judge.path (--judge DIR, a judge model) and judge.url (--judge-url URL, a chat "
       "endpoint)\n"},
      {compare_args(out, "--judge " + tiny_model(1024) + " --judge-url http://127.0.0.1:1"),
       "error: set one of judge.path (--judge DIR, a judge model) and judge.url (--judge-url URL, a chat "
       "endpoint), not both\n"},
      {compare_args(out, "--judge-url https://example.com/v1/chat/completions"),
       "error: judge.url 'https://example.com/v1/chat/completions': expected http://HOST:PORT[/PATH] (https "
       "is not "
       "supported)\n"},
      {compare_args(out, "--judge " + tiny_model(1024), "gen.temperatures=[1.0]"),
       "error: config key 'gen.temperatures' needs at least 2 temperatures (one response each), got 1\n"},
      {critique_args(out, "prompts_per_batch=0"),
       "error: config key 'prompts_per_batch' must be at least 1, got 0\n"},
  };
  for (const auto& [args, message] : cases) {
    const auto r = run_aligner(args);
    EXPECT_EQ(r.status, 1) << args;
    EXPECT_EQ(r.output, message) << args;
  }
  {
    // Another command's output is not continued: critique's lines in compare's --out.
    const auto sl = out.parent_path() / "sl.jsonl";
    std::ofstream(sl) << R"({"system": "", "conversations": [], "mask": "User", "prompt_index": 0})"
                      << "\n";
    const auto r = run_aligner(compare_args(sl, "--judge " + tiny_model(1024)));
    EXPECT_EQ(r.status, 1);
    EXPECT_NE(
        r.output.find("error: " + sl.string() + ":1: no \"chosen\": not a line of this command's output"),
        std::string::npos)
        << r.output;
  }
  const std::string bad = write_temp("cai_bad_prompts.jsonl", "{\"prompt\": \"Hi\"}\n{\"prompt\": 3}\n");
  const auto r = run_aligner("cai critique --model " + tiny_model(1024) + " --prompts " + bad +
                             " --constitution " + kConstitution + " --out " + out.string());
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("error: " + bad + ":2: field \"prompt\""), std::string::npos) << r.output;
  fs::remove_all(out.parent_path());
}

}  // namespace
}  // namespace aligner::test
