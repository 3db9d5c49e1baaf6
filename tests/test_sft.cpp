// The trainer through `aligner sft`: losses that fall, results that do not depend on how the
// global batch is split, a killed run that resumes to the same weights, two ranks that match one,
// and distillation against a direct computation.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/file.h>
#include <sys/wait.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "algo/sft.h"
#include "core/error.h"
#include "io/hf_checkpoint.h"
#include "io/safetensors.h"
#include "model/transformer.h"
#include "run_outputs.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace aligner;
using namespace aligner::test;

namespace {

const std::string kData = kRoot + "/examples/data/code-alpaca/code-alpaca-300.jsonl";

Run aligner(const std::string& args, const std::string& env = "") {
  return run_aligner(args, env);
}

std::string sft_args(const fs::path& out, const std::string& extra) {
  return "sft model.path=" + tiny_model() + " data.train=" + kData + " data.max_length=128 optim.lr=3e-3 " +
         "optim.scheduler=constant trainer.seed=7 model.device=cpu output_dir=" + out.string() + " " + extra;
}

safetensors::NamedTensors weights(const fs::path& model_dir) {
  auto m = load_transformer(model_dir.string(), at::kCPU);
  safetensors::NamedTensors out;
  for (auto& [n, t] : named_parameters(m)) out.emplace_back(n, t.clone());
  return out;
}

double max_diff(const safetensors::NamedTensors& a, const safetensors::NamedTensors& b) {
  double d = 0;
  for (size_t i = 0; i < a.size(); ++i)
    d = std::max(d, (a[i].second - b[i].second).abs().max().item<double>());
  return d;
}

// Runs that sum the same gradients in another order (other micro-batch shapes, other ranks) differ
// in the last bits, and Adam's normalised update can turn that into a visible step on the few
// coordinates whose gradient is near zero. So: the weights agree on average to float precision,
// and no coordinate differs by more than two learning-rate-sized steps.
void expect_same_training(const safetensors::NamedTensors& a, const safetensors::NamedTensors& b, double lr) {
  double sum = 0, n = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    sum += (a[i].second - b[i].second).abs().sum().item<double>();
    n += double(a[i].second.numel());
  }
  EXPECT_LT(sum / n, 1e-6);
  EXPECT_LT(max_diff(a, b), 2 * lr + 1e-6);
}

TEST(Sft, LossFallsAndOutputsAreWritten) {
  const auto out = temp_dir("falls");
  auto r = aligner(sft_args(out,
                            "trainer.max_steps=12 trainer.micro_batch_size=4 trainer.global_batch_size=8 "
                            "data.validation=" +
                                kData + " trainer.val_interval=12"));
  ASSERT_EQ(r.status, 0) << r.output;
  auto rows = metrics(out);
  ASSERT_EQ(rows.size(), 12u);
  double first = 0, last = 0;
  for (int i = 0; i < 3; ++i) first += rows[i]["loss"].get<double>() / 3;
  for (int i = 9; i < 12; ++i) last += rows[i]["loss"].get<double>() / 3;
  EXPECT_LT(last, first - 0.5) << "loss did not fall: " << first << " -> " << last;
  for (const char* key : {"lr", "grad_norm", "tokens_per_s"}) EXPECT_TRUE(rows[0].contains(key)) << key;
  auto val = metrics(out, "validation");  // before training and at the end
  ASSERT_EQ(val.size(), 2u);
  EXPECT_EQ(val[0]["step"], 0);
  EXPECT_EQ(val[1]["step"], 12);
  EXPECT_LT(val[1]["loss"].get<double>(), val[0]["loss"].get<double>() - 0.5);
  EXPECT_TRUE(fs::exists(out / "final" / "model.safetensors"));
  EXPECT_TRUE(fs::exists(out / "final" / "tokenizer.json"));
  EXPECT_TRUE(fs::exists(out / "config.yaml"));
  bool has_events = false;
  for (auto& e : fs::directory_iterator(out / "tensorboard"))
    has_events |= e.path().filename().string().rfind("events.out.tfevents.", 0) == 0;
  EXPECT_TRUE(has_events);
  fs::remove_all(out);
}

// The loss is a mean over every response token of the global batch, so splitting that batch into
// micro-batches changes neither the loss nor the update.
TEST(Sft, BatchSplitDoesNotChangeResults) {
  const auto a = temp_dir("split_a"), b = temp_dir("split_b");
  auto ra =
      aligner(sft_args(a, "trainer.max_steps=2 trainer.micro_batch_size=4 trainer.global_batch_size=4"));
  auto rb =
      aligner(sft_args(b, "trainer.max_steps=2 trainer.micro_batch_size=1 trainer.global_batch_size=4"));
  ASSERT_EQ(ra.status, 0) << ra.output;
  ASSERT_EQ(rb.status, 0) << rb.output;
  auto ma = metrics(a), mb = metrics(b);
  for (int i = 0; i < 2; ++i)
    EXPECT_NEAR(ma[i]["loss"].get<double>(), mb[i]["loss"].get<double>(), 1e-5) << i;
  expect_same_training(weights(a / "final"), weights(b / "final"), 3e-3);
  fs::remove_all(a);
  fs::remove_all(b);
}

// Killed by SIGKILL after step 5 (last checkpoint: step 4), then run again with the same command:
// the resumed run ends with the same weights as one that was never interrupted.
TEST(Sft, KilledRunResumesToTheSameWeights) {
  const auto a = temp_dir("resume_a"), b = temp_dir("resume_b");
  const std::string args =
      "trainer.max_steps=8 trainer.micro_batch_size=2 trainer.global_batch_size=4 "
      "trainer.save_interval=2 trainer.keep_last=2 optim.scheduler=cosine optim.warmup_steps=2";
  auto ra = aligner(sft_args(a, args));
  ASSERT_EQ(ra.status, 0) << ra.output;
  auto killed = aligner(sft_args(b, args), "ALIGNER_KILL_AT_STEP=5");
  ASSERT_EQ(killed.status, 128 + SIGKILL) << killed.output;
  EXPECT_TRUE(fs::exists(b / "checkpoints" / "step_2"));
  EXPECT_TRUE(fs::exists(b / "checkpoints" / "step_4"));
  EXPECT_FALSE(fs::exists(b / "final"));
  auto resumed = aligner(sft_args(b, args));
  ASSERT_EQ(resumed.status, 0) << resumed.output;
  EXPECT_NE(resumed.output.find("resuming from"), std::string::npos) << resumed.output;
  EXPECT_EQ(max_diff(weights(a / "final"), weights(b / "final")), 0.0);
  // keep_last=2: of step_2 .. step_8 only the newest two remain.
  EXPECT_FALSE(fs::exists(b / "checkpoints" / "step_4"));
  EXPECT_TRUE(fs::exists(b / "checkpoints" / "step_6"));
  EXPECT_TRUE(fs::exists(b / "checkpoints" / "step_8"));
  auto ma = metrics(a), mb = metrics(b);
  ASSERT_EQ(mb.size(), 8u) << "a resumed run's metrics.jsonl must not repeat steps";
  for (size_t i = 0; i < 8; ++i) EXPECT_EQ(ma[i]["loss"].get<double>(), mb[i]["loss"].get<double>()) << i;
  fs::remove_all(a);
  fs::remove_all(b);
}

// With ALIGNER_TEST_DEVICE=cuda, in bfloat16 on the GPU with trainer.deterministic=true: a killed run
// resumes bit for bit there too, with packed rows (varlen flash attention) and padded ones (the
// masked kernel), whose backward passes would otherwise add in varying order.
TEST(Sft, GpuRunResumesBitForBitWithDeterministicKernels) {
  const char* d = std::getenv("ALIGNER_TEST_DEVICE");
  if (!d || std::string(d) != "cuda") GTEST_SKIP() << "set ALIGNER_TEST_DEVICE=cuda";
  for (const std::string packing : {"true", "false"}) {
    SCOPED_TRACE("data.packing=" + packing);
    const auto a = temp_dir("gpu_resume_a"), b = temp_dir("gpu_resume_b");
    const std::string args =
        "trainer.max_steps=6 trainer.micro_batch_size=2 trainer.global_batch_size=4 trainer.save_interval=2 "
        "model.device=cuda model.dtype=bfloat16 trainer.deterministic=true data.packing=" +
        packing;
    auto ra = aligner(sft_args(a, args));
    ASSERT_EQ(ra.status, 0) << ra.output;
    auto killed = aligner(sft_args(b, args), "ALIGNER_KILL_AT_STEP=3");
    ASSERT_EQ(killed.status, 128 + SIGKILL) << killed.output;
    auto resumed = aligner(sft_args(b, args));
    ASSERT_EQ(resumed.status, 0) << resumed.output;
    EXPECT_NE(resumed.output.find("resuming from"), std::string::npos) << resumed.output;
    EXPECT_EQ(max_diff(weights(a / "final"), weights(b / "final")), 0.0);
    auto ma = metrics(a), mb = metrics(b);
    ASSERT_EQ(mb.size(), 6u);
    for (size_t i = 0; i < 6; ++i) EXPECT_EQ(ma[i]["loss"].get<double>(), mb[i]["loss"].get<double>()) << i;
    fs::remove_all(a);
    fs::remove_all(b);
  }
}

// SIGTERM (Slurm's pre-emption) or SIGINT (Ctrl-C) ends the step under way, writes a checkpoint
// and exits non-zero saying so; the same command then ends as a run never stopped.
TEST(Sft, StopSignalWritesACheckpointToResumeFrom) {
  const auto a = temp_dir("signal_a");
  const std::string args = "trainer.max_steps=6 trainer.micro_batch_size=2 trainer.global_batch_size=4";
  auto ra = aligner(sft_args(a, args));
  ASSERT_EQ(ra.status, 0) << ra.output;
  for (const std::string sig : {"TERM", "INT"}) {
    const auto b = temp_dir("signal_" + sig);
    auto stopped = aligner(sft_args(b, args), "ALIGNER_KILL_AT_STEP=3 ALIGNER_KILL_SIGNAL=" + sig);
    EXPECT_EQ(stopped.status, 1) << stopped.output;
    EXPECT_NE(stopped.output.find("error: stopped by " +
                                  std::string(sig == "TERM" ? "Terminated" : "Interrupt") + " after step 3"),
              std::string::npos)
        << stopped.output;
    EXPECT_TRUE(fs::exists(b / "checkpoints" / "step_3"));
    EXPECT_FALSE(fs::exists(b / "final"));
    auto resumed = aligner(sft_args(b, args));
    ASSERT_EQ(resumed.status, 0) << resumed.output;
    EXPECT_EQ(max_diff(weights(a / "final"), weights(b / "final")), 0.0) << sig;
    fs::remove_all(b);
  }
  fs::remove_all(a);
}

// A damaged newest checkpoint (a file changed or cut short after it was written) is skipped with a
// warning for the newest whole one; resume=PATH resumes from a chosen checkpoint.
TEST(Sft, DamagedCheckpointFallsBackToAnOlderOne) {
  const auto a = temp_dir("damaged_a"), b = temp_dir("damaged_b");
  const std::string args =
      "trainer.max_steps=6 trainer.micro_batch_size=2 trainer.global_batch_size=4 trainer.save_interval=2 "
      "trainer.keep_last=0";
  auto ra = aligner(sft_args(a, args));
  ASSERT_EQ(ra.status, 0) << ra.output;
  auto killed = aligner(sft_args(b, args), "ALIGNER_KILL_AT_STEP=5");
  ASSERT_EQ(killed.status, 128 + SIGKILL) << killed.output;
  const fs::path step4 = b / "checkpoints" / "step_4", step2 = b / "checkpoints" / "step_2";
  {
    std::fstream f(step4 / "model.optimizer.safetensors", std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(-3, std::ios::end);
    f.put('\x7f');
  }
  auto resumed = aligner(sft_args(b, args));
  ASSERT_EQ(resumed.status, 0) << resumed.output;
  EXPECT_NE(resumed.output.find("skipping checkpoint " + step4.string()), std::string::npos)
      << resumed.output;
  EXPECT_NE(resumed.output.find("does not match the checksum"), std::string::npos) << resumed.output;
  EXPECT_NE(resumed.output.find("resuming from " + step2.string() + " (step 2)"), std::string::npos);
  EXPECT_EQ(max_diff(weights(a / "final"), weights(b / "final")), 0.0);

  // Cut short: refused by size when named with resume=PATH, which does not fall back.
  fs::resize_file(step4 / "model" / "model.safetensors",
                  fs::file_size(step4 / "model" / "model.safetensors") - 8);
  auto chosen = aligner(sft_args(b, args + " resume=" + step4.string()));
  EXPECT_NE(chosen.status, 0);
  EXPECT_NE(chosen.output.find("bytes"), std::string::npos) << chosen.output;
  // A data position edited by hand names the file and field.
  {
    auto state = nlohmann::json::parse(std::ifstream(step2 / "trainer_state.json"));
    const auto edited = state;
    state["data"][0]["position"] = "x";
    std::ofstream(step2 / "trainer_state.json") << state.dump();
    chosen = aligner(sft_args(b, args + " resume=" + step2.string()));
    EXPECT_EQ(chosen.status, 1);
    EXPECT_NE(chosen.output.find(step2.string() + "/trainer_state.json: field \"data\"[0]"),
              std::string::npos)
        << chosen.output;
    std::ofstream(step2 / "trainer_state.json") << edited.dump(2) << "\n";
  }
  chosen = aligner(sft_args(b, args + " resume=" + step2.string()));
  ASSERT_EQ(chosen.status, 0) << chosen.output;
  EXPECT_NE(chosen.output.find("resuming from " + step2.string()), std::string::npos) << chosen.output;
  EXPECT_EQ(max_diff(weights(a / "final"), weights(b / "final")), 0.0);
  fs::remove_all(a);
  fs::remove_all(b);
}

// A second run on an output_dir in use is refused before it writes anything there.
TEST(Sft, OutputDirInUseIsRefused) {
  const auto out = temp_dir("locked");
  const int fd = ::open((out / ".aligner.lock").c_str(), O_RDWR | O_CREAT, 0644);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::flock(fd, LOCK_EX | LOCK_NB), 0);
  const std::string pid = std::to_string(::getpid());
  ASSERT_EQ(::write(fd, pid.data(), pid.size()), ssize_t(pid.size()));
  auto r = aligner(sft_args(out, "trainer.max_steps=1"));
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("output_dir " + out.string() + " is in use by process " + pid), std::string::npos)
      << r.output;
  EXPECT_FALSE(fs::exists(out / "config.yaml"));
  ::close(fd);
  r = aligner(sft_args(out, "trainer.max_steps=1"));
  EXPECT_EQ(r.status, 0) << r.output;
  fs::remove_all(out);
}

// Bad trainer and optimizer values are reported by key before output_dir is created.
TEST(Sft, BadValuesAreRefusedBeforeAnythingIsWritten) {
  const auto out = temp_dir("bad_values") / "run";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"trainer.max_steps=-3", "config key 'trainer.max_steps' must not be negative, got -3"},
      {"trainer.keep_last=-1", "config key 'trainer.keep_last' must not be negative"},
      {"trainer.micro_batch_size=0", "config key 'trainer.micro_batch_size' must be at least 1"},
      {"optim.lr=-1", "config key 'optim.lr' must be >= 0, got -1"},
      {"optim.weight_decay=-0.1", "config key 'optim.weight_decay' must be >= 0"},
      {"optim.scheduler=cosin",
       "config key 'optim.scheduler' expects constant, linear or cosine, got 'cosin'"},
      {"optim.betas=[0.9,1.5]", "config key 'optim.betas' expects numbers in [0, 1)"},
      {"resume=/nonexistent/step_4", "config key 'resume' expects auto, true, false or a checkpoint folder"},
      {"trainer.max_steps=3 optim.warmup_steps=5 optim.scheduler=cosine",
       "config key 'optim.warmup_steps' (5) is more than the run's 3 steps"},
      {"trainer.global_batch_size=512 trainer.micro_batch_size=4",
       "trainer.global_batch_size (512) is larger than the training data (300 examples)"},
  };
  for (const auto& [args, message] : cases) {
    auto r = aligner(sft_args(out, args));
    EXPECT_EQ(r.status, 1) << args;
    EXPECT_NE(r.output.find(message), std::string::npos) << args << "\n" << r.output;
    EXPECT_FALSE(fs::exists(out)) << args;
  }
  fs::remove_all(out.parent_path());
}

// Bad lines anywhere in the training or validation data are all reported before anything is
// written; what was read is logged before the first step.
TEST(Sft, DataIsCheckedBeforeTheFirstStep) {
  const auto dir = temp_dir("data_check");
  copy_lines(kData, dir / "train.jsonl", 0, 100);
  {
    std::ofstream f(dir / "train.jsonl", std::ios::app);
    f << "{\"input\": \"q\"}\n";
    copy_lines(kData, dir / "rest.jsonl", 100, 200);
    std::ifstream rest(dir / "rest.jsonl");
    f << rest.rdbuf();
  }
  std::ofstream(dir / "val.jsonl") << "{\"input\": \"q\", \"output\": \"a\"}\n{\"output\": 1}\n";
  const auto out = dir / "run";
  const std::string train = " data.train=" + (dir / "train.jsonl").string();
  auto r = aligner(sft_args(out, "trainer.max_steps=2" + train));
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find((dir / "train.jsonl").string() + ":101: missing field \"output\""),
            std::string::npos)
      << r.output;
  EXPECT_FALSE(fs::exists(out));
  r = aligner(sft_args(out, "trainer.max_steps=2 data.validation=" + (dir / "val.jsonl").string()));
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find((dir / "val.jsonl").string() + ":2:"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(out));

  r = aligner(sft_args(out, "trainer.max_steps=2 data.skip_bad_lines=true" + train));
  ASSERT_EQ(r.status, 0) << r.output;
  const auto described = r.output.find("data.train " + (dir / "train.jsonl").string() +
                                       ": 201 examples (input_output 200), chat template");
  const auto warned = r.output.find("1 bad lines skipped");
  EXPECT_NE(described, std::string::npos) << r.output;
  EXPECT_NE(warned, std::string::npos) << r.output;
  EXPECT_LT(warned, r.output.find("step 1/2")) << "warnings come before training";

  r = aligner(sft_args(out, "trainer.max_steps=2 data.max_length=2048 resume=false overwrite=true" + train));
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("config key 'data.max_length' (2048) is beyond the model's context "
                          "(max_position_embeddings 512)"),
            std::string::npos)
      << r.output;
  fs::remove_all(dir);
}

// trainer.max_steps is reached even when it takes more than max_epochs: the data repeats.
TEST(Sft, MaxStepsOverridesMaxEpochs) {
  const auto out = temp_dir("max_steps");
  copy_lines(kData, out / "eight.jsonl", 0, 8);
  auto r = aligner(sft_args(out / "run",
                            "trainer.max_steps=5 trainer.max_epochs=1 trainer.micro_batch_size=4 "
                            "trainer.global_batch_size=4 data.train=" +
                                (out / "eight.jsonl").string()));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(metrics(out / "run").size(), 5u);
  fs::remove_all(out);
}

// Every example dropped: an error, not an untrained final/ with exit 0.
TEST(Sft, NoStepTrainedIsAnError) {
  const auto out = temp_dir("nothing");
  auto r = aligner(sft_args(out / "run",
                            "trainer.max_epochs=1 trainer.micro_batch_size=4 "
                            "trainer.global_batch_size=4 data.max_length=8 data.truncation=drop"));
  EXPECT_NE(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("no step was trained"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(out / "run" / "final"));
  fs::remove_all(out);
}

TEST(Sft, ResumeFalseRefusesANonEmptyOutputDir) {
  const auto out = temp_dir("refuse");
  std::ofstream(out / "something") << "x";
  auto r = aligner(sft_args(out, "trainer.max_steps=1 resume=false"));
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("overwrite=true"), std::string::npos) << r.output;
  fs::remove_all(out);
}

TEST(Sft, ConfigTyposAreOneLineErrors) {
  auto r = aligner(sft_args("/tmp/unused", "trainer.max_step=3"));
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("did you mean 'trainer.max_steps'"), std::string::npos) << r.output;
  r = aligner(sft_args("/tmp/unused", "trainer.max_steps=ten"));
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("trainer.max_steps"), std::string::npos) << r.output;
  r = aligner("sft model.path=" + tiny_model() + " data.train=/nonexistent.jsonl output_dir=/tmp/unused2");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("/nonexistent.jsonl"), std::string::npos) << r.output;
  // A count of checkpointed layers would do nothing without checkpointing.
  r = aligner(sft_args("/tmp/unused", "model.activation_checkpointing_layers=2"));
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("needs model.activation_checkpointing=true"), std::string::npos) << r.output;
}

// Two ranks (Gloo, through `aligner launch`) with the same global batch give the losses of one.
TEST(Sft, TwoRanksMatchOne) {
  const auto a = temp_dir("rank1"), b = temp_dir("rank2");
  const std::string args = "trainer.max_steps=3 trainer.micro_batch_size=2 trainer.global_batch_size=4";
  auto ra = aligner(sft_args(a, args));
  ASSERT_EQ(ra.status, 0) << ra.output;
  auto rb = aligner("launch --nproc-per-node 2 --master-port " + std::to_string(29650 + ::getpid() % 200) +
                    " -- " + ALIGNER_BINARY + " " + sft_args(b, args));
  if (rb.output.find("needs Gloo") != std::string::npos)
    GTEST_SKIP() << "this libtorch has no Gloo for CPU ranks";
  ASSERT_EQ(rb.status, 0) << rb.output;
  auto ma = metrics(a), mb = metrics(b);
  ASSERT_EQ(mb.size(), 3u);
  // Rank r reads positions r, r+2, ... of the one shuffled order, so each global batch holds the
  // same examples as the one-rank run's.
  for (size_t i = 0; i < 3; ++i)
    EXPECT_NEAR(ma[i]["loss"].get<double>(), mb[i]["loss"].get<double>(), 1e-5) << i;
  expect_same_training(weights(a / "final"), weights(b / "final"), 3e-3);
  fs::remove_all(a);
  fs::remove_all(b);
}

// Even lines are long and odd lines short, so that without shuffling rank 0 (even positions) packs
// one example per row and rank 1 several: rank 1's shard of the data runs out long before rank 0's.
std::string uneven_data(const fs::path& dir) {
  const std::string path = (dir / "uneven.jsonl").string();
  std::ofstream f(path);
  for (int i = 0; i < 120; ++i) {
    std::string reply;
    for (int w = 0; w < (i % 2 == 0 ? 30 : 2 + i % 5); ++w)
      reply += " word" + std::to_string((i * 7 + w) % 13);
    f << nlohmann::json{{"input", "Question " + std::to_string(i) + "?"}, {"output", reply}}.dump() << "\n";
  }
  return path;
}

// `aligner launch` of two ranks, killed after `timeout_s` so that a hang fails the test instead of
// stalling the suite.
Run launch_two(const std::string& sft, const std::string& env = "", int port_offset = 0) {
  const int port = 29100 + int(::getpid() % 200) * 2 + port_offset;
  return aligner(
      "launch --nproc-per-node 2 --master-port " + std::to_string(port) + " -- " + ALIGNER_BINARY + " " + sft,
      env + " timeout -s KILL 300");
}

const std::string kUneven =
    "data.packing=true data.shuffle=false data.max_length=64 trainer.micro_batch_size=1 "
    "trainer.global_batch_size=2 trainer.max_steps=0 trainer.max_epochs=1 optim.scheduler=constant ";

// With uneven shards the ranks agree on the end of the data and stop together (before, the rank
// that ran out went on to validation while the other waited in the step's reduction: a hang).
TEST(Sft, TwoRanksWithUnevenShardsStopTogether) {
  const auto out = temp_dir("uneven_stop");
  const std::string data = uneven_data(out);
  auto r = launch_two(sft_args(out / "run", kUneven + "data.train=" + data + " data.validation=" + data));
  if (r.output.find("needs Gloo") != std::string::npos)
    GTEST_SKIP() << "this libtorch has no Gloo for CPU ranks";
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("every rank stops here"), std::string::npos) << r.output;
  const auto rows = metrics(out / "run");
  EXPECT_GE(rows.size(), 5u);
  EXPECT_LT(rows.size(), 30u) << "rank 1's short examples pack many to a row";
  EXPECT_EQ(metrics(out / "run", "validation").size(), 1u);
  EXPECT_TRUE(fs::exists(out / "run" / "final" / "model.safetensors"));
  fs::remove_all(out);
}

// Each rank saves and restores its own data position (sampler and the packed example that did not
// fit): a two-rank run with packing and uneven shards, killed after a checkpoint and run again,
// ends as the run never stopped. Another number of ranks is refused, saying why.
TEST(Sft, TwoRanksWithPackingResumeToTheSameWeights) {
  const auto out = temp_dir("uneven_resume");
  const std::string data = uneven_data(out);
  const std::string args = kUneven + "data.train=" + data + " trainer.save_interval=2 trainer.keep_last=0";
  auto whole = launch_two(sft_args(out / "whole", args));
  if (whole.output.find("needs Gloo") != std::string::npos)
    GTEST_SKIP() << "this libtorch has no Gloo for CPU ranks";
  ASSERT_EQ(whole.status, 0) << whole.output;
  auto killed = launch_two(sft_args(out / "killed", args), "ALIGNER_KILL_AT_STEP=5", 1);
  ASSERT_NE(killed.status, 0) << killed.output;
  ASSERT_TRUE(fs::exists(out / "killed" / "checkpoints" / "step_4"));
  ASSERT_FALSE(fs::exists(out / "killed" / "final"));
  auto resumed = launch_two(sft_args(out / "killed", args), "", 2);
  ASSERT_EQ(resumed.status, 0) << resumed.output;
  EXPECT_NE(resumed.output.find("resuming from"), std::string::npos) << resumed.output;
  EXPECT_EQ(max_diff(weights(out / "whole" / "final"), weights(out / "killed" / "final")), 0.0);
  const auto a = metrics(out / "whole"), b = metrics(out / "killed");
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i)
    EXPECT_EQ(a[i]["loss"].get<double>(), b[i]["loss"].get<double>()) << i;

  auto one = aligner(sft_args(out / "killed", args + " resume=true"));
  EXPECT_NE(one.status, 0);
  EXPECT_NE(one.output.find("was written by 2 ranks and this run has 1"), std::string::npos) << one.output;
  fs::remove_all(out);
}

TEST(Kd, TopKLossMatchesDirectComputation) {
  auto gen = at::detail::createCPUGenerator(3);
  auto s = at::randn({5, 11}, gen, at::TensorOptions().dtype(at::kDouble));
  auto t = at::randn({5, 11}, gen, at::TensorOptions().dtype(at::kDouble));
  const int64_t k = 4;
  const double T = 2.0;
  double expected = 0;
  for (int64_t r = 0; r < 5; ++r) {
    auto [tv, ti] = t[r].topk(k);
    double z = 0, zs = 0;
    for (int64_t j = 0; j < k; ++j) z += std::exp(tv[j].item<double>() / T);
    for (int64_t v = 0; v < 11; ++v) zs += std::exp(s[r][v].item<double>() / T);
    for (int64_t j = 0; j < k; ++j) {
      const double pt = std::exp(tv[j].item<double>() / T) / z;
      const double ps = std::exp(s[r][ti[j].item<int64_t>()].item<double>() / T) / zs;
      expected += pt * std::log(pt / ps);
    }
  }
  expected *= T * T;
  auto [tv, ti] = t.to(at::kFloat).topk(k, -1);
  EXPECT_NEAR(topk_kd_loss_sum_from_topk(s.to(at::kFloat), tv, ti, T).item<double>(), expected, 1e-5);
  // A student equal to the teacher on the top-k and -inf elsewhere has zero KL.
  auto same = at::full({5, 11}, -1e9, at::kFloat);
  same.scatter_(1, ti, tv);
  EXPECT_NEAR(topk_kd_loss_sum_from_topk(same, tv, ti, 1.0).item<double>(), 0.0, 1e-5);
}

// Distillation from a teacher runs end to end and reports both terms.
TEST(Sft, DistillationFromATeacherRuns) {
  const auto out = temp_dir("kd");
  auto r = aligner(sft_args(out,
                            "trainer.max_steps=3 trainer.micro_batch_size=2 trainer.global_batch_size=2 "
                            "kd.teacher=" +
                                tiny_model() + " kd.top_k=8 kd.kd_weight=0.5 kd.temperature=2.0"));
  ASSERT_EQ(r.status, 0) << r.output;
  auto rows = metrics(out);
  ASSERT_EQ(rows.size(), 3u);
  // The student starts as the teacher, but keeps probability outside the teacher's top 8, which
  // the KL counts; training moves that mass in, so the KL falls.
  for (const auto& row : rows)
    EXPECT_NEAR(row["loss"].get<double>(), row["ce_loss"].get<double>() + 0.5 * row["kd_loss"].get<double>(),
                1e-6);
  EXPECT_GT(rows[0]["kd_loss"].get<double>(), 0.0);
  EXPECT_LT(rows[2]["kd_loss"].get<double>(), rows[0]["kd_loss"].get<double>());
  fs::remove_all(out);
}

}  // namespace
