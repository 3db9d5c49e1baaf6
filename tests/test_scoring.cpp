// `aligner perplexity` and `aligner rm-score` as a user runs them: perplexity over sequences longer
// than the context (an error, or Hugging Face's strided windows), over no predicted token, and a
// reward model's accuracy on the preference layouts `aligner rm` trains on.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "algo/rm.h"
#include "data/packing.h"
#include "data/preference_data.h"
#include "run_outputs.h"
#include "test_util.h"

namespace aligner {
namespace {

namespace fs = std::filesystem;
using test::json_lines;
using test::run_aligner;
using test::tiny_model;

std::string write_lines(const fs::path& path, const std::vector<nlohmann::json>& records) {
  std::ofstream f(path);
  for (const auto& r : records) f << r.dump() << "\n";
  return path.string();
}

std::vector<int32_t> random_ids(int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> id(0, 5999);
  std::vector<int32_t> out(size_t(n), 0);
  for (auto& t : out) t = id(rng);
  return out;
}

// Hugging Face's perplexity guide, step by step: windows of max_length tokens every `stride`
// tokens, the labels of all but the last trg_len tokens of a window set to -100, the first label
// lost to the shift.
double strided_logprob(const Transformer& m, const std::vector<int32_t>& ids, int64_t max_length,
                       int64_t stride) {
  at::NoGradGuard no_grad;
  const int64_t seq_len = int64_t(ids.size());
  double total = 0;
  int64_t prev_end = 0;
  for (int64_t begin = 0; begin < seq_len; begin += stride) {
    const int64_t end = std::min(begin + max_length, seq_len);
    const int64_t trg_len = end - prev_end;
    const auto x = at::tensor(std::vector<int64_t>(ids.begin() + begin, ids.begin() + end), at::kLong);
    const auto logp =
        at::log_softmax(lm_logits(m, forward_hidden(m, {x.unsqueeze(0)})).to(at::kDouble), -1)[0];
    for (int64_t t = end - trg_len; t < end; ++t)
      if (t > begin) total += logp[t - begin - 1][ids[size_t(t)]].item<double>();
    prev_end = end;
    if (end == seq_len) break;
  }
  return total;
}

TEST(Perplexity, StridedWindowsMatchHuggingFacesComputation) {
  const std::string model = tiny_model(16);
  const auto d = test::temp_dir("ppl_stride");
  const std::vector<std::vector<int32_t>> seqs = {random_ids(40, 1), random_ids(10, 2), random_ids(16, 3),
                                                  random_ids(17, 4)};
  std::vector<nlohmann::json> records;
  for (const auto& s : seqs) records.push_back({{"input_ids", s}});
  const std::string data = write_lines(d / "long.jsonl", records);

  const auto r = run_aligner("perplexity --model " + model + " --data " + data +
                             " --stride 5 --device cpu --batch-size 3");
  ASSERT_EQ(r.status, 0) << r.output;
  const auto rows = json_lines(r.output);
  ASSERT_EQ(rows.size(), seqs.size() + 1) << r.output;
  const auto m = load_transformer(model, at::kCPU);
  double total = 0;
  int64_t predicted = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    const double want = strided_logprob(m, seqs[i], 16, 5);
    EXPECT_EQ(rows[i]["index"], i);
    EXPECT_EQ(rows[i]["tokens"], seqs[i].size());
    EXPECT_NEAR(rows[i]["logprob"].get<double>(), want, 1e-3) << i;
    total += want;
    predicted += int64_t(seqs[i].size()) - 1;
  }
  // Sequences within the context are scored whole, as without a stride.
  EXPECT_NEAR(rows[1]["logprob"].get<double>(), strided_logprob(m, seqs[1], 16, 15), 1e-3);
  const auto& summary = rows.back();
  EXPECT_EQ(summary["predicted_tokens"], predicted);
  EXPECT_NEAR(summary["perplexity"].get<double>(), std::exp(-total / double(predicted)), 1e-3);

  // The same as keys.
  const auto keys = run_aligner("perplexity model.path=" + model + " data.path=" + data +
                                " stride=5 model.device=cpu batch_size=3");
  ASSERT_EQ(keys.status, 0) << keys.output;
  EXPECT_EQ(json_lines(keys.output), rows);
}

// Past max_position_embeddings the model computes positions it was never trained on: an error
// naming the line and the limit, unless a stride is given.
TEST(Perplexity, LongerThanTheContextIsAnErrorWithoutStride) {
  const std::string model = tiny_model(16);
  const auto d = test::temp_dir("ppl_long");
  const std::string data =
      write_lines(d / "long.jsonl", {{{"input_ids", random_ids(16, 1)}}, {{"input_ids", random_ids(17, 2)}}});
  auto r = run_aligner("perplexity --device cpu --model " + model + " --data " + data);
  EXPECT_EQ(r.status, 1);
  EXPECT_EQ(r.output, "error: " + data +
                          ":2: 17 tokens, more than the model's max_position_embeddings (16); --stride N "
                          "(stride=N) scores it in windows\n");
  r = run_aligner("perplexity --device cpu --model " + model + " --data " + data + " --stride 16");
  EXPECT_EQ(r.status, 1);
  EXPECT_EQ(
      r.output,
      "error: config key 'stride' must be less than the model's max_position_embeddings (16), got 16\n");
}

// exp(0 / 0) is no number; 1.0 would claim a perfect model.
TEST(Perplexity, NoPredictedTokenMeansNoPerplexity) {
  const auto d = test::temp_dir("ppl_none");
  const std::string data = write_lines(d / "one.jsonl", {{{"input_ids", {5}}}, {{"input_ids", {7}}}});
  const auto r = run_aligner("perplexity --device cpu --model " + tiny_model() + " --data " + data);
  ASSERT_EQ(r.status, 0) << r.output;
  const auto rows = json_lines(r.output);
  ASSERT_EQ(rows.size(), 3u) << r.output;
  EXPECT_EQ(rows[0]["logprob"], 0.0);
  const auto& summary = rows[2];
  EXPECT_EQ(summary["predicted_tokens"], 0);
  EXPECT_TRUE(summary["perplexity"].is_null()) << summary;
  EXPECT_TRUE(summary["mean_nll"].is_null()) << summary;
  EXPECT_NE(r.output.find("no token is predicted and there is no perplexity"), std::string::npos) << r.output;
}

// Pairs in every layout `aligner rm` reads; the scores, accuracy and means are those of each
// sequence scored alone.
TEST(RmScore, PairsGiveChosenRejectedAndAccuracy) {
  const auto d = test::temp_dir("rm_score_pairs");
  const std::vector<nlohmann::json> pairs = {
      {{"prompt", "What is 2+2?"}, {"chosen", "4"}, {"rejected", "5, or maybe 6"}},
      {{"prompt", {{{"role", "user"}, {"content", "Hi"}}}},
       {"chosen", {{{"role", "assistant"}, {"content", "Hello! How can I help?"}}}},
       {"rejected", {{{"role", "assistant"}, {"content", "Go away."}}}}},
      {{"prompt", "Name a colour."}, {"chosen_response", "Blue."}, {"rejected_response", "Seven."}},
      {{"chosen", "\n\nHuman: Tell me a joke\n\nAssistant: Why did the chicken cross the road?"},
       {"rejected", "\n\nHuman: Tell me a joke\n\nAssistant: No."}},
      {{"prompt", "Say yes."}, {"chosen", "Yes."}, {"rejected", "No."}}};
  const std::string data = write_lines(d / "pairs.jsonl", pairs);
  for (const std::vector<std::string>& labels :
       {std::vector<std::string>{"reward"}, std::vector<std::string>{"helpfulness", "verbosity"}}) {
    const auto model_dir = d / ("rm" + std::to_string(labels.size()));
    const auto m = load_reward_model(tiny_model(), at::kCPU, std::nullopt, labels, 3, 11);
    save_transformer(m, model_dir.string(), std::nullopt, 0, tiny_model());

    const auto r = run_aligner("rm-score --model " + model_dir.string() + " --data " + data +
                               " --batch-size 2 --device cpu");
    ASSERT_EQ(r.status, 0) << r.output;
    const auto rows = json_lines(r.output);
    ASSERT_EQ(rows.size(), pairs.size() + 1) << r.output;

    const auto tok = load_tokenizer(model_dir.string());
    DataOptions opt;
    opt.max_length = 512;
    auto ds = open_preference_dataset(data, *tok, resolve_chat_template("auto", *tok), opt);
    at::NoGradGuard no_grad;
    auto score = [&](const Sequence& s) { return score_batch(m, collate_padded({s}, 3))[0]; };
    // Per label: the sums of chosen and rejected rewards, and the pairs ranked right.
    std::vector<double> chosen(labels.size()), rejected(labels.size()), right(labels.size());
    for (size_t i = 0; i < pairs.size(); ++i) {
      const auto ex = preference_example(ds, int64_t(i));
      ASSERT_TRUE(ex);
      const auto c = score(ex->chosen), j = score(ex->rejected);
      EXPECT_EQ(rows[i]["index"], i);
      for (size_t a = 0; a < labels.size(); ++a) {
        const double cv = c[int64_t(a)].item<double>(), rv = j[int64_t(a)].item<double>();
        const auto& got = rows[i];
        const double got_c =
            labels.size() == 1 ? got["chosen"].get<double>() : got["chosen"][labels[a]].get<double>();
        const double got_r =
            labels.size() == 1 ? got["rejected"].get<double>() : got["rejected"][labels[a]].get<double>();
        EXPECT_NEAR(got_c, cv, 1e-5) << got;
        EXPECT_NEAR(got_r, rv, 1e-5) << got;
        chosen[a] += cv;
        rejected[a] += rv;
        right[a] += cv > rv;
      }
    }
    const auto& summary = rows.back();
    EXPECT_EQ(summary["pairs"], pairs.size()) << summary;
    const double n = double(pairs.size());
    for (size_t a = 0; a < labels.size(); ++a) {
      auto value = [&](const char* key) {
        return labels.size() == 1 ? summary[key].get<double>() : summary[key][labels[a]].get<double>();
      };
      EXPECT_NEAR(value("accuracy"), right[a] / n, 1e-12) << summary;
      EXPECT_NEAR(value("reward_chosen_mean"), chosen[a] / n, 1e-5) << summary;
      EXPECT_NEAR(value("reward_rejected_mean"), rejected[a] / n, 1e-5) << summary;
      EXPECT_NEAR(value("reward_margin"), (chosen[a] - rejected[a]) / n, 1e-5) << summary;
    }
  }

  // NeMo's paired text lines are never guessed (they look like lines to score), but can be named.
  const std::string text_pairs = write_lines(d / "text_pairs.jsonl", {{{"text", "Q: 2+2? A: 4"}},
                                                                      {{"text", "Q: 2+2? A: 5"}},
                                                                      {{"text", "Hi. Hello!"}},
                                                                      {{"text", "Hi. Go away."}}});
  const std::string model_dir = (d / "rm1").string();
  auto r = run_aligner("rm-score --device cpu --model " + model_dir + " --data " + text_pairs);
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(json_lines(r.output).size(), 4u);
  r = run_aligner("rm-score --device cpu --model " + model_dir + " --data " + text_pairs +
                  " data.format=text_pairs");
  ASSERT_EQ(r.status, 0) << r.output;
  const auto rows = json_lines(r.output);
  ASSERT_EQ(rows.size(), 3u) << r.output;
  EXPECT_EQ(rows[2]["pairs"], 2);
  r = run_aligner("rm-score --device cpu --model " + model_dir + " --data " + text_pairs +
                  " data.format=pair");
  EXPECT_EQ(r.status, 1);
  EXPECT_EQ(
      r.output,
      "error: config key 'data.format' expects auto, sequences, trl, nemo, hh or text_pairs, got 'pair'\n");
}

}  // namespace
}  // namespace aligner
