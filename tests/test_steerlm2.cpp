// SteerLM 2.0: the loss, its weights and KL against a direct computation and their gradient's
// direction (also through a model), log P(a|x,y), the reader of NeMo's lines and its errors, and
// `aligner steerlm2 prepare` -> `aligner steerlm2` -> prepare again from the trained model, end to
// end on the demo model; resume.
#include <gtest/gtest.h>

#include <cmath>
#include <csignal>
#include <filesystem>
#include <fstream>

#include "algo/dpo.h"
#include "algo/rm.h"
#include "algo/steerlm2.h"
#include "data/packing.h"
#include "data/steerlm2_data.h"
#include "io/hf_checkpoint.h"
#include "run_outputs.h"
#include "test_util.h"
#include "text/chat_template.h"

using namespace aligner;
using namespace aligner::test;
namespace fs = std::filesystem;

namespace {

const std::string kDemoModel = kRoot + "/examples/models/tiny-llama";
const std::vector<std::string> kAttributes = {"helpfulness", "correctness", "verbosity"};

std::string write_lines(const fs::path& path, const std::vector<nlohmann::json>& records) {
  std::ofstream out(path);
  for (const auto& r : records) out << r.dump() << "\n";
  return path.string();
}

std::vector<nlohmann::json> read_lines(const fs::path& path) {
  std::vector<nlohmann::json> out;
  std::ifstream in(path);
  for (std::string line; std::getline(in, line);) out.push_back(nlohmann::json::parse(line));
  return out;
}

nlohmann::json turn(const std::string& from, const std::string& value) {
  return {{"from", from}, {"value", value}};
}

nlohmann::json response(const std::string& value, double log_pa, double log_py, double log_q) {
  return {{"from", "Assistant"},
          {"value", value},
          {kLogPAttributes, log_pa},
          {kLogPResponse, log_py},
          {kLogQResponse, log_q}};
}

// Training lines with log-probs of our own: what NeMo-Aligner's tools would hand over.
std::vector<nlohmann::json> training_lines() {
  std::vector<nlohmann::json> lines;
  const std::vector<std::string> questions = {"What is 2+2?",    "Name a colour.",   "Say hello.",
                                              "Count to three.", "Give me a fruit.", "What day is it?"};
  for (size_t i = 0; i < questions.size(); ++i)
    lines.push_back(
        {{"system", "Be brief."},
         {"prompt_turns", {turn("User", questions[i])}},
         {"label", "helpfulness:4,correctness:" + std::to_string(i % 5)},
         {"responses",
          {response("Four.", -1.0 - 0.1 * i, -20, -22), response("It is four, I think.", -3, -25, -24),
           response("No.", -0.5, -8, -9 + 0.3 * i)}}});
  return lines;
}

double softmax_at(const std::vector<double>& x, size_t i) {
  double z = 0;
  for (double v : x) z += std::exp(v);
  return std::exp(x[i]) / z;
}

// b' from log Q_theta - log Q', w' from the three log-probs, the loss over the mean length and
// KL(w' || b') with NeMo's 1e-8, written out; the gradient lowers the NLL of responses with w' > b'.
TEST(Steerlm2, LossWeightsAndKlMatchADirectComputation) {
  const std::vector<double> logq_theta = {-10, -12.5, -11}, log_pa = {-0.2, -3.0, -1.0},
                            log_py = {-9, -14, -10}, logq_prime = {-10.5, -12, -10}, lengths = {4, 6, 5};
  std::vector<double> log_w(3), ratio(3), w(3), b(3);
  for (size_t i = 0; i < 3; ++i) {
    log_w[i] = log_pa[i] + log_py[i] - logq_prime[i];
    ratio[i] = logq_theta[i] - logq_prime[i];
  }
  for (size_t i = 0; i < 3; ++i) {
    w[i] = softmax_at(log_w, i);
    b[i] = softmax_at(ratio, i);
  }
  const double mean_length = 5;
  double loss = 0, kl = 0;
  for (size_t i = 0; i < 3; ++i) {
    loss += (w[i] - b[i]) * -logq_theta[i] / mean_length;
    kl += (w[i] + 1e-8) * std::log((w[i] + 1e-8) / (b[i] + 1e-8));
  }
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  auto q = at::tensor(logq_theta, opts).requires_grad_(true);
  const auto r =
      steerlm2_loss(q, at::tensor(log_w, opts), at::tensor(logq_prime, opts), at::tensor(lengths, opts));
  EXPECT_NEAR(r.loss.item<double>(), loss, 1e-12);
  EXPECT_NEAR(r.kl.item<double>(), kl, 1e-12);
  EXPECT_GT(kl, 0.1);  // the numbers make w' and b' differ
  for (int64_t i = 0; i < 3; ++i) {
    EXPECT_NEAR(r.w[i].item<double>(), w[size_t(i)], 1e-12);
    EXPECT_NEAR(r.b[i].item<double>(), b[size_t(i)], 1e-12);
  }
  r.loss.backward();
  // b' is a constant: d loss / d log Q_theta(y_i) = -(w'_i - b'_i) / mean length, so a descent step
  // raises the log-likelihood of exactly the responses with w' > b'.
  int raised = 0;
  for (int64_t i = 0; i < 3; ++i) {
    const double g = q.grad()[i].item<double>();
    EXPECT_NEAR(g, -(w[size_t(i)] - b[size_t(i)]) / mean_length, 1e-12);
    EXPECT_EQ(g<0, w[size_t(i)]> b[size_t(i)]) << i;
    raised += g < 0;
  }
  EXPECT_GT(raised, 0);
  EXPECT_LT(raised, 3);

  // Q_theta = Q': b' is uniform, and KL(w' || b') is KL(w' || uniform).
  const auto same = steerlm2_loss(at::tensor(logq_prime, opts), at::tensor(log_w, opts),
                                  at::tensor(logq_prime, opts), at::tensor(lengths, opts));
  double kl_uniform = 0;
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_NEAR(same.b[int64_t(i)].item<double>(), 1.0 / 3, 1e-12);
    kl_uniform += (w[i] + 1e-8) * std::log((w[i] + 1e-8) / (1.0 / 3 + 1e-8));
  }
  EXPECT_NEAR(same.kl.item<double>(), kl_uniform, 1e-12);
}

// Each attribute's value is a Gaussian of width sigma around the prediction, normalised over 0..scale.
TEST(Steerlm2, AttributeLogProbIsAGaussianNormalisedOverTheScale) {
  const double z = std::exp(-4.5) + std::exp(-2.0) + 2 * std::exp(-0.5) + 1;  // prediction 3, sigma 1, 0..4
  EXPECT_NEAR(attribute_log_prob({3.0f}, {4.0f}, {1}, 1.0, 4), -0.5 - std::log(z), 1e-6);
  EXPECT_NEAR(attribute_log_prob({3.0f}, {3.0f}, {1}, 1.0, 4), -std::log(z), 1e-6);
  double total = 0;
  for (int v = 0; v <= 4; ++v) total += std::exp(attribute_log_prob({1.7f}, {float(v)}, {1}, 0.6, 4));
  EXPECT_NEAR(total, 1.0, 1e-9);
  // Attributes add up; those the label leaves out do not count.
  const double a = attribute_log_prob({3.0f}, {4.0f}, {1}, 1.0, 4),
               c = attribute_log_prob({0.2f}, {0.0f}, {1}, 1.0, 4);
  EXPECT_NEAR(attribute_log_prob({3.0f, 9.0f, 0.2f}, {4.0f, 1.0f, 0.0f}, {1, 0, 1}, 1.0, 4), a + c, 1e-9);
  // A sharper distribution punishes a miss more.
  EXPECT_LT(attribute_log_prob({3.0f}, {1.0f}, {1}, 0.5, 4), attribute_log_prob({3.0f}, {1.0f}, {1}, 1.0, 4));
}

// NeMo's line: the prompt turns, the Assistant's turn with the label as its attribute line, and the
// loss on the response and the end-of-turn after it only.
TEST(Steerlm2Data, ReadsNemoLinesAndTrainsOnTheResponsesOnly) {
  const ByteTokenizer tok({"<extra_id_0>", "<extra_id_1>", "<extra_id_2>", "</s>"}, "", "</s>");
  const auto path = write_temp(
      "steerlm2_read.jsonl",
      nlohmann::json{
          {"system", "Sys"},
          {"prompt_turns", {turn("User", "Hi"), turn("Assistant", "Hello"), turn("User", "Add 2+2")}},
          {"label", "helpfulness:4,correctness:3"},
          {"responses", {response("4", -1, -2, -3), response("Five", -0.5, -6, -4)}}}
              .dump() +
          "\n");
  DataOptions opt;
  opt.max_length = 512;
  auto ds = open_steerlm2_dataset(path, tok, opt, kAttributes);
  const auto ex = steerlm2_example(ds, 0);
  ASSERT_TRUE(ex);
  ASSERT_EQ(ex->responses.size(), 2u);
  EXPECT_DOUBLE_EQ(ex->log_w[0], -1 - 2 + 3);
  EXPECT_DOUBLE_EQ(ex->log_w[1], -0.5 - 6 + 4);
  EXPECT_DOUBLE_EQ(ex->log_q[0], -3);
  EXPECT_DOUBLE_EQ(ex->log_q[1], -4);
  const std::string prompt =
      "<extra_id_0>System\nSys\n<extra_id_1>User\nHi\n<extra_id_1>Assistant\nHello\n<extra_id_1>User\nAdd "
      "2+2\n<extra_id_1>Assistant\n<extra_id_2>helpfulness:4,correctness:3\n";
  const std::vector<std::string> replies = {"4", "Five"};
  for (size_t i = 0; i < 2; ++i) {
    const auto& s = ex->responses[i];
    EXPECT_EQ(tok.decode(s.input_ids, false), prompt + replies[i] + "\n<extra_id_1>");
    EXPECT_EQ(loss_text({s.input_ids, s.loss_mask}, tok), replies[i] + "\n<extra_id_1>");
  }
}

// Every bad line is an error naming file:line, the field and, for a label, the attribute.
TEST(Steerlm2Data, BadLinesNameTheFieldAndTheAttribute) {
  const ByteTokenizer tok({"<extra_id_0>", "<extra_id_1>", "<extra_id_2>", "</s>"}, "", "</s>");
  const nlohmann::json good = training_lines()[0];
  auto with = [&](const std::function<void(nlohmann::json&)>& change) {
    nlohmann::json r = good;
    change(r);
    return r;
  };
  const std::vector<std::pair<nlohmann::json, std::string>> cases = {
      {with([](auto& r) { r.erase("responses"); }), "missing field \"responses\""},
      {with([](auto& r) {
         r["responses"].erase(1);
         r["responses"].erase(1);
       }),
       "at least 2 responses"},
      {with([](auto& r) { r["responses"][1].erase(kLogPResponse); }),
       "missing field \"responses[1].log(P(y|x))\""},
      {with([](auto& r) { r["responses"][2][kLogQResponse] = "-3.5"; }),
       "field \"responses[2].log(Q(y|a,x))\": expected a number, got string"},
      {with([](auto& r) { r["responses"][0].erase("value"); }), "missing field \"responses[0].value\""},
      {with([](auto& r) { r.erase("label"); }), "field \"label\": missing"},
      {with([](auto& r) { r["label"] = "helpfulness:4,correctness:high"; }),
       "field \"label\": attribute \"correctness\": \"high\" is not a number"},
      {with([](auto& r) { r["label"] = "helpfulnes:4"; }),
       "field \"label\": unknown attribute \"helpfulnes\""},
      {with([](auto& r) { r["prompt_turns"].push_back(turn("Assistant", "x")); }),
       "field \"prompt_turns\": expected an odd number of turns"},
      {with([](auto& r) { r["prompt_turns"][0]["from"] = "Assistant"; }),
       "field \"prompt_turns[0].from\": expected \"User\""},
  };
  std::vector<nlohmann::json> lines;
  for (const auto& c : cases) lines.push_back(c.first);
  const auto path = write_temp("steerlm2_bad.jsonl", [&] {
    std::string text;
    for (const auto& l : lines) text += l.dump() + "\n";
    return text;
  }());
  DataOptions opt;
  opt.max_length = 512;
  auto ds = open_steerlm2_dataset(path, tok, opt, kAttributes);
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string e = error_of([&] { steerlm2_example(ds, int64_t(i)); });
    EXPECT_EQ(e.rfind(path + ":" + std::to_string(i + 1) + ": ", 0), 0u) << e;
    EXPECT_NE(e.find(cases[i].second), std::string::npos) << i << ": " << e;
  }
}

// Through a real model: one descent step on the loss moves log Q(y_1) - log Q(y_2) towards the
// response that w' prefers over b' (to first order it rises by lr x coefficient x |grad difference|^2).
TEST(Steerlm2, AStepMakesTheResponseWithTheLargerWeightLikelier) {
  auto model = load_transformer(tiny_model(), at::kCPU);
  for (auto& [name, p] : named_parameters(model)) p.requires_grad_(true);
  const auto tok = load_tokenizer(tiny_model());
  nlohmann::json line = training_lines()[0];
  line["responses"] = {response("Four.", 0, 0, 0), response("It is four, I think.", 0, 0, 0)};
  const auto path = write_temp("steerlm2_step.jsonl", line.dump() + "\n");
  DataOptions opt;
  opt.max_length = 512;
  auto ds = open_steerlm2_dataset(path, *tok, opt, kAttributes);
  const auto ex = steerlm2_example(ds, 0);
  ASSERT_TRUE(ex);
  const auto batch = collate_padded(ex->responses, pad_id_for(*tok));
  auto logq = response_logprobs(model, batch);
  // Q' = Q_theta (b' uniform), and w' prefers the second response.
  const auto logq_prime = logq.sum.detach().to(at::kDouble);
  const auto log_w = at::tensor(std::vector<double>{-2.0, 0.0}, at::kDouble);
  const auto r = steerlm2_loss(logq.sum, log_w, logq_prime, logq.count);
  ASSERT_GT(r.w[1].item<double>(), r.b[1].item<double>());
  r.loss.backward();
  {
    at::NoGradGuard no_grad;
    for (auto& [name, p] : named_parameters(model))
      if (p.grad().defined()) p.sub_(1e-2 * p.grad());
  }
  const auto after = response_logprobs(model, batch).sum.detach().to(at::kDouble);
  const double before_gap = (logq_prime[1] - logq_prime[0]).item<double>();
  const double after_gap = (after[1] - after[0]).item<double>();
  EXPECT_GT(after_gap, before_gap + 1e-4) << before_gap << " -> " << after_gap;
}

// A regression reward model on the demo model: the attribute model that prepare scores with.
std::string attribute_model(const fs::path& dir) {
  const auto d = dir / "rm";
  const auto m = load_reward_model(kDemoModel, at::kCPU, at::kFloat, {"helpfulness", "correctness"}, 3, 5);
  save_transformer(m, d.string(), std::nullopt, 0, kDemoModel);
  return d.string();
}

std::vector<nlohmann::json> prompt_lines() {
  return {
      {{"system", "A chat."}, {"prompt_turns", {turn("User", "What is 2+2?")}}, {"label", "helpfulness:4"}},
      {{"prompt_turns", {turn("User", "Hi"), turn("Assistant", "Hello!"), turn("User", "Name a colour.")}},
       {"label", "helpfulness:3,correctness:4"}},
      {{"system", ""}, {"prompt_turns", {turn("User", "Tell me a joke.")}}, {"label", "correctness:0"}},
      {{"system", "Be brief."}, {"prompt_turns", {turn("User", "Say yes.")}}, {"label", "helpfulness:2"}}};
}

std::string prepare_args(const std::string& model, const std::string& rm, const std::string& prompts,
                         const std::string& out) {
  return "steerlm2 prepare model.path=" + model + " attribute_model.path=" + rm + " data.prompts=" + prompts +
         " out=" + out + " model.device=cpu gen.num_samples=3 gen.max_new_tokens=6 batch_size=4";
}

// prepare -> train -> prepare from the trained model: the data holds the log-probs as defined, the
// first step's b' is uniform (log Q' is on the tokens training reads), and the loop iterates.
TEST(Steerlm2, PrepareTrainAndPrepareAgainFromTheTrainedModel) {
  const auto d = temp_dir("steerlm2_e2e");
  const std::string rm = attribute_model(d);
  const std::string prompts = write_lines(d / "prompts.jsonl", prompt_lines());
  const auto data = d / "iter1.jsonl";
  const auto p = run_aligner(prepare_args(kDemoModel, rm, prompts, data.string()));
  ASSERT_EQ(p.status, 0) << p.output;
  const auto lines = read_lines(data);
  ASSERT_EQ(lines.size(), 4u);
  for (size_t i = 0; i < lines.size(); ++i) {
    EXPECT_EQ(lines[i]["label"], prompt_lines()[i]["label"]);
    ASSERT_EQ(lines[i]["responses"].size(), 3u);
    for (const auto& r : lines[i]["responses"]) {
      EXPECT_EQ(r["from"], "Assistant");
      for (const char* key : {kLogPAttributes, kLogPResponse, kLogQResponse}) {
        EXPECT_TRUE(std::isfinite(r[key].get<double>())) << r;
        EXPECT_LT(r[key].get<double>(), 0) << r;
      }
    }
  }

  // log P(a|x,y) of the first response: the attribute model's predictions for the conversation in the
  // nemo template, scored by attribute_log_prob.
  {
    const auto m = load_transformer(rm, at::kCPU);
    const auto tok = load_tokenizer(rm);
    Conversation c;
    c.system = "A chat.";
    c.messages = {{"user", "What is 2+2?", ""},
                  {"assistant", lines[0]["responses"][0]["value"].get<std::string>(), ""}};
    const auto ids = render_tokens(resolve_chat_template("nemo", *tok), c, false, *tok).ids;
    at::NoGradGuard no_grad;
    const auto scores = score_batch(m, collate_padded({{ids, std::vector<uint8_t>(ids.size(), 0)}}, 0));
    const std::vector<float> predicted = {scores[0][0].item<float>(), scores[0][1].item<float>()};
    EXPECT_NEAR(lines[0]["responses"][0][kLogPAttributes].get<double>(),
                attribute_log_prob(predicted, {4.0f, 0.0f}, {1, 0}, 1.0, 4), 1e-4);
  }

  // unconditional_model names P(y|x) apart: the same model there gives the same numbers.
  {
    const auto apart = d / "apart.jsonl";
    const auto a = run_aligner(prepare_args(kDemoModel, rm, prompts, apart.string()) +
                               " unconditional_model=" + kDemoModel);
    ASSERT_EQ(a.status, 0) << a.output;
    EXPECT_EQ(read_lines(apart), lines);
  }

  // Training starts at Q' itself, so b' is uniform and the first step's kl is KL(w' || uniform).
  const auto out = d / "run";
  const auto t =
      run_aligner("steerlm2 model.path=" + kDemoModel + " data.train=" + data.string() +
                  " model.device=cpu trainer.max_steps=3 trainer.micro_batch_size=2 "
                  "trainer.global_batch_size=4 optim.lr=1e-3 optim.scheduler=constant output_dir=" +
                  out.string());
  ASSERT_EQ(t.status, 0) << t.output;
  double kl_uniform = 0;
  for (const auto& l : lines) {
    std::vector<double> log_w;
    for (const auto& r : l["responses"])
      log_w.push_back(r[kLogPAttributes].get<double>() + r[kLogPResponse].get<double>() -
                      r[kLogQResponse].get<double>());
    for (size_t i = 0; i < log_w.size(); ++i) {
      const double w = softmax_at(log_w, i);
      kl_uniform += (w + 1e-8) * std::log((w + 1e-8) / (1.0 / 3 + 1e-8)) / double(lines.size());
    }
  }
  const auto rows = metrics(out);
  ASSERT_EQ(rows.size(), 3u);
  EXPECT_NEAR(rows[0]["kl"].get<double>(), kl_uniform, 1e-3) << rows[0];
  for (const auto& row : rows) {
    EXPECT_TRUE(std::isfinite(row["loss"].get<double>())) << row;
    EXPECT_GT(row["nll"].get<double>(), 0) << row;
    EXPECT_GT(row["response_length"].get<double>(), 0) << row;
  }
  // With an update in between, b' has moved away from uniform.
  EXPECT_NE(rows[2]["kl"].get<double>(), rows[0]["kl"].get<double>());
  ASSERT_TRUE(fs::exists(out / "final" / "config.json"));

  // The next iteration samples from the trained model, reading the last output as its prompts.
  const auto next = d / "iter2.jsonl";
  const auto p2 = run_aligner(prepare_args((out / "final").string(), rm, data.string(), next.string()));
  ASSERT_EQ(p2.status, 0) << p2.output;
  const auto lines2 = read_lines(next);
  ASSERT_EQ(lines2.size(), 4u);
  for (const auto& l : lines2) EXPECT_EQ(l["responses"].size(), 3u);
  fs::remove_all(d);
}

// Bad input stops both commands with one line naming the file, line, field and attribute.
TEST(Steerlm2, CommandsRefuseBadLinesNamingTheAttribute) {
  const auto d = temp_dir("steerlm2_errors");
  const std::string rm = attribute_model(d);
  auto lines = prompt_lines();
  lines[2]["label"] = "helpfulness:4,correctness:lots";
  const auto prompts = write_lines(d / "prompts.jsonl", lines);
  auto r = run_aligner(prepare_args(kDemoModel, rm, prompts, (d / "out.jsonl").string()));
  EXPECT_NE(r.status, 0);
  EXPECT_NE(
      r.output.find(prompts + ":3: field \"label\": attribute \"correctness\": \"lots\" is not a number"),
      std::string::npos)
      << r.output;
  lines[2]["label"] = "helpfulness:7";
  write_lines(d / "prompts.jsonl", lines);
  r = run_aligner(prepare_args(kDemoModel, rm, prompts, (d / "out.jsonl").string()));
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find(prompts +
                          ":3: field \"label\": attribute \"helpfulness\": 7 is not one of the values 0..4"),
            std::string::npos)
      << r.output;
  lines[2]["label"] = "verbosity:2";  // not one of the attribute model's outputs
  write_lines(d / "prompts.jsonl", lines);
  r = run_aligner(prepare_args(kDemoModel, rm, prompts, (d / "out.jsonl").string()));
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find(prompts + ":3: field \"label\": unknown attribute \"verbosity\""),
            std::string::npos)
      << r.output;

  auto train = training_lines();
  train[4]["responses"][1].erase(kLogPAttributes);
  const auto data = write_lines(d / "train.jsonl", train);
  r = run_aligner("steerlm2 model.path=" + tiny_model() + " data.train=" + data +
                  " model.device=cpu trainer.max_steps=1 output_dir=" + (d / "run").string());
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find(data + ":5: missing field \"responses[1].log(P(a|x,y))\""), std::string::npos)
      << r.output;
  fs::remove_all(d);
}

// The shared trainer's resume: a run killed after a checkpoint ends where an uninterrupted one does.
TEST(Steerlm2, KilledRunResumesToTheSameWeights) {
  const auto d = temp_dir("steerlm2_resume");
  const auto data = write_lines(d / "train.jsonl", training_lines());
  auto args = [&](const fs::path& out) {
    return "steerlm2 model.path=" + tiny_model() + " data.train=" + data +
           " model.device=cpu trainer.max_steps=4 trainer.micro_batch_size=1 trainer.global_batch_size=2 "
           "trainer.save_interval=2 optim.lr=1e-3 trainer.seed=3 output_dir=" +
           out.string();
  };
  run_whole_and_killed(args, d / "whole", d / "killed", 3);
  expect_same_weights(d / "whole" / "final", d / "killed" / "final");
  const auto a = metrics(d / "whole"), b = metrics(d / "killed");
  ASSERT_EQ(a.size(), 4u);
  ASSERT_EQ(b.size(), 4u);
  for (size_t i = 0; i < 4; ++i) {
    EXPECT_EQ(a[i]["loss"].get<double>(), b[i]["loss"].get<double>()) << i;
    EXPECT_EQ(a[i]["kl"].get<double>(), b[i]["kl"].get<double>()) << i;
  }
  fs::remove_all(d);
}

}  // namespace
