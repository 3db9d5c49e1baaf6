// Rewards beyond a reward model: verifiable rules against the prompt line's reference answer, the
// format bonus, an external verifier program kept running (and each way it can fail), and their
// weighted sum as make_reward builds it from the reward.* keys.
#include <gtest/gtest.h>
#include <signal.h>

#include <chrono>
#include <fstream>
#include <thread>

#include "core/builtin_configs.h"
#include "core/config.h"
#include "reward/command_reward.h"
#include "reward/reward.h"
#include "test_util.h"

namespace aligner {
namespace {

namespace fs = std::filesystem;
using test::error_of;

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

std::unique_ptr<Reward> reward_of(const std::vector<std::string>& overrides) {
  static const test::ByteTokenizer tok({"</s>"}, "", "</s>");
  return make_reward(Config::load(builtin_config("ppo"), "", overrides), tok, at::kCPU, at::kFloat);
}

RewardQuery query(const std::string& response, nlohmann::json record) {
  RewardQuery q;
  q.prompt_text = "P";
  q.response_text = response;
  q.ended = true;
  q.record = std::move(record);
  return q;
}

struct Case {
  std::string response;
  nlohmann::json answer;
  double expected;
};

void expect_scores(Reward& reward, const std::vector<Case>& cases) {
  std::vector<RewardQuery> queries;
  for (const auto& c : cases) queries.push_back(query(c.response, {{"answer", c.answer}}));
  const auto scores = reward.score(queries);
  ASSERT_EQ(scores.size(), cases.size());
  for (size_t i = 0; i < cases.size(); ++i)
    EXPECT_EQ(scores[i], cases[i].expected)
        << "response " << nlohmann::json(cases[i].response).dump() << ", answer " << cases[i].answer.dump();
}

// A file in a folder of this test binary's own.
std::string script(const std::string& name, const std::string& text) {
  static const auto dir = test::temp_dir("reward_rules");
  const auto path = (dir / name).string();
  std::ofstream(path) << text;
  return path;
}

std::vector<RewardQuery> numbered_queries(size_t n) {
  std::vector<RewardQuery> out;
  for (size_t i = 0; i < n; ++i) out.push_back(query("r" + std::to_string(i), {{"id", i}}));
  return out;
}

// Whether the process is gone: no such pid, or a zombie that only waits for its parent to reap it.
bool gone(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string stat;
  if (!std::getline(in, stat)) return true;
  const size_t paren = stat.rfind(')');
  return paren != std::string::npos && paren + 2 < stat.size() && stat[paren + 2] == 'Z';
}

bool gone_within(pid_t pid, std::chrono::milliseconds limit) {
  const auto until = std::chrono::steady_clock::now() + limit;
  while (!gone(pid)) {
    if (std::chrono::steady_clock::now() > until) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return true;
}

pid_t read_pid(const std::string& path) {
  for (int i = 0; i < 200; ++i) {
    std::ifstream in(path);
    pid_t pid = 0;
    if (in >> pid && pid > 0) return pid;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ADD_FAILURE() << "no pid in " << path;
  return 0;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

TEST(RuleReward, ExactMatchComparesTrimmedTexts) {
  auto r = reward_of({"reward.rule=exact_match"});
  expect_scores(*r, {
                        {"42", "42", 1},
                        {"  42\n", "42", 1},
                        {"Paris", " Paris\t", 1},
                        {"paris", "Paris", 0},
                        {"42.", "42", 0},
                        {"The answer is 42", "42", 0},
                        {"", "42", 0},
                        {"72", 72, 1},  // a number in the record reads as JSON writes it
                        {"0.5", 0.5, 1},
                        {"café ☕", "café ☕", 1},
                    });
}

TEST(RuleReward, RegexComparesGroupOneOfTheLastMatch) {
  auto r = reward_of({"reward.rule=regex", R"(reward.pattern='Answer: *(\S+)')"});
  expect_scores(*r, {
                        {"Answer: 3\nAnswer: 5", "5", 1},
                        {"Answer: 3\nAnswer: 5", "3", 0},
                        {"Answer:   7  ", " 7 ", 1},
                        {"no answer here", "5", 0},
                        {"Answer: café", "café", 1},
                    });
  // Without a group the whole match is the answer.
  auto whole = reward_of({"reward.rule=regex", R"(reward.pattern=\d+)"});
  expect_scores(*whole, {{"a 12 b 34", "34", 1}, {"a 12 b 34", "12", 0}, {"none", "0", 0}});
  // \boxed{...}, the answer format of math data sets, with the pattern as a command line gives it.
  auto boxed = reward_of({"reward.rule=regex", R"(reward.pattern=\\boxed\{([^}]*)\})"});
  expect_scores(*boxed, {
                            {R"(so $\boxed{x^2 + 1}$.)", "x^2 + 1", 1},
                            {R"(\boxed{1} no, \boxed{2})", "2", 1},
                            {R"(\boxed{1} no, \boxed{2})", "1", 0},
                            {"x^2 + 1", "x^2 + 1", 0},
                        });
}

TEST(RuleReward, NumericReadsTheLastNumberOfEachSide) {
  auto r = reward_of({"reward.rule=numeric"});
  expect_scores(*r, {
                        {"The answer is 42.", 42, 1},
                        {"The answer is 42.", "42", 1},
                        {"first 5, then 7", 5, 0},
                        {"first 5, then 7", 7, 1},
                        {"x = -3", -3, 1},
                        {"x = \u22123", "-3", 1},  // U+2212 minus
                        {"x = 3", -3, 0},
                        {"It costs $1,234.50 in all", "1234.5", 1},
                        {"1,234,567 people", 1234567, 1},
                        {"1,234", "1234", 1},
                        {"pi is about 3.14159", 3.14159, 1},
                        {"answer: .5", 0.5, 1},
                        {"6.02e23 atoms", "6.02E+23", 1},
                        {"1.5E-3", 0.0015, 1},
                        {"12 apples", "12.0", 1},
                        {"on 2024-06-30", 30, 1},  // dashes between digits are no minus signs
                        {"no number here", 0, 0},
                        {"", 0, 0},
                        {"-0", 0, 1},
                        // The reference is read the same way: a worked solution's last number.
                        {"72", "She pays 3 x 24 = 72.\n#### 72", 1},
                    });
}

TEST(RuleReward, NumericToleranceIsRelativeToTheReferenceAboveOne) {
  auto exact = reward_of({"reward.rule=numeric"});
  expect_scores(*exact, {{"0.1", 0.1000000001, 1}, {"0.1001", 0.1, 0}, {"1000000.5", 1000000, 1}});
  auto loose = reward_of({"reward.rule=numeric", "reward.tolerance=0.01"});
  expect_scores(*loose, {
                            {"3.14", 3.14159, 1},
                            {"3.1", 3.14159, 0},
                            {"1009", 1000, 1},  // within 0.01 x 1000
                            {"1011", 1000, 0},
                            {"0.009", 0, 1},  // within 0.01 x 1
                            {"-0.02", 0, 0},
                        });
}

TEST(RuleReward, NumericWithAPatternReadsTheNumberInItsLastMatch) {
  auto r = reward_of({"reward.rule=numeric", R"(reward.pattern=\\boxed\{([^}]*)\})"});
  expect_scores(*r, {
                        {R"(2 + 2 = \boxed{1,234} (checked 99 times))", 1234, 1},
                        {R"(\boxed{-7.5})", "-7.5", 1},
                        {R"(\boxed{42 apples})", 42, 1},
                        {"42 but no box", 42, 0},
                        {R"(\boxed{x})", 42, 0},
                        // A reference in the same format is read through the pattern too.
                        {R"(\boxed{7})", R"(9 - 2 = \boxed{7}, not 8)", 1},
                    });
}

TEST(RuleReward, FormatPatternAddsItsWeightWhenTheWholeResponseMatches) {
  auto r = reward_of({"reward.rule=numeric", R"(reward.format_pattern=(?s)<think>.*</think>.*)",
                      "reward.format_weight=0.5"});
  expect_scores(*r, {
                        {"<think>\n6 x 7\n</think>\nThe answer is 42", 42, 1.5},
                        {"<think>6 x 7</think> 41", 42, 0.5},
                        {"The answer is 42", 42, 1},
                        {"so <think>6 x 7</think> 42", 42, 1},  // the match must start at the start
                    });
  // ... and end at the end.
  auto ends = reward_of({R"(reward.format_pattern=<answer>\d+</answer>)", "reward.format_weight=2"});
  expect_scores(*ends, {{"<answer>42</answer>", 0, 2}, {"<answer>42</answer> more", 0, 0}, {"", 0, 0}});
}

TEST(RuleReward, APromptLineWithoutItsReferenceIsAnErrorNamingTheField) {
  auto r = reward_of({"reward.rule=exact_match"});
  std::string e = error_of([&] { r->score({query("42", {{"question", "What is 6 x 7?"}})}); });
  EXPECT_TRUE(contains(e, "'answer'") && contains(e, "reward.answer_field") && contains(e, "What is 6 x 7?"))
      << e;
  e = error_of([&] { r->score({query("42", {{"answer", nullptr}})}); });
  EXPECT_TRUE(contains(e, "'answer'") && contains(e, "null")) << e;
  // A long record is shortened.
  e = error_of([&] { r->score({query("42", {{"question", std::string(5000, 'x')}})}); });
  EXPECT_TRUE(contains(e, "...") && e.size() < 400) << e;

  auto solution = reward_of({"reward.rule=numeric", "reward.answer_field=solution"});
  e = error_of([&] { solution->score({query("42", {{"answer", "42"}})}); });
  EXPECT_TRUE(contains(e, "'solution'")) << e;
  e = error_of([&] { solution->score({query("42", {{"solution", "forty-two"}})}); });
  EXPECT_TRUE(contains(e, "'solution'") && contains(e, "no number") && contains(e, "forty-two")) << e;
}

TEST(RuleReward, BadPatternsAreErrorsNamingTheKeyBeforeAnyModelLoads) {
  // The reward model's folder does not exist: the pattern is checked first.
  std::string e = error_of([] {
    reward_of({"reward.model=/nonexistent", "reward.rule=regex", "reward.pattern='Answer: (\\d+'"});
  });
  EXPECT_TRUE(contains(e, "reward.pattern") && contains(e, "missing closing parenthesis")) << e;
  e = error_of([] { reward_of({"reward.format_pattern='[a-'", "reward.format_weight=1"}); });
  EXPECT_TRUE(contains(e, "reward.format_pattern") && contains(e, "missing terminating ]")) << e;
}

TEST(RewardConfig, ErrorsNameTheirKeys) {
  const auto error_for = [](const std::vector<std::string>& overrides) {
    return error_of([&] { reward_of(overrides); });
  };
  std::string e = error_for({});
  EXPECT_TRUE(contains(e, "reward.model") && contains(e, "reward.url") && contains(e, "reward.rule") &&
              contains(e, "reward.format_pattern") && contains(e, "reward.command"))
      << e;
  e = error_for({"reward.model=/m", "reward.url=http://127.0.0.1:1"});
  EXPECT_TRUE(contains(e, "'reward.model'") && contains(e, "'reward.url'")) << e;
  // Checked before anything loads or starts, as every other key.
  EXPECT_TRUE(contains(error_for({"reward.rule=fuzzy"}), "'reward.rule'"));
  EXPECT_TRUE(
      contains(error_for({"reward.rule=exact_match", "reward.rule_weight=0"}), "'reward.rule_weight'"));
  EXPECT_TRUE(contains(error_for({"reward.model=/m", "reward.model_weight=0"}), "'reward.model_weight'"));
  EXPECT_TRUE(contains(error_for({"reward.format_pattern=x"}), "'reward.format_weight'"));
  EXPECT_TRUE(
      contains(error_for({"reward.rule=numeric", "reward.command_weight=2"}), "'reward.command_weight'"));
  EXPECT_TRUE(
      contains(error_for({"reward.rule=numeric", "reward.format_weight=1"}), "'reward.format_weight'"));
  EXPECT_TRUE(contains(error_for({"reward.command=cat", "reward.rule_weight=2"}), "'reward.rule_weight'"));
  EXPECT_TRUE(contains(error_for({"reward.command=cat", "reward.pattern=x"}), "'reward.pattern'"));
  EXPECT_TRUE(contains(error_for({"reward.command=cat", "reward.answer_field=x"}), "'reward.answer_field'"));
  EXPECT_TRUE(contains(error_for({"reward.rule=regex"}), "'reward.pattern'"));
  EXPECT_TRUE(contains(error_for({"reward.rule=exact_match", "reward.pattern=x"}), "'reward.pattern'"));
  EXPECT_TRUE(contains(error_for({"reward.rule=exact_match", "reward.tolerance=0.1"}), "'reward.tolerance'"));
  EXPECT_TRUE(contains(error_for({"reward.rule=numeric", "reward.tolerance=-1"}), "'reward.tolerance'"));
  EXPECT_TRUE(contains(error_for({"reward.rule=numeric", "reward.answer_field="}), "'reward.answer_field'"));
  EXPECT_TRUE(contains(error_for({"reward.command=cat", "reward.timeout_s=0"}), "'reward.timeout_s'"));
  EXPECT_TRUE(contains(error_for({"reward.model=/m", "reward.batch_size=0"}), "'reward.batch_size'"));
}

TEST(RewardConfig, CheckingAloneLoadsAndStartsNothing) {
  const auto load = [](const std::vector<std::string>& overrides) {
    return Config::load(builtin_config("ppo"), "", overrides);
  };
  const auto marker = script("started", "");
  fs::remove(marker);
  check_reward_config(load({"reward.model=/nonexistent", "reward.command=touch " + marker}));
  EXPECT_FALSE(fs::exists(marker));
  const std::string e = error_of([&] {
    check_reward_config(load({"reward.rule=regex", "reward.pattern=(x"}));
  });
  EXPECT_TRUE(contains(e, "'reward.pattern'")) << e;
}

TEST(RewardConfig, SourcesAddUpTimesTheirWeights) {
  const auto verifier = script("three.sh", "while read -r line; do echo 3; done\n");
  auto r = reward_of({"reward.rule=exact_match", "reward.rule_weight=0.5", "reward.command=sh " + verifier,
                      "reward.command_weight=-2", "reward.format_pattern=\\d+", "reward.format_weight=0.25"});
  expect_scores(*r, {{"42", "42", 0.5 - 6 + 0.25}, {"41", "42", -6 + 0.25}, {"forty-two", "42", -6}});
}

TEST(CommandReward, OneProcessAnswersEveryCallInOrderWithTheRecordsFields) {
  // The count of lines read shows that one process answered both calls; the prompt's length, that
  // the record's own "prompt" did not replace the prompt's text.
  const auto verifier = script("verifier.py", R"(import json, sys
count = 0
for line in sys.stdin:
    q = json.loads(line)
    count += 1
    correct = q["response"].strip() == str(q["answer"])
    print(count * 1000 + 100 * correct + 10 * len(q["prompt"]) + q["id"], flush=True)
)");
  auto r = start_command_reward("python3 " + verifier, 60);
  const auto q = [](const std::string& response, int id) {
    return query(response, {{"answer", "42"}, {"id", id}, {"prompt", "the record's prompt"}});
  };
  EXPECT_EQ(r->score({q("42", 1), q("41", 2), q(" 42\n", 3)}),
            (std::vector<double>{1000 + 100 + 10 + 1, 2000 + 10 + 2, 3000 + 100 + 10 + 3}));
  EXPECT_EQ(r->score({}), std::vector<double>{});
  EXPECT_EQ(r->score({q("41", 4), q("42", 5)}), (std::vector<double>{4000 + 10 + 4, 5000 + 100 + 10 + 5}));
}

TEST(CommandReward, AnswersMayHaveWhitespaceAroundThem) {
  auto r = start_command_reward(
      "read -r a; read -r b; read -r c; printf '  2.5 \\n-1e-3\\r\\n+7\\n'; while read -r l; do :; done", 60);
  EXPECT_EQ(r->score({query("a", {}), query("b", {}), query("c", {})}), (std::vector<double>{2.5, -1e-3, 7}));
}

TEST(CommandReward, BigBatchesDoNotWaitOnFullPipes) {
  // Megabytes each way: the program's answers fill its stdout pipe long before its stdin has all
  // the queries.
  auto r = start_command_reward("while read -r line; do printf '%2000s\\n' 1; done", 60);
  std::vector<RewardQuery> queries(1000, query(std::string(200, 'x'), {}));
  const auto scores = r->score(queries);
  EXPECT_EQ(scores, std::vector<double>(queries.size(), 1.0));
}

TEST(CommandReward, AProgramThatExitsIsAnErrorWithItsStatusAndStderr) {
  const std::string command = "sh " + script("die.sh", R"(read -r line
echo 1
echo "verifier: cannot parse the answer" >&2
exit 3
)");
  auto r = start_command_reward(command, 60);
  const std::string e = error_of([&] { r->score(numbered_queries(3)); });
  EXPECT_TRUE(contains(e, command) && contains(e, "exited with status 3") && contains(e, "1 of 3") &&
              contains(e, "verifier: cannot parse the answer"))
      << e;
  // Every later call fails the same way.
  EXPECT_EQ(error_of([&] { r->score(numbered_queries(1)); }), e);

  // A program that reads nothing and exits while a batch far larger than a pipe is written: no
  // SIGPIPE ends this process.
  auto quits = start_command_reward("exit 5", 60);
  const std::string e2 =
      error_of([&] { quits->score(std::vector<RewardQuery>(500, query(std::string(4000, 'x'), {}))); });
  EXPECT_TRUE(contains(e2, "exited with status 5") && contains(e2, "0 of 500")) << e2;

  auto killed = start_command_reward("read -r line; kill -9 $$", 60);
  const std::string e3 = error_of([&] { killed->score(numbered_queries(2)); });
  EXPECT_TRUE(contains(e3, "killed by signal 9")) << e3;
}

TEST(CommandReward, FewerAnswersThanQueriesIsAnError) {
  const std::string command = "sh " + script("short.sh", "read -r a; read -r b; echo 1; echo 2\n");
  auto r = start_command_reward(command, 60);
  const std::string e = error_of([&] { r->score(numbered_queries(3)); });
  EXPECT_TRUE(contains(e, command) && contains(e, "exited with status 0") && contains(e, "2 of 3")) << e;
}

TEST(CommandReward, AnythingButANumberIsAnErrorQuotingTheLine) {
  for (const std::string word : {"hello", "nan", "inf", "", "1 2", "0x10"}) {
    auto r = start_command_reward("while read -r line; do echo '" + word + "'; done", 60);
    const std::string e = error_of([&] { r->score(numbered_queries(2)); });
    EXPECT_TRUE(contains(e, "reward.command 'while read") && contains(e, "\"" + word + "\"") &&
                contains(e, "answer 1 of 2"))
        << e;
  }
  // More lines than queries.
  auto chatty = start_command_reward("while read -r line; do echo 1; echo 2; done", 60);
  const std::string e = error_of([&] {
    chatty->score(numbered_queries(1));
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    chatty->score(numbered_queries(1));
  });
  EXPECT_TRUE(contains(e, "\"2\"")) << e;
}

TEST(CommandReward, AProgramPastTheTimeoutIsKilledWithWhatItStarted) {
  const auto pid_file = script("sleep.pid", "");
  auto r = start_command_reward("sleep 100 & echo $! > " + pid_file + "; wait", 1);
  const auto t0 = std::chrono::steady_clock::now();
  const std::string e = error_of([&] { r->score(numbered_queries(2)); });
  EXPECT_LT(seconds_since(t0), 2.5);
  EXPECT_TRUE(contains(e, "sleep 100") && contains(e, "0 of 2") && contains(e, "reward.timeout_s")) << e;
  EXPECT_TRUE(gone_within(read_pid(pid_file), std::chrono::seconds(2)));
}

TEST(CommandReward, EndingClosesItsInputThenKillsWhatIsLeft) {
  const auto pid_file = script("lingering.pid", "");
  auto r = start_command_reward(
      "sleep 100 & echo $! > " + pid_file + "; while read -r l; do echo 1; done; wait", 60);
  EXPECT_EQ(r->score(numbered_queries(1)), std::vector<double>{1});
  const auto t0 = std::chrono::steady_clock::now();
  r.reset();
  EXPECT_LT(seconds_since(t0), 3.0);
  EXPECT_TRUE(gone_within(read_pid(pid_file), std::chrono::seconds(2)));
}

TEST(CommandReward, TheProgramHasItsOwnGroupAndDefaultSignals) {
  // Ignored here, as a run may have them; the program must not inherit that.
  struct sigaction ignore = {}, old_pipe = {}, old_int = {};
  ignore.sa_handler = SIG_IGN;
  sigaction(SIGPIPE, &ignore, &old_pipe);
  sigaction(SIGINT, &ignore, &old_int);
  // 10 for a group of its own (its pgrp is its pid), plus each of SIGINT and SIGPIPE it ignores.
  auto r = start_command_reward(
      "while read -r l; do read -r pid comm state ppid pgrp rest < /proc/$$/stat; "
      "ign=$(grep SigIgn /proc/$$/status | cut -f2); "
      "echo $(( (pgrp == $$) * 10 + ((0x$ign >> 1) & 1) + ((0x$ign >> 12) & 1) )); done",
      60);
  sigaction(SIGPIPE, &old_pipe, nullptr);
  sigaction(SIGINT, &old_int, nullptr);
  EXPECT_EQ(r->score(numbered_queries(1)), std::vector<double>{10});
}

}  // namespace
}  // namespace aligner
