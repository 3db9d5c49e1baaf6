// Rejection sampling: the top-n selection against a direct computation, and `aligner rs` end to end
// on the tiny model with a random reward model: what it keeps beats the mean and the reward rises,
// rs.min_reward trains only on what reaches it, a killed run resumes to the same weights, two ranks
// match one, --generate-only writes each prompt's best in a layout that aligner sft trains on, and
// bad keys are one-line errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <csignal>
#include <fstream>
#include <map>

#include "algo/rs.h"
#include "data/packing.h"
#include "data/prompt_data.h"
#include "data/sft_data.h"
#include "io/hf_checkpoint.h"
#include "online_fixtures.h"
#include "reward/reward_model.h"
#include "run_outputs.h"
#include "test_util.h"
#include "text/tokenizer.h"

namespace aligner::test {
namespace {

namespace fs = std::filesystem;

// The positions a direct reading of the rule keeps: sample j of a prompt is kept when fewer than
// top_n of its samples beat it (a higher reward, or an equal one earlier; NaN below all), listed in
// the order of how many beat it.
std::vector<int64_t> direct_top_n(const std::vector<double>& r, int64_t group, int64_t top_n) {
  auto beats = [&](int64_t a, int64_t b) {
    const double x = std::isnan(r[a]) ? -INFINITY : r[a], y = std::isnan(r[b]) ? -INFINITY : r[b];
    return x > y || (x == y && a < b);
  };
  std::vector<int64_t> out;
  for (int64_t start = 0; start < int64_t(r.size()); start += group) {
    std::map<int64_t, int64_t> by_rank;
    for (int64_t j = start; j < start + group; ++j) {
      int64_t rank = 0;
      for (int64_t k = start; k < start + group; ++k) rank += beats(k, j);
      by_rank[rank] = j;
    }
    for (int64_t rank = 0; rank < top_n; ++rank) out.push_back(by_rank.at(rank));
  }
  return out;
}

TEST(RsSelect, TopNMatchesADirectComputation) {
  // Four prompts of five samples: distinct rewards, ties (the earlier wins), NaN, negatives.
  const std::vector<double> r = {0.5, -1.0, 2.0, 0.1,  1.9,   //
                                 3.0, 3.0,  1.0, 3.0,  -2.0,  //
                                 NAN, -5.0, NAN, -4.0, -5.0,  //
                                 7.0, 7.0,  7.0, 7.0,  7.0};
  for (int64_t n = 1; n <= 5; ++n) EXPECT_EQ(select_top_n(r, 5, n), direct_top_n(r, 5, n)) << "top_n " << n;
  EXPECT_EQ(select_top_n(r, 5, 1), (std::vector<int64_t>{2, 5, 13, 15}));
  EXPECT_EQ(select_top_n(r, 5, 2), (std::vector<int64_t>{2, 4, 5, 6, 13, 11, 15, 16}));
  EXPECT_NE(error_of([&] { select_top_n(r, 5, 6); }).find("groups of 5"), std::string::npos);
  EXPECT_NE(error_of([&] { select_top_n(r, 3, 1); }).find("groups of 3"), std::string::npos);
}

// ---- aligner rs end to end ----

// NeMo's PPO layout ("text") to train on, chat-style "prompt" strings held out; for
// --generate-only, every prompt layout that aligner sft can read back.
const fs::path& prompt_files() {
  static fs::path dir;
  if (dir.empty()) {
    dir = temp_dir("rs_prompts");
    const char* topics[] = {"the sea", "a cat", "rain", "music", "bread", "the moon", "a garden", "winter"};
    std::ofstream train(dir / "train.jsonl"), val(dir / "val.jsonl"), mixed(dir / "mixed.jsonl");
    for (int i = 0; i < 32; ++i)
      train << nlohmann::json{{"text", fmt::format("Tell me about {} ({})", topics[i % 8], i)}}.dump()
            << "\n";
    for (int i = 0; i < 8; ++i)
      val << nlohmann::json{{"prompt", fmt::format("Write a line on {}", topics[(i * 3) % 8])}}.dump()
          << "\n";
    using J = nlohmann::json;
    mixed << J{{"text", "Tell me about the sea"}}.dump() << "\n"
          << J{{"input", "Name a colour:"}}.dump() << "\n"
          << J{{"prompt", "Write a line on rain"}}.dump() << "\n"
          << J{{"messages",
                {{{"role", "system"}, {"content", "Be brief."}},
                 {{"role", "user"}, {"content", "What is bread?"}},
                 {{"role", "assistant"}, {"content", "Food."}},
                 {{"role", "user"}, {"content", "And the moon?"}}}}}
                 .dump()
          << "\n"
          << J{{"prompt", {{{"role", "user"}, {"content", "Say hello"}}}}}.dump() << "\n"
          << J{{"system", ""},
               {"mask", "User"},
               {"conversations",
                {{{"from", "User"}, {"value", "Describe winter"}},
                 {{"from", "Assistant"}, {"value", "Cold."}}}}}
                 .dump()
          << "\n";
  }
  return dir;
}

std::string rs_args(const fs::path& out, const std::string& extra) {
  return "rs model.path=" + tiny_model() + " reward.model=" + tiny_reward_model() +
         " data.train=" + (prompt_files() / "train.jsonl").string() +
         " data.validation=" + (prompt_files() / "val.jsonl").string() +
         " model.device=cpu rollout.prompts_per_step=8 rollout.samples_per_prompt=4 rollout.max_new_tokens=6"
         " gen.top_k=20 trainer.micro_batch_size=4 optim.lr=5e-3 optim.scheduler=constant trainer.seed=3"
         " output_dir=" +
         out.string() + " " + extra;
}

TEST(Rs, KeptResponsesBeatTheMeanAndTheRewardRises) {
  const auto out = temp_dir("rs_learns");
  const auto r = run_aligner(rs_args(out, "trainer.max_steps=40 trainer.val_interval=40"));
  ASSERT_EQ(r.status, 0) << r.output;
  const auto train = metrics(out), val = metrics(out, "validation");
  ASSERT_EQ(train.size(), 40u);
  ASSERT_EQ(val.size(), 2u);
  for (const auto& row : train) {
    for (const char* key :
         {"loss", "reward_mean", "reward_kept_mean", "reward_max", "kept_fraction", "response_length",
          "ended_fraction", "time_generation", "time_reward", "gen_tokens_per_s", "grad_norm", "lr"})
      ASSERT_TRUE(row.contains(key)) << key << " in " << row.dump();
    // The best of four beats their mean, and nothing beats the best.
    EXPECT_GE(row["reward_kept_mean"].get<double>(), row["reward_mean"].get<double>()) << row.dump();
    EXPECT_GE(row["reward_max"].get<double>(), row["reward_kept_mean"].get<double>()) << row.dump();
    EXPECT_EQ(row["kept_fraction"].get<double>(), 0.25);
  }
  // Seen at the time of writing: held-out 1.35 -> 3.63, the first six rollouts' mean reward 1.04 and
  // the last six's 3.24, their loss 7.45 and 0.54.
  const double before = val[0]["reward"].get<double>(), after = val[1]["reward"].get<double>();
  EXPECT_GT(after, before + 1.0) << "held-out reward " << before << " -> " << after;
  double first = 0, last = 0, first_loss = 0, last_loss = 0;
  for (size_t i = 0; i < 6; ++i) {
    first += train[i]["reward_mean"].get<double>() / 6;
    last += train[train.size() - 1 - i]["reward_mean"].get<double>() / 6;
    first_loss += train[i]["loss"].get<double>() / 6;
    last_loss += train[train.size() - 1 - i]["loss"].get<double>() / 6;
  }
  EXPECT_GT(last, first + 1.0) << "rollout reward " << first << " -> " << last;
  EXPECT_LT(last_loss, first_loss / 2) << "loss " << first_loss << " -> " << last_loss;
  EXPECT_TRUE(fs::exists(out / "final/config.json"));
  fs::remove_all(out);
}

// A threshold that nothing reaches leaves every kept response with weight 0: the steps run, report
// no kept reward, and (no gradient yet, no weight decay) leave the weights as they were. One in
// between keeps only responses that reach it.
TEST(Rs, MinRewardWeighsOutResponsesBelowIt) {
  const auto out = temp_dir("rs_min_reward");
  const auto none = run_aligner(rs_args(out / "none", "trainer.max_steps=2 rs.min_reward=1e9"));
  ASSERT_EQ(none.status, 0) << none.output;
  for (const auto& row : metrics(out / "none")) {
    EXPECT_EQ(row["kept_fraction"].get<double>(), 0.0) << row.dump();
    EXPECT_EQ(row["loss"].get<double>(), 0.0) << row.dump();
    EXPECT_FALSE(row.contains("reward_kept_mean")) << row.dump();
  }
  expect_same_weights(tiny_model(), out / "none/final");

  const auto some = run_aligner(rs_args(out / "some", "trainer.max_steps=4 rs.top_n=2 rs.min_reward=1.5"));
  ASSERT_EQ(some.status, 0) << some.output;
  // Seen at the time of writing: kept fractions 0.28, 0.16, 0.5 and 0.38 of the 0.5 that top_n keeps.
  for (const auto& row : metrics(out / "some")) {
    EXPECT_GT(row["kept_fraction"].get<double>(), 0.0) << row.dump();
    EXPECT_LE(row["kept_fraction"].get<double>(), 0.5) << row.dump();
    ASSERT_TRUE(row.contains("reward_kept_mean")) << row.dump();
    EXPECT_GE(row["reward_kept_mean"].get<double>(), 1.5) << row.dump();
  }
  fs::remove_all(out);
}

TEST(Rs, KilledRunResumesToTheSameWeights) {
  const auto a = temp_dir("rs_resume_a"), b = temp_dir("rs_resume_b");
  const std::string args = "trainer.max_steps=4 trainer.save_interval=1";
  run_whole_and_killed([&](const fs::path& out) { return rs_args(out, args); }, a, b, 2);
  if (HasFatalFailure()) return;
  expect_same_weights(a / "final", b / "final");
  const auto ma = metrics(a), mb = metrics(b);
  ASSERT_EQ(ma.size(), 4u);
  ASSERT_EQ(mb.size(), 4u);
  for (size_t i = 0; i < 4; ++i)
    for (const char* key : {"loss", "reward_mean", "reward_kept_mean"})
      EXPECT_EQ(ma[i][key].get<double>(), mb[i][key].get<double>()) << i << " " << key;
  fs::remove_all(a);
  fs::remove_all(b);
}

std::vector<nlohmann::json> read_jsonl(const fs::path& path) {
  std::ifstream f(path);
  std::vector<nlohmann::json> rows;
  for (std::string line; std::getline(f, line);) rows.push_back(nlohmann::json::parse(line));
  return rows;
}

// All four samples of each prompt written (top_n = samples) and then the best alone, from the same
// draws: the best is each prompt's highest reward, the earliest of equal ones.
TEST(Rs, GenerateOnlyWritesEachPromptsBestForSft) {
  const auto out = temp_dir("rs_generate");
  const std::string data = (prompt_files() / "mixed.jsonl").string();
  const auto all = run_aligner(rs_args(out / "all", "--generate-only rs.top_n=4 data.train=" + data));
  ASSERT_EQ(all.status, 0) << all.output;
  const auto best = run_aligner(rs_args(out / "best", "--generate-only data.train=" + data));
  ASSERT_EQ(best.status, 0) << best.output;
  EXPECT_NE(best.output.find("generated 24/24 completions"), std::string::npos) << best.output;
  const auto rows_all = read_jsonl(out / "all/selected.jsonl"),
             rows = read_jsonl(out / "best/selected.jsonl");
  ASSERT_EQ(rows_all.size(), 24u);
  ASSERT_EQ(rows.size(), 6u);
  EXPECT_FALSE(fs::exists(out / "best/checkpoints"));
  for (const auto& row : rows) {
    const int64_t p = row["prompt_index"].get<int64_t>();
    const nlohmann::json* first_best = nullptr;
    for (const auto& r : rows_all)
      if (r["prompt_index"] == p &&
          (!first_best || r["reward"].get<double>() > (*first_best)["reward"].get<double>()))
        first_best = &r;
    ASSERT_NE(first_best, nullptr) << p;
    EXPECT_EQ(row["reward"], (*first_best)["reward"]) << p;
    EXPECT_EQ(row, *first_best) << p;
  }

  // Every line is input/output: text prompts as their string, chats as their messages up to the
  // last user turn (NeMo's trailing "Cold." is not part of the prompt), so that sft trains on the
  // response alone.
  const auto tok = load_tokenizer(tiny_model());
  for (const auto& row : rows) {
    const int64_t p = row["prompt_index"].get<int64_t>();
    ASSERT_TRUE(row["output"].is_string()) << row.dump();
    if (p < 3) {
      EXPECT_TRUE(row["input"].is_string()) << row.dump();
      continue;
    }
    const auto& m = row["input"];
    const std::vector<std::string> roles =
        p == 3   ? std::vector<std::string>{"system", "user", "assistant", "user"}
        : p == 4 ? std::vector<std::string>{"user"}
                 : std::vector<std::string>{"system", "user"};
    ASSERT_EQ(m.size(), roles.size()) << row.dump();
    for (size_t i = 0; i < roles.size(); ++i) EXPECT_EQ(m[i]["role"], roles[i]) << row.dump();
  }

  // aligner sft, with the same (default) template, sees each prompt as the rollout did and trains on
  // what follows it.
  const auto tmpl = resolve_chat_template("auto", *tok);
  DataOptions opt;
  PromptDataset prompts = open_prompt_dataset(data, *tok, tmpl, opt);
  SftDataset sft = open_sft_dataset((out / "best/selected.jsonl").string(), *tok, tmpl, opt);
  for (size_t i = 0; i < rows.size(); ++i) {
    const auto seq = sft_example(sft, int64_t(i));
    ASSERT_TRUE(seq.has_value());
    const auto prompt = prompt_example(prompts, rows[i]["prompt_index"].get<int64_t>());
    ASSERT_TRUE(prompt.has_value());
    const std::vector<int32_t> head(seq->input_ids.begin(), seq->input_ids.begin() + first_loss_index(*seq));
    EXPECT_EQ(head, prompt->input_ids) << rows[i].dump();
    const std::vector<int32_t> tail(seq->input_ids.begin() + first_loss_index(*seq), seq->input_ids.end());
    // The chat template trims each message, the response's leading space included.
    auto trim = [](std::string t) {
      t.erase(0, t.find_first_not_of(" \n"));
      return t.erase(t.find_last_not_of(" \n") + 1);
    };
    EXPECT_EQ(trim(tok->decode(tail, true)), trim(rows[i]["output"].get<std::string>())) << rows[i].dump();
  }

  const auto trained =
      run_aligner("sft model.path=" + tiny_model() + " data.train=" + (out / "best/selected.jsonl").string() +
                  " model.device=cpu trainer.max_steps=2 trainer.micro_batch_size=3"
                  " trainer.global_batch_size=3 output_dir=" +
                  (out / "sft").string());
  EXPECT_EQ(trained.status, 0) << trained.output;
  EXPECT_TRUE(fs::exists(out / "sft/final/config.json"));

  // A threshold between the rewards writes those that reach it.
  std::vector<double> rewards;
  for (const auto& r : rows_all) rewards.push_back(r["reward"].get<double>());
  std::sort(rewards.begin(), rewards.end());
  const double threshold = rewards[12];
  const auto above = run_aligner(
      rs_args(out / "above",
              fmt::format("--generate-only rs.top_n=4 rs.min_reward={} data.train={}", threshold, data)));
  ASSERT_EQ(above.status, 0) << above.output;
  const auto rows_above = read_jsonl(out / "above/selected.jsonl");
  EXPECT_EQ(rows_above.size(),
            size_t(std::count_if(rewards.begin(), rewards.end(), [&](double r) { return r >= threshold; })));
  for (const auto& r : rows_above) EXPECT_GE(r["reward"].get<double>(), threshold) << r.dump();

  // Written once: another run there needs overwrite=true.
  const auto again = run_aligner(rs_args(out / "best", "--generate-only data.train=" + data));
  EXPECT_NE(again.status, 0);
  EXPECT_NE(again.output.find("selected.jsonl exists; overwrite=true replaces it"), std::string::npos)
      << again.output;
  fs::remove_all(out);
}

// Greedy rollouts are the same however the prompts are shared out, so two Gloo ranks keep what one
// rank keeps and, with the loss a mean over both ranks' tokens, make the same updates.
TEST(Rs, TwoRanksMatchOneRank) {
  const auto out = temp_dir("rs_ranks");
  const std::string args = rs_args(out / "one", "gen.greedy=true trainer.max_steps=2 optim.lr=1e-5");
  const auto one = run_aligner(args);
  ASSERT_EQ(one.status, 0) << one.output;
  // Whole models on each rank, and sharded (trainer.sharding=full: gathered whole to generate).
  for (const std::string sharding : {"none", "full"}) {
    const fs::path two = out / ("two_" + sharding);
    if (!expect_two_ranks_match_one(
            args, out / "one", two, sharding, sharding == "none" ? 29700 : 30150,
            {"loss", "reward_mean", "reward_kept_mean", "reward_max", "kept_fraction"}))
      GTEST_SKIP() << "this libtorch has no Gloo for CPU ranks";
    ASSERT_EQ(metrics(two).size(), 2u);
    // Two Adam steps of lr 1e-5 move a weight by at most 2e-5; the runs agree far inside that.
    expect_same_weights(out / "one/final", two / "final", 5e-6);
  }
  fs::remove_all(out);
}

TEST(Rs, BadConfigurationsAreOneLineErrors) {
  const auto out = temp_dir("rs_errors");
  const auto ids = out / "ids.jsonl";
  std::ofstream(ids) << "{\"input_ids\": [1, 2, 3]}\n";
  struct Case {
    std::string args, message;
  };
  const std::vector<Case> cases = {
      {"rs.top_n=5", "config key 'rs.top_n' (5) must not exceed rollout.samples_per_prompt (4)"},
      {"rs.top_n=0", "config key 'rs.top_n' must be at least 1, got 0"},
      {"rs.min_reward=high", "config key 'rs.min_reward' expects a number or null, got 'high'"},
      {"rs.min_reward=nan", "config key 'rs.min_reward' expects a number or null, got 'nan'"},
      {"trainer.micro_batch_size=3", "must split into whole micro-batches (trainer.micro_batch_size 3)"},
      {"data.max_length=600", "add up to more than the model's context"},
      {"model.path=" + tiny_reward_model(), "is a reward model"},
      {"reward.model=null", "no reward: set reward.model"},
      {"--generate-only data.train=" + ids.string(), "which aligner sft cannot read back"},
  };
  for (const auto& c : cases) {
    const auto r = run_aligner(rs_args(out / "run", c.args + " trainer.max_steps=1"));
    EXPECT_NE(r.status, 0) << c.args;
    const size_t at = r.output.find(c.message);
    ASSERT_NE(at, std::string::npos) << c.args << "\n" << r.output;
    // The message is the "error:" line itself.
    const size_t line = r.output.rfind('\n', at) + 1;
    EXPECT_EQ(r.output.compare(line, 7, "error: "), 0) << r.output;
  }
  fs::remove_all(out);
}

// --generate-only writes one file from one process; ranks are refused rather than racing on it.
TEST(Rs, GenerateOnlyRefusesSeveralRanks) {
  const auto out = temp_dir("rs_generate_ranks");
  const auto r = run_aligner_on_two_ranks(rs_args(out, "--generate-only"), 29650);
  if (r.output.find("needs Gloo") != std::string::npos)
    GTEST_SKIP() << "this libtorch has no Gloo for CPU ranks";
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("rs.generate_only runs in one process, not 2 ranks"), std::string::npos)
      << r.output;
  fs::remove_all(out);
}

TEST(Rs, LoraTrainsAdapters) {
  const auto out = temp_dir("rs_lora");
  const auto r = run_aligner(rs_args(out, "trainer.max_steps=2 lora.rank=4 data.validation=null"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(metrics(out).size(), 2u);
  EXPECT_TRUE(fs::exists(out / "final" / "adapter_config.json"));
  fs::remove_all(out);
}

}  // namespace
}  // namespace aligner::test
