// Reward models: classifier configs and heads, the score read at the last token that is not
// padding, the Bradley-Terry loss, pairwise training on real pairs, regression on NeMo's attribute
// data, the saved Hugging Face folder, and `aligner rm-score`.
#include <gtest/gtest.h>

#include <cmath>

#include "algo/rm.h"
#include "core/error.h"
#include "data/attribute_data.h"
#include "io/jsonl.h"
#include "io/safetensors.h"
#include "run_outputs.h"
#include "test_util.h"
#include "text/chat_template.h"
#include "text/tokenizer.h"

using namespace aligner;
using namespace aligner::test;
namespace fs = std::filesystem;

namespace {

const std::string kHh = kRoot + "/examples/data/hh-rlhf/harmless-test-600.jsonl";
const std::string kDummyDpo = kRoot + "/examples/data/nemo-aligner/dummy-dpo.jsonl";
const std::string kTestRm = kRoot + "/examples/data/nemo-aligner/test-rm.jsonl";

nlohmann::json tiny_config() {
  return {{"model_type", "llama"},       {"vocab_size", 100},       {"hidden_size", 16},
          {"intermediate_size", 32},     {"num_hidden_layers", 1},  {"num_attention_heads", 2},
          {"tie_word_embeddings", true}, {"torch_dtype", "float32"}};
}

Sequence unlabelled(std::vector<int32_t> ids) {
  return {ids, std::vector<uint8_t>(ids.size(), 0)};
}

// `aligner rm` for two steps from the tiny random model on NeMo's DPO pairs; returns OUT/final.
fs::path train_tiny_reward_model(const fs::path& out) {
  const auto r = run_aligner(
      "rm model.path=" + tiny_model() + " data.train=" + kDummyDpo +
      " model.device=cpu trainer.max_steps=2 trainer.micro_batch_size=4 trainer.global_batch_size=4"
      " optim.lr=1e-3 output_dir=" +
      out.string());
  EXPECT_EQ(r.status, 0) << r.output;
  return out / "final";
}

TEST(Rm, BradleyTerryLossMatchesDirectComputation) {
  const std::vector<double> c = {1.0, -0.5, 2.0, 0.0}, r = {0.5, 0.5, -1.0, 0.0}, m = {0.0, 1.0, 0.5, 0.0};
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  const auto got = bradley_terry_loss(at::tensor(c, opts), at::tensor(r, opts), at::tensor(m, opts));
  for (size_t i = 0; i < c.size(); ++i)
    EXPECT_NEAR(got[int64_t(i)].item<double>(), std::log1p(std::exp(-(c[i] - r[i] - m[i]))), 1e-12) << i;
  EXPECT_NEAR(got[3].item<double>(), std::log(2.0), 1e-12);
}

TEST(Rm, ClassifierConfigsReadAndWriteLikeTransformers) {
  auto j = tiny_config();
  EXPECT_EQ(parse_model_config(j, "lm").num_labels, 0);
  j["architectures"] = {"LlamaForSequenceClassification"};
  EXPECT_EQ(parse_model_config(j, "default").num_labels, 2);  // transformers' default
  j["num_labels"] = 3;
  EXPECT_EQ(parse_model_config(j, "n").labels, (std::vector<std::string>{"LABEL_0", "LABEL_1", "LABEL_2"}));
  j["id2label"] = {{"1", "correctness"}, {"0", "helpfulness"}};
  EXPECT_THROW(parse_model_config(j, "mismatch"), Error);
  j.erase("num_labels");
  const auto c = parse_model_config(j, "named");
  EXPECT_EQ(c.num_labels, 2);
  EXPECT_EQ(c.labels, (std::vector<std::string>{"helpfulness", "correctness"}));

  const auto lm = parse_model_config(tiny_config(), "lm");
  const auto rm = sequence_classifier_config(lm, {"reward"}, 7);
  EXPECT_EQ(rm.raw["architectures"], nlohmann::json({"LlamaForSequenceClassification"}));
  EXPECT_EQ(rm.raw["num_labels"], 1);
  EXPECT_EQ(rm.raw["id2label"], nlohmann::json({{"0", "reward"}}));
  EXPECT_EQ(rm.raw["label2id"], nlohmann::json({{"reward", 0}}));
  EXPECT_EQ(rm.raw["pad_token_id"], 7);
  const auto back = parse_model_config(rm.raw, "written");
  EXPECT_EQ(back.num_labels, 1);
  EXPECT_EQ(back.pad_token_id, 7);
  EXPECT_THROW(sequence_classifier_config(lm, {"a", "a"}, 0), Error);
  auto qwen = tiny_config();
  qwen["model_type"] = "qwen2";
  EXPECT_EQ(sequence_classifier_config(parse_model_config(qwen, "q"), {"r"}, 0).raw["architectures"][0],
            "Qwen2ForSequenceClassification");
}

TEST(Rm, RewardModelFromACausalLmKeepsTheBodyAndDrawsAHead) {
  const auto lm = load_transformer(tiny_model(), at::kCPU);
  const auto m = load_reward_model(tiny_model(), at::kCPU, std::nullopt, {"reward"}, 3, 11);
  EXPECT_TRUE(m.embed.equal(lm.embed));
  EXPECT_TRUE(m.layers[1].down.weight.equal(lm.layers[1].down.weight));
  EXPECT_FALSE(m.lm_head.weight.defined());
  EXPECT_THROW(lm_logits(m, at::zeros({1, 64})), Error);
  ASSERT_EQ(m.score.weight.sizes(), at::IntArrayRef({1, 64}));
  const double want = 1 / std::sqrt(65.0);
  EXPECT_NEAR(m.score.weight.std().item<double>(), want, 0.35 * want);
  EXPECT_EQ(m.cfg.pad_token_id, 3);
  const auto names = named_parameters(m);
  EXPECT_EQ(names.back().first, "score.weight");
  for (const auto& [name, t] : names) EXPECT_NE(name, "lm_head.weight");
  const auto again = load_reward_model(tiny_model(), at::kCPU, std::nullopt, {"reward"}, 3, 11);
  EXPECT_TRUE(again.score.weight.equal(m.score.weight));
  EXPECT_FALSE(load_reward_model(tiny_model(), at::kCPU, std::nullopt, {"reward"}, 3, 12)
                   .score.weight.equal(m.score.weight));
}

// Right padding is masked out, and a row's own trailing pad_token_id tokens are skipped, as
// transformers' XxxForSequenceClassification skips them.
TEST(Rm, ScoreIsReadAtTheLastTokenThatIsNotPadding) {
  const auto m = load_reward_model(tiny_model(), at::kCPU, std::nullopt, {"a", "b"}, 3, 11);
  const std::vector<std::vector<int32_t>> rows = {{5, 6, 7, 8, 9}, {10, 11}, {12, 13, 14, 3, 3}};
  const std::vector<int64_t> read_at = {4, 1, 2};
  std::vector<Sequence> seqs;
  for (const auto& r : rows) seqs.push_back(unlabelled(r));
  at::NoGradGuard no_grad;
  const auto batched = score_batch(m, collate_padded(seqs, 0));
  ASSERT_EQ(batched.sizes(), at::IntArrayRef({3, 2}));
  for (size_t i = 0; i < rows.size(); ++i) {
    ForwardInput in{at::tensor(std::vector<int64_t>(rows[i].begin(), rows[i].end())).unsqueeze(0)};
    const auto h = forward_hidden(m, in)[0][read_at[i]];
    const auto want = at::matmul(m.score.weight, h);
    EXPECT_TRUE(at::allclose(batched[int64_t(i)], want, 1e-5, 1e-5))
        << i << ": " << batched[int64_t(i)] << want;
  }
}

// The demo model on real preference pairs: a dozen steps raise the accuracy on held-out pairs.
TEST(Rm, PairwiseTrainingRaisesHeldOutAccuracyOnRealData) {
  const auto out = temp_dir("rm_hh");
  copy_lines(kHh, out / "train.jsonl", 0, 540);
  copy_lines(kHh, out / "val.jsonl", 540, 600);
  const auto r = run_aligner(
      "rm model.path=" + kRoot + "/examples/models/tiny-llama data.train=" + (out / "train.jsonl").string() +
      " data.validation=" + (out / "val.jsonl").string() +
      " data.skip_bad_lines=true data.max_length=128 model.device=cpu trainer.max_steps=12"
      " trainer.micro_batch_size=16 trainer.global_batch_size=16 trainer.val_interval=12"
      " optim.lr=3e-4 optim.scheduler=constant trainer.seed=1 output_dir=" +
      (out / "run").string());
  ASSERT_EQ(r.status, 0) << r.output;
  const auto val = metrics(out / "run", "validation");
  ASSERT_EQ(val.size(), 2u);
  const double before = val[0]["accuracy"].get<double>(), after = val[1]["accuracy"].get<double>();
  EXPECT_GT(after, 0.55);
  EXPECT_GT(after, before + 0.1);
  EXPECT_GT(val[1]["reward_margin"].get<double>(), 0.0);
  for (const char* key : {"accuracy", "reward_chosen_mean", "reward_rejected_mean", "reward_margin"})
    EXPECT_TRUE(metrics(out / "run")[0].contains(key)) << key;
  fs::remove_all(out);
}

// Two validation pairs and micro-batches of two leave rank 1 of two without a validation batch; it
// must still join the reduction of the metrics, which then match one rank's.
TEST(Rm, TwoRanksWithAValidationSetSmallerThanOneBatchPerRankMatchOne) {
  const auto out = temp_dir("rm_small_val");
  copy_lines(kDummyDpo, out / "val.jsonl", 0, 2);
  const std::string args = "rm model.path=" + tiny_model() + " data.train=" + kDummyDpo +
                           " data.validation=" + (out / "val.jsonl").string() +
                           " model.device=cpu trainer.max_steps=2 trainer.micro_batch_size=2"
                           " trainer.global_batch_size=4 trainer.val_interval=2 optim.lr=1e-3"
                           " optim.scheduler=constant output_dir=";
  const auto one = run_aligner(args + (out / "one").string());
  ASSERT_EQ(one.status, 0) << one.output;
  const auto two = run_aligner_on_two_ranks(args + (out / "two").string(), 29850);
  if (two.output.find("needs Gloo") != std::string::npos)
    GTEST_SKIP() << "this libtorch has no Gloo for CPU ranks";
  ASSERT_EQ(two.status, 0) << two.output;
  const auto a = metrics(out / "one", "validation"), b = metrics(out / "two", "validation");
  ASSERT_EQ(a.size(), 2u);
  ASSERT_EQ(b.size(), 2u);
  for (size_t i = 0; i < 2; ++i)
    for (const char* key :
         {"loss", "accuracy", "reward_chosen_mean", "reward_rejected_mean", "reward_margin"}) {
      ASSERT_TRUE(b[i].contains(key)) << key;
      EXPECT_NEAR(a[i][key].get<double>(), b[i][key].get<double>(), 1e-5) << i << " " << key;
    }
  fs::remove_all(out);
}

// The folder is what transformers loads as LlamaForSequenceClassification (scripts/
// check_reward_model.py compares the scores there), and reads back to the same model.
TEST(Rm, SavedFolderIsASequenceClassifierThatReloadsIdentically) {
  const auto out = temp_dir("rm_saved");
  const auto final_dir = train_tiny_reward_model(out / "run");
  std::ifstream f(final_dir / "config.json");
  const auto cfg = nlohmann::json::parse(f);
  EXPECT_EQ(cfg["architectures"], nlohmann::json({"LlamaForSequenceClassification"}));
  EXPECT_EQ(cfg["num_labels"], 1);
  EXPECT_EQ(cfg["id2label"], nlohmann::json({{"0", "reward"}}));
  EXPECT_EQ(cfg["pad_token_id"], pad_id_for(*load_tokenizer(final_dir.string())));
  EXPECT_TRUE(fs::exists(final_dir / "tokenizer.json"));
  auto st = safetensors::File::open((final_dir / "model.safetensors").string());
  bool has_score = false;
  for (const auto& info : st.tensors()) {
    EXPECT_NE(info.name, "lm_head.weight");
    if (info.name == "score.weight") {
      has_score = true;
      EXPECT_EQ(info.shape, (std::vector<int64_t>{1, 64}));
    }
  }
  EXPECT_TRUE(has_score);

  const auto a = load_transformer(final_dir.string(), at::kCPU);
  save_transformer(a, (out / "copy").string());
  const auto b = load_transformer((out / "copy").string(), at::kCPU);
  EXPECT_EQ(a.cfg.raw, b.cfg.raw);
  EXPECT_EQ(b.cfg.labels, std::vector<std::string>{"reward"});
  const auto pa = named_parameters(a), pb = named_parameters(b);
  ASSERT_EQ(pa.size(), pb.size());
  for (size_t i = 0; i < pa.size(); ++i) EXPECT_TRUE(pa[i].second.equal(pb[i].second)) << pa[i].first;
  at::NoGradGuard no_grad;
  const auto batch = collate_padded({unlabelled({1, 20, 30, 40}), unlabelled({1, 50})}, 0);
  EXPECT_TRUE(score_batch(a, batch).equal(score_batch(b, batch)));
  // Training goes on from a reward model folder with its head; its number of outputs must match.
  const auto again = load_reward_model(final_dir.string(), at::kCPU, std::nullopt, {"reward"}, 0, 5);
  EXPECT_TRUE(again.score.weight.equal(a.score.weight));
  EXPECT_THROW(load_reward_model(final_dir.string(), at::kCPU, std::nullopt, {"x", "y"}, 0, 5), Error);
  fs::remove_all(out);
}

TEST(Rm, ScoreCommandMatchesInProcessScores) {
  const auto out = temp_dir("rm_score");
  const auto model_dir = train_tiny_reward_model(out / "run");
  const std::vector<nlohmann::json> records = {
      {{"prompt", "What is 2+2?"}, {"response", "4"}},
      {{"prompt", {{{"role", "user"}, {"content", "Hi"}}}},
       {"response", "Hello there, how can I help you today?"}},
      {{"messages",
        {{{"role", "user"}, {"content", "Tell me a joke"}}, {{"role", "assistant"}, {"content", "No."}}}}},
      {{"text", "A plain text to score, somewhat longer than the others so that the rows get padded."}},
      {{"input_ids", {1, 50, 60, 70}}}};
  {
    std::ofstream f(out / "score.jsonl");
    for (const auto& r : records) f << r.dump() << "\n";
  }
  const auto r = run_aligner("rm-score --model " + model_dir.string() + " --data " +
                             (out / "score.jsonl").string() + " --batch-size 3 --device cpu");
  ASSERT_EQ(r.status, 0) << r.output;
  const auto rows = json_lines(r.output);
  ASSERT_EQ(rows.size(), records.size()) << r.output;
  const auto m = load_transformer(model_dir.string(), at::kCPU);
  const auto tok = load_tokenizer(model_dir.string());
  const Encoder enc{tok.get(), resolve_chat_template("auto", *tok), true};
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < records.size(); ++i) {
    EXPECT_EQ(rows[i]["index"], i);
    std::vector<int32_t> ids;
    if (records[i].contains("input_ids"))
      ids = records[i]["input_ids"].get<std::vector<int32_t>>();
    else
      ids = scoring_tokens(records[i], "record", enc);
    const double want = score_batch(m, collate_padded({unlabelled(ids)}, 0))[0][0].item<double>();
    EXPECT_NEAR(rows[i]["reward"].get<double>(), want, 1e-5) << rows[i];
  }
  const auto lm =
      run_aligner("rm-score --model " + tiny_model() + " --data " + (out / "score.jsonl").string());
  EXPECT_NE(lm.status, 0);
  EXPECT_NE(lm.output.find("is not a reward model"), std::string::npos) << lm.output;
  fs::remove_all(out);
}

// NeMo's regression data labels 5 of its 9 attributes (-100 for the others): the squared error of
// the labelled ones falls, each attribute's reported error is its exact mean over its labels, and
// rm-score reports every attribute by name.
TEST(Rm, RegressionLowersMseOnNemoAttributeData) {
  const auto out = temp_dir("rm_regression");
  const auto r = run_aligner("rm rm.type=regression model.path=" + tiny_model() + " data.train=" + kTestRm +
                             " data.validation=" + kTestRm +
                             " data.max_length=384 data.add_eos=false model.device=cpu trainer.max_steps=8"
                             " trainer.max_epochs=0 trainer.micro_batch_size=3 trainer.global_batch_size=6"
                             " trainer.val_interval=8 optim.lr=1e-2 optim.scheduler=constant output_dir=" +
                             (out / "run").string());
  ASSERT_EQ(r.status, 0) << r.output;
  const auto val = metrics(out / "run", "validation");
  ASSERT_EQ(val.size(), 2u);
  EXPECT_LT(val[1]["loss"].get<double>(), 0.5 * val[0]["loss"].get<double>());
  for (const char* missing : {"mse_quality", "mse_toxicity", "mse_humor", "mse_creativity"})
    EXPECT_FALSE(val[1].contains(missing)) << missing;

  // Each attribute's mean squared error, computed here over the whole file with the final model.
  const auto model_dir = out / "run" / "final";
  const auto m = load_transformer(model_dir.string(), at::kCPU);
  const auto tok = load_tokenizer(model_dir.string());
  DataOptions opt;
  opt.max_length = 384;
  opt.add_eos = false;
  auto ds =
      open_attribute_dataset(kTestRm, *tok, resolve_chat_template("auto", *tok), opt, nemo_attributes());
  std::vector<double> sum(9, 0.0), count(9, 0.0);
  at::NoGradGuard no_grad;
  for (int64_t i = 0; i < dataset_size(ds); ++i) {
    const auto ex = attribute_example(ds, i);
    ASSERT_TRUE(ex);
    const auto s = score_batch(m, collate_padded({unlabelled(ex->input_ids)}, 0))[0];
    for (size_t a = 0; a < 9; ++a)
      if (ex->present[a]) {
        sum[a] += std::pow(s[int64_t(a)].item<double>() - ex->values[a], 2);
        count[a] += 1;
      }
  }
  for (size_t a = 4; a < 9; ++a) {
    const std::string key = "mse_" + nemo_attributes()[a];
    ASSERT_TRUE(val[1].contains(key)) << key;
    EXPECT_NEAR(val[1][key].get<double>(), sum[a] / count[a], 1e-4 * (1 + sum[a] / count[a])) << key;
  }

  // rm-score reads the whole text (training cut it to max_length); three records keep this quick.
  copy_lines(kTestRm, out / "three.jsonl", 0, 3);
  const auto scored = run_aligner("rm-score --no-eos --device cpu --model " + model_dir.string() +
                                  " --data " + (out / "three.jsonl").string());
  ASSERT_EQ(scored.status, 0) << scored.output;
  const auto rows = json_lines(scored.output);
  ASSERT_EQ(rows.size(), 3u) << scored.output;
  const Encoder enc{tok.get(), resolve_chat_template("auto", *tok), false};
  JsonlFile file((out / "three.jsonl").string());
  for (int64_t i = 0; i < 3; ++i) {
    const auto& rewards = rows[i]["rewards"];
    ASSERT_EQ(rewards.size(), 9u) << rows[i];
    const auto ids = scoring_tokens(file.read(i), file.where(i), enc);
    const auto s = score_batch(m, collate_padded({unlabelled(ids)}, 0))[0];
    for (size_t a = 0; a < 9; ++a)
      EXPECT_NEAR(rewards[nemo_attributes()[a]].get<double>(), s[int64_t(a)].item<double>(), 1e-4) << rows[i];
  }
  fs::remove_all(out);
}

}  // namespace
