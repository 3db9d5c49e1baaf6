// Rewards for online RL: a reward model in this process and the same model behind `aligner
// serve-reward`, which must give the same numbers as the model's own scores; the server's answers
// to bad requests, to several clients at once, and to SIGTERM.
#include <arpa/inet.h>
#include <fmt/ranges.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <numeric>
#include <random>
#include <thread>

#include "algo/rm.h"
#include "core/log.h"
#include "data/packing.h"
#include "reward/reward.h"
#include "reward/reward_model.h"
#include "reward/reward_server.h"
#include "test_ranks.h"
#include "test_util.h"

namespace aligner {
namespace {

namespace fs = std::filesystem;
using test::error_of;
using test::free_port;
using test::kRoot;
using test::tiny_model;

const std::string kLlama3Tokenizer = kRoot + "/tests/fixtures/tokenizers/llama3-style-bpe6k";
const std::string kGpt2Tokenizer = kRoot + "/tests/fixtures/tokenizers/gpt2";

// A random reward model (LlamaForSequenceClassification) with the tokenizer in `tokenizer_dir`,
// made once per test binary for each set of arguments.
const std::string& reward_model(const std::vector<std::string>& labels, int64_t context = 512,
                                const std::string& tokenizer_dir = kLlama3Tokenizer, int64_t vocab = 6000) {
  static std::map<std::string, std::string> made;
  const std::string name = fmt::format("rm_{}_{}_{}_{}", fmt::join(labels, "-"), context,
                                       fs::path(tokenizer_dir).filename().string(), vocab);
  auto& dir = made[name];
  if (dir.empty()) {
    nlohmann::json id2label;
    for (size_t i = 0; i < labels.size(); ++i) id2label[std::to_string(i)] = labels[i];
    nlohmann::json j = {{"model_type", "llama"},
                        {"architectures", {"LlamaForSequenceClassification"}},
                        {"num_labels", labels.size()},
                        {"id2label", id2label},
                        {"vocab_size", vocab},
                        {"hidden_size", 32},
                        {"intermediate_size", 64},
                        {"num_hidden_layers", 2},
                        {"num_attention_heads", 4},
                        {"num_key_value_heads", 2},
                        {"max_position_embeddings", context},
                        {"tie_word_embeddings", false},
                        {"torch_dtype", "float32"}};
    const auto d = test::temp_dir(name) / "m";
    save_transformer(init_transformer(parse_model_config(j, name), at::kCPU, 7), d.string(), std::nullopt, 0,
                     tokenizer_dir);
    dir = d.string();
  }
  return dir;
}

const Tokenizer& actor_tokenizer() {
  static const auto tok = load_tokenizer(tiny_model());
  return *tok;
}

RewardModelOptions options(const std::string& path, std::vector<double> weights = {},
                           int64_t batch_size = 3) {
  RewardModelOptions o;
  o.path = path;
  o.attribute_weights = std::move(weights);
  o.batch_size = batch_size;
  return o;
}

// Rollouts of varied lengths, in the actor's tokens and as text.
std::vector<RewardQuery> queries(size_t n, uint32_t seed) {
  static const std::vector<std::string> prompts = {
      "What is the capital of France?", "Write a haiku about the sea.",
      "user: explain recursion\nassistant:", "Translate 'good morning' into Spanish, please.",
      "List three prime numbers larger than 100."};
  static const std::vector<std::string> responses = {
      "Paris.",
      "Waves fold into foam,\nsalt wind writes on the wet sand,\nthe tide takes it back.",
      "A function that calls itself on a smaller problem until it reaches a case it can answer directly.",
      "Buenos días.",
      "101, 103 and 107 — all three are prime. 🙂",
      ""};
  std::mt19937 rng(seed);
  std::vector<RewardQuery> out;
  const Tokenizer& tok = actor_tokenizer();
  for (size_t i = 0; i < n; ++i) {
    RewardQuery q;
    q.prompt_text = prompts[rng() % prompts.size()];
    q.response_text = responses[rng() % responses.size()];
    q.prompt = tok.encode(q.prompt_text, true);
    q.response = tok.encode(q.response_text, false);
    q.response.push_back(*tok.special().eos);
    out.push_back(std::move(q));
  }
  return out;
}

// The model's own scores of each sequence, one at a time: [sequence][label].
std::vector<std::vector<double>> direct_scores(const std::string& dir,
                                               const std::vector<std::vector<int32_t>>& seqs) {
  const auto m = load_transformer(dir, at::kCPU);
  at::NoGradGuard no_grad;
  std::vector<std::vector<double>> out;
  for (const auto& ids : seqs) {
    const auto s =
        score_batch(m, collate_padded({{ids, std::vector<uint8_t>(ids.size(), 0)}}, 0))[0].to(at::kDouble);
    out.emplace_back(s.data_ptr<double>(), s.data_ptr<double>() + s.numel());
  }
  return out;
}

std::vector<std::vector<int32_t>> concatenated(const std::vector<RewardQuery>& qs) {
  std::vector<std::vector<int32_t>> out;
  for (const auto& q : qs) {
    out.push_back(q.prompt);
    out.back().insert(out.back().end(), q.response.begin(), q.response.end());
  }
  return out;
}

void expect_near(const std::vector<double>& got, const std::vector<double>& want, double tol = 1e-5) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], want[i], tol) << i;
}

std::string url_of(const RewardServer& s) {
  return "http://127.0.0.1:" + std::to_string(s.port());
}

std::unique_ptr<RewardServer> serve(const RewardModelOptions& o, RewardServerOptions opt = {}) {
  auto server = std::make_unique<RewardServer>(load_reward_scorer(o), opt);
  server->start("127.0.0.1", 0);
  return server;
}

TEST(RewardModel, InProcessRewardIsTheModelsScoreOfPromptThenResponse) {
  const auto& dir = reward_model({"reward"});
  const auto qs = queries(7, 1);
  // Batches of 3 mix lengths, so padding is exercised.
  const auto got = load_model_reward(options(dir), actor_tokenizer())->score(qs);
  std::vector<double> want;
  for (const auto& s : direct_scores(dir, concatenated(qs))) want.push_back(s[0]);
  expect_near(got, want);
  EXPECT_TRUE(load_model_reward(options(dir), actor_tokenizer())->score({}).empty());
}

TEST(RewardModel, AttributeWeightsCombineTheOutputsAsADotProduct) {
  const auto& dir = reward_model({"helpfulness", "correctness", "verbosity"});
  const std::vector<double> w = {0.5, -1.0, 2.0};
  const auto qs = queries(5, 2);
  const auto got = load_model_reward(options(dir, w), actor_tokenizer())->score(qs);
  std::vector<double> want;
  for (const auto& s : direct_scores(dir, concatenated(qs)))
    want.push_back(w[0] * s[0] + w[1] * s[1] + w[2] * s[2]);
  expect_near(got, want);
  for (const auto& s : direct_scores(dir, concatenated(qs))) EXPECT_GT(std::abs(s[1] - s[0]), 1e-6);

  EXPECT_EQ(
      error_of([&] { load_model_reward(options(dir), actor_tokenizer()); }),
      dir +
          " has 3 outputs (helpfulness, correctness, verbosity); reward.attribute_weights must give one "
          "weight per output to combine them");
  EXPECT_EQ(error_of([&] {
              load_model_reward(options(dir, {1, 2}), actor_tokenizer());
            }),
            "reward.attribute_weights has 2 weights but " + dir +
                " has 3 outputs (helpfulness, correctness, verbosity)");
  EXPECT_NE(error_of([&] {
              load_model_reward(options(tiny_model()), actor_tokenizer());
            }).find(tiny_model() + " is a causal LM, not a reward model"),
            std::string::npos);
}

// A reward model with another tokenizer reads the texts, encoded as `aligner rm` encodes a
// {"prompt", "response"} record; the same tokenizer loaded twice has one fingerprint.
TEST(RewardModel, AnotherTokenizerScoresTheTextsAsScoringTokensEncodesThem) {
  const auto& dir = reward_model({"reward"}, 512, kGpt2Tokenizer, 50257);
  const auto gpt2 = load_tokenizer(dir);
  EXPECT_NE(tokenizer_fingerprint(*gpt2), tokenizer_fingerprint(actor_tokenizer()));
  EXPECT_EQ(tokenizer_fingerprint(*load_tokenizer(tiny_model())), tokenizer_fingerprint(actor_tokenizer()));
  EXPECT_EQ(tokenizer_fingerprint(actor_tokenizer()).size(), 16u);

  const auto qs = queries(6, 3);
  const auto got = load_model_reward(options(dir), actor_tokenizer())->score(qs);
  const Encoder enc{gpt2.get(), resolve_chat_template("plain", *gpt2), true};
  std::vector<std::vector<int32_t>> seqs;
  for (const auto& q : qs) {
    seqs.push_back(scoring_tokens({{"prompt", q.prompt_text}, {"response", q.response_text}}, "q", enc));
    EXPECT_EQ(seqs.back().back(), *gpt2->special().eos);
  }
  std::vector<double> want;
  for (const auto& s : direct_scores(dir, seqs)) want.push_back(s[0]);
  expect_near(got, want);
}

TEST(RewardModel, SequencesLongerThanTheContextKeepTheirLastTokens) {
  const auto& dir = reward_model({"reward"}, 16);
  std::vector<std::string> lines;
  const auto previous = set_log_sink([&](const std::string& line) { lines.push_back(line); });
  auto reward = load_model_reward(options(dir), actor_tokenizer());
  RewardQuery q;
  for (int32_t i = 0; i < 30; ++i) (i < 20 ? q.prompt : q.response).push_back(100 + 7 * i);
  const auto first = reward->score({q, q});
  const auto again = reward->score({q});
  set_log_sink(previous);
  const auto whole = concatenated({q})[0];
  const std::vector<int32_t> last(whole.end() - 16, whole.end());
  expect_near(first, {direct_scores(dir, {last})[0][0], direct_scores(dir, {last})[0][0]});
  expect_near(again, {first[0]});
  int warnings = 0;
  for (const auto& l : lines) warnings += l.find("longer than its context of 16") != std::string::npos;
  EXPECT_EQ(warnings, 1);

  q.response.push_back(6000);
  EXPECT_NE(error_of([&] { reward->score({q}); }).find("reward query 0: token id 6000 is outside"),
            std::string::npos);
}

// Token ids (the actor's tokenizer) and texts (another one) give what the model gives in this
// process; a model with several outputs answers each one too.
TEST(RewardServer, AnswersAsTheModelInThisProcess) {
  const auto qs = queries(9, 4);
  for (const std::string& dir :
       {reward_model({"reward"}), reward_model({"reward"}, 512, kGpt2Tokenizer, 50257)}) {
    RewardServerOptions opt;
    opt.max_request_sequences = 4;  // the client splits the 9 queries into 3 requests
    auto server = serve(options(dir), opt);
    const auto remote = connect_reward_server(url_of(*server), actor_tokenizer(), 60)->score(qs);
    expect_near(remote, load_model_reward(options(dir), actor_tokenizer())->score(qs));
  }

  const auto& dir = reward_model({"helpfulness", "correctness", "verbosity"});
  const std::vector<double> w = {1.0, 0.25, -2.0};
  auto server = serve(options(dir, w));
  httplib::Client client("127.0.0.1", server->port());
  const auto health = client.Get("/health");
  ASSERT_TRUE(health);
  EXPECT_EQ(health->status, 200);
  const auto h = nlohmann::json::parse(health->body);
  EXPECT_EQ(h["status"], "ok");
  EXPECT_EQ(h["model"], dir);
  EXPECT_EQ(h["num_labels"], 3);
  EXPECT_EQ(h["labels"], nlohmann::json({"helpfulness", "correctness", "verbosity"}));
  EXPECT_EQ(h["vocab_size"], 6000);
  EXPECT_EQ(h["max_length"], 512);
  EXPECT_EQ(h["tokenizer"], tokenizer_fingerprint(actor_tokenizer()));

  const auto seqs = concatenated(queries(4, 5));
  const auto res = client.Post("/score", nlohmann::json{{"input_ids", seqs}}.dump(), "application/json");
  ASSERT_TRUE(res);
  ASSERT_EQ(res->status, 200) << res->body;
  const auto answer = nlohmann::json::parse(res->body);
  const auto want = direct_scores(dir, seqs);
  ASSERT_EQ(answer["scores"].size(), seqs.size());
  ASSERT_EQ(answer["rewards"].size(), seqs.size());
  for (size_t i = 0; i < seqs.size(); ++i) {
    for (size_t a = 0; a < 3; ++a) EXPECT_NEAR(answer["scores"][i][a].get<double>(), want[i][a], 1e-5);
    EXPECT_NEAR(answer["rewards"][i].get<double>(), w[0] * want[i][0] + w[1] * want[i][1] + w[2] * want[i][2],
                1e-5);
  }
}

// Every malformed request is a 4xx whose JSON error names the field; the server goes on serving.
TEST(RewardServer, BadRequestsGetA4xxNamingTheField) {
  RewardServerOptions opt;
  opt.max_request_sequences = 8;
  opt.max_request_bytes = 4096;
  auto server = serve(options(reward_model({"reward"})), opt);
  httplib::Client client("127.0.0.1", server->port());
  client.set_read_timeout(60, 0);
  struct Case {
    std::string method, path, body;
    int status;
    std::string error;  // a part of the message
  };
  const std::string deep = std::string(300, '[') + std::string(300, ']');
  const std::vector<Case> cases = {
      {"POST", "/score", "{\"input_ids\": [[1, 2]", 400, "request body"},
      {"POST", "/score", "[[1, 2]]", 400, "expected an object"},
      {"POST", "/score", "{\"input_ids\": " + deep + "}", 400, "request body"},
      {"POST", "/score", R"({"input_ids": "1 2 3"})", 400,
       R"(field "input_ids": expected a list, got string)"},
      {"POST", "/score", R"({"input_ids": [[1, 2], [3, "x"]]})", 400,
       R"(field "input_ids[1][1]": expected an integer)"},
      {"POST", "/score", R"({"input_ids": [[1, 6000]]})", 400,
       R"(field "input_ids[0][1]": token id 6000 is outside the vocabulary [0, 6000))"},
      {"POST", "/score", R"({"input_ids": [[5], [-1]]})", 400, R"(field "input_ids[1][0]": token id -1)"},
      {"POST", "/score", R"({"input_ids": [[5], []]})", 400, R"(field "input_ids[1]": empty sequence)"},
      {"POST", "/score", R"({"input_ids": [[1],[1],[1],[1],[1],[1],[1],[1],[1]]})", 400,
       "9 sequences, more than server.max_request_sequences (8)"},
      {"POST", "/score", R"({"input_id": [[1]]})", 400, R"(unknown field "input_id")"},
      {"POST", "/score", R"({"input_ids": [[1]], "prompts": ["a"]})", 400, "not both"},
      {"POST", "/score", R"({"prompts": ["a", "b"], "responses": ["c"]})", 400,
       R"(field "responses": 1 responses for 2 prompts)"},
      {"POST", "/score", R"({"prompts": ["a", 3], "responses": ["c", "d"]})", 400,
       R"(field "prompts[1]": expected a string, got integer)"},
      {"POST", "/score", R"({"responses": ["c"]})", 400, R"(both "prompts" and "responses")"},
      {"POST", "/score", "{\"input_ids\": [[" + std::string(5000, '1') + "]]}", 413,
       "server.max_request_bytes (4096 bytes)"},
      {"GET", "/nowhere", "", 404, "GET /nowhere: no such path"},
      {"GET", "/score", "", 405, "GET /score: method not allowed (use POST)"},
      {"POST", "/health", "{}", 405, "POST /health: method not allowed (use GET)"},
      {"DELETE", "/score", "", 405, "method not allowed"},
  };
  for (const auto& c : cases) {
    const auto res = c.method == "GET"      ? client.Get(c.path.c_str())
                     : c.method == "DELETE" ? client.Delete(c.path.c_str())
                                            : client.Post(c.path.c_str(), c.body, "application/json");
    ASSERT_TRUE(res) << c.method << " " << c.path << " " << c.body.substr(0, 80) << ": " << res.error();
    EXPECT_EQ(res->status, c.status) << c.body.substr(0, 80) << ": " << res->body;
    nlohmann::json j;
    ASSERT_NO_THROW(j = nlohmann::json::parse(res->body)) << res->body;
    ASSERT_TRUE(j.contains("error") && j["error"].is_string()) << res->body;
    EXPECT_NE(j["error"].get<std::string>().find(c.error), std::string::npos)
        << c.body.substr(0, 80) << ": " << j["error"];
  }
  const auto ok = client.Post("/score", R"({"input_ids": [[1, 2, 3]]})", "application/json");
  ASSERT_TRUE(ok);
  EXPECT_EQ(ok->status, 200) << ok->body;
  EXPECT_EQ(nlohmann::json::parse(ok->body)["rewards"].size(), 1u);

  // A port in use is an error naming it.
  RewardServer second(load_reward_scorer(options(reward_model({"reward"}))), {});
  EXPECT_NE(error_of([&] {
              second.start("127.0.0.1", server->port());
            }).find("cannot listen on 127.0.0.1:" + std::to_string(server->port())),
            std::string::npos);

  // The client names the url and passes the server's message on.
  auto reward = connect_reward_server(url_of(*server), actor_tokenizer(), 60);
  auto qs = queries(1, 6);
  qs[0].response.push_back(7000);
  const std::string error = error_of([&] { reward->score(qs); });
  EXPECT_NE(
      error.find(url_of(*server) + "/score (queries 0 to 0): HTTP 400: request body: field \"input_ids[0]"),
      std::string::npos)
      << error;
  EXPECT_NE(error.find("token id 7000 is outside the vocabulary"), std::string::npos) << error;
}

TEST(RewardServer, ClientUrlsAndUnreachableServersAreErrorsNamingTheUrl) {
  for (const std::string url :
       {"https://127.0.0.1:5555", "http://127.0.0.1", "127.0.0.1:5555", "http://host:99999"})
    EXPECT_NE(error_of([&] { connect_reward_server(url, actor_tokenizer(), 5); }).find("'" + url + "'"),
              std::string::npos)
        << url;
  const std::string url = "http://127.0.0.1:" + std::to_string(free_port());
  const auto t0 = std::chrono::steady_clock::now();
  const std::string error = error_of([&] { connect_reward_server(url, actor_tokenizer(), 5); });
  EXPECT_EQ(error.rfind(url + "/health: no answer from the reward server after 4 attempts", 0), 0u) << error;
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(30));
}

// Requests from several threads at once share the worker and each gets its own answers.
TEST(RewardServer, ConcurrentClientsGetTheirOwnAnswers) {
  const auto& dir = reward_model({"reward"});
  RewardServerOptions opt;
  opt.threads = 4;
  auto server = serve(options(dir, {}, 8), opt);
  constexpr int kClients = 6, kRounds = 3;
  std::vector<std::vector<RewardQuery>> work;
  std::vector<std::vector<double>> want, got(kClients * kRounds);
  auto local = load_model_reward(options(dir), actor_tokenizer());
  for (int i = 0; i < kClients * kRounds; ++i) {
    work.push_back(queries(3 + i % 4, 100 + uint32_t(i)));
    want.push_back(local->score(work.back()));
  }
  std::vector<std::string> errors(kClients);
  std::vector<std::thread> threads;
  for (int c = 0; c < kClients; ++c)
    threads.emplace_back([&, c] {
      try {
        auto reward = connect_reward_server(url_of(*server), actor_tokenizer(), 60);
        for (int r = 0; r < kRounds; ++r)
          got[size_t(c * kRounds + r)] = reward->score(work[size_t(c * kRounds + r)]);
      } catch (const std::exception& e) {
        errors[size_t(c)] = e.what();
      }
    });
  for (auto& t : threads) t.join();
  for (int c = 0; c < kClients; ++c) EXPECT_EQ(errors[size_t(c)], "") << c;
  for (size_t i = 0; i < want.size(); ++i) expect_near(got[i], want[i]);
}

std::string read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

// A child process running `cmd` under sh with stdout and stderr to `log`; its pid.
pid_t spawn(const std::string& cmd, const std::string& log) {
  const std::string line = "exec " + cmd + " >" + log + " 2>&1";
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::execl("/bin/sh", "sh", "-c", line.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  return pid;
}

// The child's exit status, or -1 (after killing it) when it has not ended within `limit`.
int wait_for(pid_t pid, std::chrono::seconds limit) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  int status = 0;
  while (::waitpid(pid, &status, WNOHANG) == 0) {
    if (std::chrono::steady_clock::now() > deadline) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      return -1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

TEST(RewardServer, CliServesUntilSigterm) {
  const auto& dir = reward_model({"reward"});
  const int port = free_port();
  const std::string log = (test::temp_dir("serve_reward") / "log").string();
  const pid_t pid = spawn(std::string("env OMP_NUM_THREADS=1 ") + ALIGNER_BINARY + " serve-reward --model " +
                              dir + " --device cpu --port " + std::to_string(port) + " server.threads=2",
                          log);
  ASSERT_GT(pid, 0);
  httplib::Client client("127.0.0.1", port);
  client.set_connection_timeout(1, 0);
  bool up = false;
  for (const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
       !up && std::chrono::steady_clock::now() < deadline;) {
    const auto res = client.Get("/health");
    up = res && res->status == 200;
    if (!up) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  if (up) {
    const auto qs = queries(5, 7);
    const auto remote =
        connect_reward_server("http://127.0.0.1:" + std::to_string(port), actor_tokenizer(), 60)->score(qs);
    expect_near(remote, load_model_reward(options(dir), actor_tokenizer())->score(qs));
  }
  ::kill(pid, SIGTERM);
  const int status = wait_for(pid, std::chrono::seconds(60));
  const std::string output = read_text(log);
  EXPECT_TRUE(up) << output;
  EXPECT_EQ(status, 0) << output;
  EXPECT_NE(output.find("serving " + dir + " on http://127.0.0.1:" + std::to_string(port)), std::string::npos)
      << output;
  EXPECT_NE(output.find("stopping the reward server"), std::string::npos) << output;

  const auto bad = test::run_aligner("serve-reward --model " + dir + " server.prot=1");
  EXPECT_NE(bad.status, 0);
  EXPECT_EQ(std::count(bad.output.begin(), bad.output.end(), '\n'), 1) << bad.output;
  EXPECT_NE(bad.output.find("server.prot"), std::string::npos) << bad.output;
  EXPECT_NE(bad.output.find("server.port"), std::string::npos) << bad.output;
}

}  // namespace
}  // namespace aligner
