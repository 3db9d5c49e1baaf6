// Sharded data parallel (trainer.sharding, ZeRO stages 1, 2 and 3) on two CPU ranks over Gloo:
// every stage trains as one rank does, for SFT, DPO and LoRA; each rank writes its own optimizer
// shard; resume is exact on as many ranks, and continues correctly on another number of ranks (the
// optimizer state re-sharded, the data order continued); stage 3 keeps half the weights per rank.
#include <gtest/gtest.h>

#include <filesystem>
#include <map>

#include "io/safetensors.h"
#include "online_fixtures.h"
#include "run_outputs.h"
#include "test_util.h"
#include "train/checkpoint.h"

namespace fs = std::filesystem;

namespace aligner::test {
namespace {

const std::string kSftData = kRoot + "/examples/data/code-alpaca/code-alpaca-300.jsonl";
const std::string kDpoData = kRoot + "/examples/data/nemo-aligner/dummy-dpo.jsonl";

// Four examples per step: one rank accumulates two micro-batches, two ranks take one each.
std::string sft_args(const fs::path& out, const std::string& extra) {
  return "sft model.path=" + tiny_model() + " data.train=" + kSftData +
         " data.max_length=64 model.device=cpu optim.lr=1e-3 optim.scheduler=constant optim.weight_decay=0.1 "
         "trainer.seed=7 trainer.micro_batch_size=2 trainer.global_batch_size=4 trainer.max_steps=4 "
         "output_dir=" +
         out.string() + " " + extra;
}

std::string dpo_args(const fs::path& out, const std::string& extra) {
  return "dpo model.path=" + tiny_model() + " data.train=" + kDpoData +
         " model.device=cpu optim.lr=1e-3 optim.scheduler=constant trainer.seed=3 trainer.micro_batch_size=2 "
         "trainer.global_batch_size=4 trainer.max_steps=3 output_dir=" +
         out.string() + " " + extra;
}

// `aligner launch` of two ranks on a port of this test's own; a hang is killed.
Run two_ranks(const std::string& args, const std::string& env = "", int port_offset = 0) {
  const int port = 31000 + int(::getpid() % 100) * 10 + port_offset;
  return run_aligner("launch --nproc-per-node 2 --master-port " + std::to_string(port) + " -- " +
                         ALIGNER_BINARY + " " + args,
                     env + " timeout -s KILL 300");
}

bool no_gloo(const Run& r) {
  return r.output.find("needs Gloo") != std::string::npos;
}

void expect_same_losses(const fs::path& a, const fs::path& b, double tolerance) {
  const auto ma = metrics(a), mb = metrics(b);
  ASSERT_EQ(ma.size(), mb.size()) << a << " " << b;
  for (size_t i = 0; i < ma.size(); ++i) {
    EXPECT_NEAR(ma[i]["loss"].get<double>(), mb[i]["loss"].get<double>(), tolerance)
        << b << " step " << i + 1;
    EXPECT_NEAR(ma[i]["grad_norm"].get<double>(), mb[i]["grad_norm"].get<double>(), tolerance * 10)
        << b << " step " << i + 1;
  }
}

// Final weights of two ranks against one: the ranks' gradients summed reorder one rank's float32
// additions (the embedding's scatter-add most), a few roundings over a run, which depend on the
// CPU's vector width.
constexpr double kTwoRankWeights = 2e-6;

TEST(Sharding, EveryStageOnTwoRanksTrainsAsOneRankSft) {
  const auto out = temp_dir("shard_sft");
  const auto one = run_aligner(sft_args(out / "one", ""));
  ASSERT_EQ(one.status, 0) << one.output;
  int port = 0;
  // The last two also with activation checkpointing: the recomputed layers gather their weights
  // again; with only the first layer recomputed, the other keeps its activations.
  const std::vector<std::pair<std::string, std::string>> runs = {
      {"none", ""},
      {"optimizer", ""},
      {"gradients", ""},
      {"full", ""},
      {"full", "model.activation_checkpointing=true"},
      {"full", "model.activation_checkpointing=true model.activation_checkpointing_layers=1"}};
  for (const auto& [stage, extra] : runs) {
    const fs::path dir = out / (stage + std::to_string(port));
    const auto r = two_ranks(sft_args(dir, "trainer.sharding=" + stage + " " + extra), "", port++);
    if (no_gloo(r)) GTEST_SKIP() << "this libtorch has no Gloo for CPU ranks";
    ASSERT_EQ(r.status, 0) << r.output;
    expect_same_losses(out / "one", dir, 1e-6);
    expect_same_weights(out / "one" / "final", dir / "final", kTwoRankWeights);
    // The log says what each rank holds: sharded, half the optimizer state.
    EXPECT_NE(r.output.find("memory per rank before activations"), std::string::npos) << r.output;
  }
  fs::remove_all(out);
}

TEST(Sharding, EveryStageOnTwoRanksTrainsAsOneRankDpo) {
  const auto out = temp_dir("shard_dpo");
  const auto one = run_aligner(dpo_args(out / "one", ""));
  ASSERT_EQ(one.status, 0) << one.output;
  int port = 0;
  for (const std::string stage : {"optimizer", "gradients", "full"}) {
    const auto r = two_ranks(dpo_args(out / stage, "trainer.sharding=" + stage), "", port++);
    if (no_gloo(r)) GTEST_SKIP() << "this libtorch has no Gloo for CPU ranks";
    ASSERT_EQ(r.status, 0) << r.output;
    expect_same_losses(out / "one", out / stage, 1e-6);
    expect_same_weights(out / "one" / "final", out / stage / "final", kTwoRankWeights);
  }
  fs::remove_all(out);
}

// Sharding the adapters' optimizer state and gradients (the frozen base whole on every rank), and
// sharding everything (the base too, gathered a layer at a time; with and without checkpointing).
TEST(Sharding, LoraAdaptersShardedTrainAsOneRank) {
  const auto out = temp_dir("shard_lora");
  const std::string lora = "lora.rank=4 lora.alpha=8 ";
  const auto one = run_aligner(sft_args(out / "one", lora));
  ASSERT_EQ(one.status, 0) << one.output;
  int port = 0;
  for (const std::string extra : {"trainer.sharding=gradients", "trainer.sharding=full",
                                  "trainer.sharding=full model.activation_checkpointing=true"}) {
    const fs::path dir = out / std::to_string(port);
    const auto r = two_ranks(sft_args(dir, lora + extra), "", port++);
    if (no_gloo(r)) GTEST_SKIP() << "this libtorch has no Gloo for CPU ranks";
    ASSERT_EQ(r.status, 0) << r.output;
    expect_same_losses(out / "one", dir, 1e-6);
    expect_same_adapters(out / "one" / "final", dir / "final", 1e-6);
  }
  fs::remove_all(out);
}

// Each rank's file holds its half of every moment (and no rank writes the whole state); a killed
// run resumes to the same weights and losses, to the bit.
class ShardedResume : public ::testing::TestWithParam<std::string> {};

TEST_P(ShardedResume, EachRankWritesItsShardAndResumeIsExact) {
  const auto out = temp_dir("shard_resume");
  const std::string args = "trainer.sharding=" + GetParam() + " trainer.save_interval=2 trainer.keep_last=0";
  const auto whole = two_ranks(sft_args(out / "whole", args));
  if (no_gloo(whole)) GTEST_SKIP() << "this libtorch has no Gloo for CPU ranks";
  ASSERT_EQ(whole.status, 0) << whole.output;
  const fs::path ckpt = out / "whole" / "checkpoints" / "step_2";
  EXPECT_FALSE(fs::exists(ckpt / "model.optimizer.safetensors"));
  int64_t numel[2] = {0, 0};
  for (int r = 0; r < 2; ++r) {
    const auto f = safetensors::File::open(
        (ckpt / ("model.optimizer.rank-0000" + std::to_string(r) + "-of-00002.safetensors")).string());
    for (const auto& t : f.tensors())
      if (t.name.rfind("exp_avg.", 0) == 0) numel[r] += f.get(t.name).numel();
  }
  int64_t params = 0;
  for (const auto& [name, t] : named_parameters(load_transformer(tiny_model(), at::kCPU)))
    params += t.numel();
  EXPECT_EQ(numel[0] + numel[1], params);
  EXPECT_LE(std::abs(numel[0] - numel[1]), 2);  // each bucket split in halves, rounded up

  const auto killed = two_ranks(sft_args(out / "killed", args), "ALIGNER_KILL_AT_STEP=3", 1);
  ASSERT_NE(killed.status, 0) << killed.output;
  ASSERT_FALSE(fs::exists(out / "killed" / "final"));
  const auto resumed = two_ranks(sft_args(out / "killed", args), "", 2);
  ASSERT_EQ(resumed.status, 0) << resumed.output;
  EXPECT_NE(resumed.output.find("resuming from"), std::string::npos) << resumed.output;
  expect_same_weights(out / "whole" / "final", out / "killed" / "final");
  expect_same_losses(out / "whole", out / "killed", 0);
  fs::remove_all(out);
}

INSTANTIATE_TEST_SUITE_P(Stages, ShardedResume, ::testing::Values("gradients", "full"));

// Two fully sharded ranks stopped at step 2 go on as one rank, and one rank's checkpoint goes on as
// two sharded ranks: the weights and optimizer state are put together and cut anew and the data
// continues the same global order, so both end where one rank's uninterrupted run does.
TEST(Sharding, ResumeOnAnotherNumberOfRanksReshards) {
  const auto out = temp_dir("shard_reshard");
  const std::string save = "trainer.save_interval=2 trainer.keep_last=0 ";
  const auto one = run_aligner(sft_args(out / "one", save));
  ASSERT_EQ(one.status, 0) << one.output;

  const auto two =
      two_ranks(sft_args(out / "two_then_one", save + "trainer.sharding=full"), "ALIGNER_KILL_AT_STEP=2");
  if (no_gloo(two)) GTEST_SKIP() << "this libtorch has no Gloo for CPU ranks";
  ASSERT_NE(two.status, 0) << two.output;
  // Fully sharded, the checkpoint holds each rank's pieces of the weights too.
  const fs::path step2 = out / "two_then_one" / "checkpoints" / "step_2";
  EXPECT_TRUE(fs::exists(step2 / "model" / "trainable.rank-00001-of-00002.safetensors"));
  EXPECT_FALSE(fs::exists(step2 / "model" / "model.safetensors"));
  const auto then_one = run_aligner(sft_args(out / "two_then_one", save));
  ASSERT_EQ(then_one.status, 0) << then_one.output;
  EXPECT_NE(then_one.output.find("written by 2 ranks"), std::string::npos) << then_one.output;
  expect_same_weights(out / "one" / "final", out / "two_then_one" / "final", kTwoRankWeights);
  expect_same_losses(out / "one", out / "two_then_one", 1e-6);

  const auto first = run_aligner(sft_args(out / "one_then_two", save), "ALIGNER_KILL_AT_STEP=2");
  ASSERT_NE(first.status, 0) << first.output;
  const auto then_two = two_ranks(sft_args(out / "one_then_two", save + "trainer.sharding=full"), "", 1);
  ASSERT_EQ(then_two.status, 0) << then_two.output;
  expect_same_weights(out / "one" / "final", out / "one_then_two" / "final", kTwoRankWeights);
  expect_same_losses(out / "one", out / "one_then_two", 1e-6);
  fs::remove_all(out);
}

// LoRA under full sharding where the reference is the base with the adapters off (DPO) and where
// a rollout generates from the gathered model and a LoRA critic trains beside it (PPO).
TEST(Sharding, FullShardingWithAdaptersAndReferences) {
  const auto out = temp_dir("shard_online");
  const std::string dpo_lora = "lora.rank=4 lora.alpha=8";
  const auto one = run_aligner(dpo_args(out / "dpo_one", dpo_lora));
  ASSERT_EQ(one.status, 0) << one.output;
  const auto two = two_ranks(dpo_args(out / "dpo_two", dpo_lora + " trainer.sharding=full"));
  if (no_gloo(two)) GTEST_SKIP() << "this libtorch has no Gloo for CPU ranks";
  ASSERT_EQ(two.status, 0) << two.output;
  expect_same_losses(out / "dpo_one", out / "dpo_two", 1e-6);
  expect_same_adapters(out / "dpo_one" / "final", out / "dpo_two" / "final", 1e-6);

  const std::string ppo =
      online_args("ppo actor.path=" + tiny_model(), out / "ppo_one") +
      " rollout.prompts_per_step=4 rollout.samples_per_prompt=2 trainer.micro_batch_size=2 "
      "trainer.max_steps=2 gen.greedy=true lora.rank=4 lora.critic=true";
  const auto ppo_one = run_aligner(ppo);
  ASSERT_EQ(ppo_one.status, 0) << ppo_one.output;
  expect_two_ranks_match_one(ppo, out / "ppo_one", out / "ppo_two", "full", 30200,
                             {"loss", "reward_mean", "value_loss"});
  for (const char* m : {"actor", "critic"})
    expect_same_adapters(out / "ppo_one" / "final" / m, out / "ppo_two" / "final" / m, 1e-5);
  fs::remove_all(out);
}

TEST(Sharding, UnknownStageIsAnErrorNamingTheKey) {
  const auto r = run_aligner(sft_args(temp_dir("shard_bad") / "o", "trainer.sharding=full3"));
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("trainer.sharding"), std::string::npos) << r.output;
}

// The weights a rank keeps under full sharding, as it reports them: its half of every unit plus
// the largest unit twice (gathered while the next one's gather is under way), for a model of 24
// layers about 60% of the whole model's (the embeddings and the head are 13% of it).
TEST(Sharding, FullShardingKeepsAboutHalfTheWeightsPerRank) {
  nlohmann::json j = {{"model_type", "llama"},
                      {"vocab_size", 6000},
                      {"hidden_size", 64},
                      {"intermediate_size", 1024},
                      {"num_hidden_layers", 24},
                      {"num_attention_heads", 4},
                      {"num_key_value_heads", 2},
                      {"max_position_embeddings", 128},
                      {"tie_word_embeddings", false},
                      {"torch_dtype", "float32"}};
  const auto dir = temp_dir("shard_memory");
  save_transformer(init_transformer(parse_model_config(j, "deep"), at::kCPU, 3), (dir / "m").string(),
                   std::nullopt, 0, kRoot + "/tests/fixtures/tokenizers/llama3-style-bpe6k");
  const auto gigabytes = [](const std::string& output, const std::string& what) {
    const auto at = output.find(what + " ", output.find("memory per rank before activations"));
    return at == std::string::npos ? -1.0 : std::stod(output.substr(at + what.size() + 1));
  };
  double weights[2] = {0, 0};
  int port = 5;
  for (const std::string stage : {"none", "full"}) {
    const std::string args = "sft model.path=" + (dir / "m").string() + " data.train=" + kSftData +
                             " data.max_length=32 model.device=cpu trainer.micro_batch_size=1 "
                             "trainer.global_batch_size=2 trainer.max_steps=1 trainer.sharding=" +
                             stage + " output_dir=" + (dir / stage).string();
    const auto r = two_ranks(args, "", port++);
    if (no_gloo(r)) GTEST_SKIP() << "this libtorch has no Gloo for CPU ranks";
    ASSERT_EQ(r.status, 0) << r.output;
    weights[stage == "full"] = gigabytes(r.output, "weights");
  }
  ASSERT_GT(weights[0], 0);
  EXPECT_LT(weights[1] / weights[0], 0.7) << weights[1] << " vs " << weights[0];
  EXPECT_GT(weights[1] / weights[0], 0.5) << weights[1] << " vs " << weights[0];
  fs::remove_all(dir);
}

// Optimizer state written in pieces by some number of ranks, read back as other pieces: every
// range is put together from the files that hold it, and a range nobody wrote is an error.
TEST(Sharding, OptimizerStateReassembledFromOtherPieces) {
  const auto dir = temp_dir("shard_pieces");
  auto gen = at::detail::createCPUGenerator(1);
  const auto full = at::randn({10}, gen);
  const auto mask = at::randn({10}, gen);
  // Written by three ranks: [0, 4), [4, 7), [7, 10) of "w".
  const int64_t cuts[] = {0, 4, 7, 10};
  for (int r = 0; r < 3; ++r) {
    const int64_t n = cuts[r + 1] - cuts[r];
    write_optimizer_shard(dir.string(), "m", r, 3,
                          {{"step", at::scalar_tensor(5, at::kLong)},
                           {"exp_avg.w", full.narrow(0, cuts[r], n)},
                           {"exp_avg_sq.w", mask.narrow(0, cuts[r], n)}},
                          {{"w", cuts[r]}});
  }
  // Read as two ranks' pieces [0, 5) and [5, 10), and as one whole [2, 5] matrix.
  for (const int64_t begin : {0, 5}) {
    const auto got = read_module_optimizer(dir.string(), "m",
                                           {{"step", at::scalar_tensor(0, at::kLong)},
                                            {"exp_avg.w", at::zeros({5})},
                                            {"exp_avg_sq.w", at::zeros({5})}},
                                           {{"w", begin}});
    ASSERT_EQ(got.size(), 3u);
    EXPECT_EQ(got[0].second.item<int64_t>(), 5);
    EXPECT_TRUE(got[1].second.equal(full.narrow(0, begin, 5)));
    EXPECT_TRUE(got[2].second.equal(mask.narrow(0, begin, 5)));
  }
  const auto whole = read_module_optimizer(dir.string(), "m", {{"exp_avg.w", at::zeros({2, 5})}}, {});
  EXPECT_TRUE(whole[0].second.equal(full.view({2, 5})));
  fs::remove(dir / "m.optimizer.rank-00001-of-00003.safetensors");
  try {
    read_module_optimizer(dir.string(), "m", {{"exp_avg.w", at::zeros({10})}}, {});
    FAIL() << "a missing shard should be an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("covers 7 of the 10"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace aligner::test
