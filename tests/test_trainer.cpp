// The trainer's algorithm interface, through an example of an algorithm with two trainable modules:
// an "actor" that trains its whole model and a "critic" that trains one layer of another, each with
// its own learning rate and clipping, per-sequence and per-step metrics, a hook after each optimizer
// step, checkpoints matched by name, and one folder per module in final/. Also: activation
// checkpointing gives gradients to a layer whose input needs none.
#include <gtest/gtest.h>

#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "algo/data_stream.h"
#include "core/builtin_configs.h"
#include "core/error.h"
#include "core/json.h"
#include "data/sampler.h"
#include "dist/process_group.h"
#include "io/hf_checkpoint.h"
#include "io/safetensors.h"
#include "model/transformer.h"
#include "run_outputs.h"
#include "test_util.h"
#include "train/run_setup.h"
#include "train/trainer.h"

namespace fs = std::filesystem;
using namespace aligner;
using namespace aligner::test;

namespace {

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

ModelConfig small_config() {
  nlohmann::json j = {{"model_type", "llama"},
                      {"vocab_size", 64},
                      {"hidden_size", 16},
                      {"intermediate_size", 32},
                      {"num_hidden_layers", 2},
                      {"num_attention_heads", 2},
                      {"num_key_value_heads", 1},
                      {"max_position_embeddings", 64},
                      {"tie_word_embeddings", false},
                      {"torch_dtype", "float32"}};
  return parse_model_config(j, "small");
}

// Sequences of 5 to 12 random tokens.
std::vector<at::Tensor> make_data(int64_t n) {
  at::manual_seed(3);
  std::vector<at::Tensor> out;
  for (int64_t i = 0; i < n; ++i) out.push_back(at::randint(64, {1, 5 + i % 8}, at::kLong));
  return out;
}

// The sum of log p(token | previous tokens) over sequences, right-padded into one batch: each model
// runs once per micro-batch, as data parallel needs of a checkpointed model (a parameter's gradient
// must arrive once per backward).
at::Tensor sequence_logprob(const Transformer& m, const std::vector<at::Tensor>& seqs,
                            bool checkpoint_layers) {
  int64_t T = 0;
  for (const auto& s : seqs) T = std::max(T, s.size(1));
  const int64_t B = int64_t(seqs.size());
  auto ids = at::zeros({B, T}, at::kLong), mask = at::zeros({B, T}, at::kLong);
  auto targets = at::full({B, T - 1}, int64_t(-100), at::kLong);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = seqs[b].size(1);
    ids[b].narrow(0, 0, n).copy_(seqs[b][0]);
    mask[b].narrow(0, 0, n).fill_(1);
    targets[b].narrow(0, 0, n - 1).copy_(seqs[b][0].narrow(0, 1, n - 1));
  }
  ForwardInput in{ids, mask};
  in.checkpointed_layers = checkpoint_layers ? kAllLayers : 0;
  const auto hidden = forward_hidden(m, in).narrow(1, 0, T - 1);
  return token_logprobs(m, hidden, targets).sum();
}

// Both models learn the same sequences; the loss is a sum over predicted tokens. The critic runs
// with activation checkpointing, and its first trained layer's input needs no gradient (its
// embeddings and first layer are frozen).
class TwoModels final : public Algorithm {
 public:
  TwoModels(Transformer& actor, Transformer& critic, int64_t micro_batch_size, int rank = 0, int world = 1)
      : actor_(actor), critic_(critic), data_(make_data(24)), micro_batch_size_(micro_batch_size) {
    sampler_ = make_sampler(int64_t(data_.size()), rank, world, true, 11);
  }

  int64_t train_examples() const override { return int64_t(data_.size()); }
  bool next_step(int64_t n) override {
    step_ = next_micro_batches(sampler_, 1, micro_batch_size_, n,
                               [](int64_t i) { return std::optional<int64_t>(i); });
    return !step_.empty();
  }
  double units(int64_t i) const override {
    double tokens = 0;
    for (const auto& e : step_.at(i)) tokens += double(data_[e.index].size(1) - 1);
    return tokens;
  }
  LossSums loss(int64_t i) override {
    LossSums out;
    std::vector<at::Tensor> seqs;
    double length = 0;
    for (const auto& e : step_.at(i)) {
      seqs.push_back(data_[e.index]);
      length += double(data_[e.index].size(1));
    }
    out.loss = -sequence_logprob(actor_, seqs, false) - sequence_logprob(critic_, seqs, true);
    out.units = units(i);
    const bool first = i == 0;
    out.metrics = {{"length", length, double(step_.at(i).size())},  // per sequence
                   {"hook_calls", first ? double(hook_calls.size()) : 0.0, first ? 1.0 : 0.0}};  // per step
    return out;
  }
  void after_optimizer_step(int64_t step) override { hook_calls.push_back(step); }
  ValidationSums validate() override { return {}; }
  nlohmann::json state() const override { return {{"position", sampler_.position}}; }
  void load_state(const nlohmann::json& s) override { sampler_.position = s.at("position").get<int64_t>(); }

  std::vector<int64_t> hook_calls;

 private:
  Transformer &actor_, &critic_;
  std::vector<at::Tensor> data_;
  int64_t micro_batch_size_;
  Sampler sampler_;
  std::vector<std::vector<Indexed<int64_t>>> step_;
};

struct TwoModelRun {
  Transformer actor = init_transformer(small_config(), at::kCPU, 1);
  Transformer critic = init_transformer(small_config(), at::kCPU, 2);
  std::vector<int64_t> hook_calls;
};

OptimizerSettings settings(double lr, double grad_clip) {
  OptimizerSettings o;
  o.adam.lr = lr;
  o.adam.eps = 1e-12;
  o.grad_clip = grad_clip;
  return o;
}

NamedParams critic_layer(Transformer& critic, const std::string& prefix = "model.layers.1.") {
  NamedParams out;
  for (auto& [name, t] : named_parameters(critic))
    if (name.rfind(prefix, 0) == 0) out.emplace_back(name, t);
  return out;
}

// Trains both modules for max_steps (micro-batches of 2, global batches of 4) into `out`, on the
// ranks of `dist` (one process when null).
TwoModelRun run_two_models(const fs::path& out, int64_t max_steps,
                           const std::string& critic_prefix = "model.layers.1.",
                           const std::string& critic_name = "critic", bool export_critic = true,
                           dist::Dist* dist = nullptr, const std::string& async_checkpoint = "auto") {
  TwoModelRun run;
  const auto cfg = Config::load(builtin_config("sft"), "", {"output_dir=" + out.string()});
  TrainerOptions opt;
  opt.max_steps = max_steps;
  opt.micro_batch_size = 2;
  opt.global_batch_size = 4;
  opt.save_interval = 2;
  opt.keep_last = 0;
  opt.async_checkpoint = async_checkpoint;
  opt.output_dir = out.string();
  TrainableModule actor{"actor", &run.actor, named_parameters(run.actor), settings(1e-2, 1.0)};
  TrainableModule critic{critic_name, &run.critic, critic_layer(run.critic, critic_prefix),
                         settings(1e-3, 1e-3)};
  critic.export_final = export_critic;
  dist::Dist one;
  dist::Dist& ranks = dist ? *dist : one;
  TwoModels algo(run.actor, run.critic, 2, ranks.rank(), ranks.world_size());
  train(cfg, opt, {actor, critic}, algo, ranks);
  run.hook_calls = algo.hook_calls;
  return run;
}

std::map<std::string, at::Tensor> clone_params(const Transformer& m) {
  std::map<std::string, at::Tensor> out;
  for (const auto& [name, t] : named_parameters(m)) out.emplace(name, t.detach().clone());
  return out;
}

double max_change(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).abs().max().item<double>();
}

TEST(Trainer, TwoModulesTrainWithTheirOwnSettings) {
  const auto out = temp_dir("two_modules");
  const TwoModelRun fresh;
  const auto actor0 = clone_params(fresh.actor), critic0 = clone_params(fresh.critic);
  auto run = run_two_models(out, 1);

  // Adam's first step moves every coordinate by about its module's learning rate (the gradient's
  // sign times lr), whatever the clipping did to the gradient's scale.
  double actor_moved = 0, critic_moved = 0;
  for (const auto& [name, t] : named_parameters(run.actor))
    actor_moved = std::max(actor_moved, max_change(t, actor0.at(name)));
  for (const auto& [name, t] : named_parameters(run.critic)) {
    const bool trained = name.rfind("model.layers.1.", 0) == 0;
    if (trained) {
      critic_moved = std::max(critic_moved, max_change(t, critic0.at(name)));
    } else {
      EXPECT_EQ(max_change(t, critic0.at(name)), 0.0) << name << " is frozen";
      EXPECT_FALSE(t.requires_grad()) << name;
      EXPECT_FALSE(t.grad().defined()) << name << " is frozen: no gradient";
    }
  }
  EXPECT_NEAR(actor_moved, 1e-2, 1e-5);
  EXPECT_NEAR(critic_moved, 1e-3, 1e-6);

  // Each module's gradient norm is its own: the same loss, backpropagated by hand, gives it.
  TwoModelRun again;
  for (auto& [name, t] : named_parameters(again.actor)) t.requires_grad_(true);
  for (auto& [name, t] : critic_layer(again.critic)) t.requires_grad_(true);
  TwoModels algo(again.actor, again.critic, 2);
  ASSERT_TRUE(algo.next_step(2));
  const double units = algo.units(0) + algo.units(1);
  for (int i = 0; i < 2; ++i) (algo.loss(i).loss / units).backward();
  auto norm = [](const NamedParams& ps) {
    double s = 0;
    for (const auto& [n, t] : ps) s += t.grad().pow(2).sum().item<double>();
    return std::sqrt(s);
  };
  const auto rows = metrics(out);
  ASSERT_EQ(rows.size(), 1u);
  EXPECT_NEAR(rows[0]["actor/grad_norm"].get<double>(), norm(named_parameters(again.actor)), 1e-4);
  EXPECT_NEAR(rows[0]["critic/grad_norm"].get<double>(), norm(critic_layer(again.critic)), 1e-4);
  EXPECT_EQ(rows[0]["actor/lr"].get<double>(), 1e-2);
  EXPECT_EQ(rows[0]["critic/lr"].get<double>(), 1e-3);
  EXPECT_FALSE(rows[0].contains("grad_norm"));
  fs::remove_all(out);
}

TEST(Trainer, MetricsAreMeansOverTheirOwnCountsAndTheHookFollowsEachStep) {
  const auto out = temp_dir("two_modules_metrics");
  auto run = run_two_models(out, 3);
  EXPECT_EQ(run.hook_calls, (std::vector<int64_t>{1, 2, 3}));
  // The same order of examples as the run's, to compute the mean length per sequence.
  auto sampler = make_sampler(24, 0, 1, true, 11);
  const auto data = make_data(24);
  const auto rows = metrics(out);
  ASSERT_EQ(rows.size(), 3u);
  for (int step = 0; step < 3; ++step) {
    double length = 0;
    for (int k = 0; k < 4; ++k) length += double(data[next_index(sampler)].size(1));
    EXPECT_DOUBLE_EQ(rows[step]["length"].get<double>(), length / 4) << step;
    // Counted once per step, so its mean is the value itself: the hooks called before this step.
    EXPECT_EQ(rows[step]["hook_calls"].get<double>(), double(step)) << step;
  }
  fs::remove_all(out);
}

TEST(Trainer, CheckpointsHoldEveryModuleAndResumeByName) {
  const auto whole = temp_dir("two_modules_whole"), parts = temp_dir("two_modules_parts");
  const auto a = run_two_models(whole, 4);
  run_two_models(parts, 2);
  const fs::path step2 = parts / "checkpoints" / "step_2";
  // The actor trains its whole model: a Hugging Face folder. The critic trains one layer: only that.
  EXPECT_TRUE(fs::exists(step2 / "actor" / "config.json"));
  EXPECT_TRUE(fs::exists(step2 / "actor.optimizer.safetensors"));
  auto critic_file = safetensors::File::open((step2 / "critic" / "trainable.safetensors").string());
  EXPECT_EQ(critic_file.tensors().size(), 9u);  // norms and seven projections of layer 1
  EXPECT_TRUE(fs::exists(step2 / "critic.optimizer.safetensors"));
  // final/ has a folder per module.
  EXPECT_TRUE(fs::exists(whole / "final" / "actor" / "config.json"));
  EXPECT_TRUE(fs::exists(whole / "final" / "critic" / "config.json"));

  // Resumed from step 2 to step 4: the same weights and metrics as the run never stopped.
  const auto b = run_two_models(parts, 4);
  EXPECT_EQ(b.hook_calls, (std::vector<int64_t>{3, 4}));
  for (const auto& [m1, m2] : {std::make_pair(&a.actor, &b.actor), std::make_pair(&a.critic, &b.critic)}) {
    const auto p1 = named_parameters(*m1), p2 = named_parameters(*m2);
    for (size_t i = 0; i < p1.size(); ++i) EXPECT_TRUE(p1[i].second.equal(p2[i].second)) << p1[i].first;
  }
  const auto ra = metrics(whole), rb = metrics(parts);
  ASSERT_EQ(rb.size(), 4u);
  for (size_t i = 0; i < 4; ++i) EXPECT_EQ(ra[i]["loss"].get<double>(), rb[i]["loss"].get<double>()) << i;

  // A run that trains another layer, or names its modules otherwise, is refused by name.
  EXPECT_TRUE(contains(error_of([&] { run_two_models(parts, 6, "model.layers.0."); }),
                       "module 'critic' has no tensor 'model.layers.0."));
  EXPECT_TRUE(contains(error_of([&] { run_two_models(parts, 6, "model.layers.1.", "value"); }),
                       "has no trainable module 'value'"));
  fs::remove_all(whole);
  fs::remove_all(parts);
}

// Checkpoints written by the writer's thread (trainer.async_checkpoint=true) from snapshots, while
// training goes on changing the weights, are the files a run writes in place, byte for byte; and a
// run resumes from them to the weights of one never stopped.
TEST(Trainer, AsyncCheckpointsAreTheFilesWrittenInPlace) {
  const auto in_place = temp_dir("ckpt_in_place"), async = temp_dir("ckpt_async"),
             parts = temp_dir("ckpt_parts");
  const auto a = run_two_models(in_place, 6, "model.layers.1.", "critic", true, nullptr, "false");
  run_two_models(async, 6, "model.layers.1.", "critic", true, nullptr, "true");
  for (int step : {2, 4, 6}) {
    const auto dir = fmt::format("checkpoints/step_{}", step);
    const auto want = read_json_file((in_place / dir / "trainer_state.json").string());
    const auto got = read_json_file((async / dir / "trainer_state.json").string());
    EXPECT_GE(want["files"].size(), 4u);
    EXPECT_EQ(got, want) << dir;  // every file's size and CRC-32C, the data positions
  }
  run_two_models(parts, 2, "model.layers.1.", "critic", true, nullptr, "true");
  const auto b = run_two_models(parts, 6, "model.layers.1.", "critic", true, nullptr, "true");
  const auto p1 = named_parameters(a.actor), p2 = named_parameters(b.actor);
  for (size_t i = 0; i < p1.size(); ++i) EXPECT_TRUE(p1[i].second.equal(p2[i].second)) << p1[i].first;
  for (const auto& dir : {in_place, async, parts}) fs::remove_all(dir);
}

// One rank of Trainer.TwoRanksMatchOne, started by `aligner launch`.
TEST(TrainerWorker, TwoModulesOnTwoRanks) {
  const char* out = std::getenv("ALIGNER_TRAINER_TEST_OUT");
  if (!out) GTEST_SKIP() << "runs as a rank started by Trainer.TwoRanksMatchOne";
  dist::Dist dist = dist::Dist::init(dist::read_dist_env(), at::kCPU, std::chrono::seconds(60));
  run_two_models(out, 3, "model.layers.1.", "critic", true, &dist);
}

// Data parallel over both modules: two ranks, each with half of every global batch, train as one
// rank does, and the means per sequence and per step are those of the whole global batch.
TEST(Trainer, TwoRanksMatchOne) {
  const auto one = temp_dir("two_modules_one_rank"), two = temp_dir("two_modules_two_ranks");
  run_two_models(one, 3);
  char self[4096] = {};
  ASSERT_GT(::readlink("/proc/self/exe", self, sizeof self - 1), 0);
  const auto r =
      run_aligner("launch --nproc-per-node 2 --master-port " + std::to_string(29300 + ::getpid() % 200) +
                      " -- " + self + " --gtest_filter=TrainerWorker.TwoModulesOnTwoRanks",
                  "ALIGNER_TRAINER_TEST_OUT=" + two.string() + " timeout -s KILL 300");
  if (r.output.find("needs Gloo") != std::string::npos)
    GTEST_SKIP() << "this libtorch has no Gloo for CPU ranks";
  ASSERT_EQ(r.status, 0) << r.output;
  const auto a = metrics(one), b = metrics(two);
  ASSERT_EQ(a.size(), 3u);
  ASSERT_EQ(b.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_NEAR(a[i]["loss"].get<double>(), b[i]["loss"].get<double>(), 1e-5) << i;
    EXPECT_DOUBLE_EQ(a[i]["length"].get<double>(), b[i]["length"].get<double>()) << i;
    EXPECT_EQ(a[i]["hook_calls"].get<double>(), b[i]["hook_calls"].get<double>()) << i;
    for (const char* key : {"actor/grad_norm", "critic/grad_norm"})
      EXPECT_NEAR(a[i][key].get<double>(), b[i][key].get<double>(), 1e-4) << key << " " << i;
  }
  for (const char* module : {"actor", "critic"}) {
    const auto m1 = load_transformer((one / "final" / module).string(), at::kCPU);
    const auto m2 = load_transformer((two / "final" / module).string(), at::kCPU);
    const auto p1 = named_parameters(m1), p2 = named_parameters(m2);
    // Sums in another order move Adam's normalised update by at most a step on coordinates whose
    // gradient is near zero.
    for (size_t i = 0; i < p1.size(); ++i)
      EXPECT_LT(max_change(p1[i].second, p2[i].second), 2 * 1e-2 + 1e-6) << module << " " << p1[i].first;
  }
  fs::remove_all(one);
  fs::remove_all(two);
}

TEST(Trainer, OneExportedModuleIsFinalItself) {
  const auto out = temp_dir("two_modules_one_export");
  run_two_models(out, 1, "model.layers.1.", "critic", /*export_critic=*/false);
  EXPECT_TRUE(fs::exists(out / "final" / "config.json"));
  EXPECT_FALSE(fs::exists(out / "final" / "critic"));
  fs::remove_all(out);
}

TEST(Trainer, ModulesAreChecked) {
  Transformer m = init_transformer(small_config(), at::kCPU, 1);
  Transformer other = init_transformer(small_config(), at::kCPU, 2);
  const auto cfg = Config::load(builtin_config("sft"), "", {"output_dir=/tmp/unused"});
  TrainerOptions opt;
  opt.max_steps = 1;
  opt.output_dir = temp_dir("modules_checked").string();
  TwoModels algo(m, other, 1);
  dist::Dist one;
  auto error = [&](std::vector<TrainableModule> modules) {
    return error_of([&] { train(cfg, opt, modules, algo, one); });
  };
  TrainableModule a{"a", &m, named_parameters(m), settings(1e-3, 1)};
  TrainableModule b{"b", &m, critic_layer(m), settings(1e-3, 1)};
  EXPECT_TRUE(contains(error({a, b}), "parameter 'model.layers.1.")) << "a parameter in two modules";
  EXPECT_TRUE(contains(error({a, a}), "two trainable modules are named 'a'"));
  TrainableModule foreign{"f", &m, critic_layer(other), settings(1e-3, 1)};
  EXPECT_TRUE(contains(error({foreign}), "is not a parameter of its model"));
}

// A model that is not a Transformer (as the diffusion models are) trains through OtherModel: a linear
// regression y = w x + b on fixed points, squared error summed over the points.
class Regression final : public Algorithm {
 public:
  Regression(at::Tensor& w, at::Tensor& b) : w_(w), b_(b) {
    at::manual_seed(5);
    x_ = at::randn({32, 3});
    y_ = at::matmul(x_, at::tensor({1.5f, -2.0f, 0.5f})) + 0.3;
    sampler_ = make_sampler(32, 0, 1, true, 7);
  }
  int64_t train_examples() const override { return 32; }
  bool next_step(int64_t n) override {
    step_ = next_micro_batches(sampler_, 0, 4, n, [](int64_t i) { return std::optional<int64_t>(i); });
    return !step_.empty();
  }
  double units(int64_t i) const override { return double(step_.at(i).size()); }
  LossSums loss(int64_t i) override {
    std::vector<int64_t> rows;
    for (const auto& e : step_.at(i)) rows.push_back(e.index);
    const auto idx = at::tensor(rows, at::kLong);
    LossSums out;
    out.loss = (at::matmul(x_.index_select(0, idx), w_) + b_ - y_.index_select(0, idx)).pow(2).sum();
    out.units = units(i);
    return out;
  }
  // No metrics; an "image" (any bytes do for the trainer) of the current weights.
  ValidationSums validate() override {
    ValidationSums v;
    v.images.push_back({"weights", fmt::format("{:.6f}", w_[0].item<double>()), 1, 1, 3});
    return v;
  }
  nlohmann::json state() const override { return {{"position", sampler_.position}}; }
  void load_state(const nlohmann::json& s) override { sampler_.position = s.at("position").get<int64_t>(); }

 private:
  at::Tensor &w_, &b_;
  at::Tensor x_, y_;
  Sampler sampler_;
  std::vector<std::vector<Indexed<int64_t>>> step_;
};

struct RegressionRun {
  at::Tensor w = at::zeros({3}), b = at::zeros({});
};

RegressionRun run_regression(const fs::path& out, int64_t max_steps) {
  RegressionRun run;
  const auto cfg = Config::load(builtin_config("sft"), "", {"output_dir=" + out.string()});
  TrainerOptions opt;
  opt.max_steps = max_steps;
  opt.micro_batch_size = 4;
  opt.global_batch_size = 8;
  opt.save_interval = 2;
  opt.keep_last = 0;
  opt.output_dir = out.string();
  TrainableModule m;
  m.name = "regression";
  m.other.parameters = [&run] { return NamedParams{{"w", run.w}, {"b", run.b}}; };
  m.other.save = [&run](const std::string& dir) {
    fs::create_directories(dir);
    safetensors::save((fs::path(dir) / "model.safetensors").string(), {{"w", run.w}, {"b", run.b}});
  };
  m.params = m.other.parameters();
  m.optim = settings(5e-2, 0);
  Regression algo(run.w, run.b);
  dist::Dist one;
  train(cfg, opt, {m}, algo, one);
  return run;
}

TEST(Trainer, TrainsAModelThatIsNotATransformer) {
  const auto whole = temp_dir("regression_whole"), parts = temp_dir("regression_parts");
  const auto a = run_regression(whole, 40);
  const auto rows = metrics(whole);
  ASSERT_EQ(rows.size(), 40u);
  EXPECT_LT(rows.back()["loss"].get<double>(), 0.1 * rows.front()["loss"].get<double>());
  EXPECT_NEAR(a.w[0].item<double>(), 1.5, 0.2);
  // final/ is what the model's own save writes.
  auto final_file = safetensors::File::open((whole / "final" / "model.safetensors").string());
  EXPECT_TRUE(final_file.tensors().size() == 2u);
  // Validation images go to images/step_N/ (and TensorBoard).
  std::ifstream image(whole / "images" / "step_40" / "weights.png");
  std::string text((std::istreambuf_iterator<char>(image)), std::istreambuf_iterator<char>());
  EXPECT_EQ(text, fmt::format("{:.6f}", a.w[0].item<double>()));
  // Checkpoints hold its trained tensors, and a resumed run ends where the whole one did.
  run_regression(parts, 20);
  EXPECT_TRUE(fs::exists(parts / "checkpoints" / "step_20" / "regression" / "trainable.safetensors"));
  const auto b = run_regression(parts, 40);
  EXPECT_TRUE(a.w.equal(b.w));
  EXPECT_TRUE(a.b.equal(b.b));
  fs::remove_all(whole);
  fs::remove_all(parts);
}

// trainer.deterministic asks torch for deterministic kernels, with errors rather than warnings
// where an op has none (warn-only keeps the memory-efficient attention's varying backward pass).
TEST(Trainer, DeterministicKernelsAreAskedOfTorch) {
  auto& ctx = at::globalContext();
  const bool algorithms = ctx.deterministicAlgorithms(), warn_only = ctx.deterministicAlgorithmsWarnOnly(),
             cudnn = ctx.deterministicCuDNN(), benchmark = ctx.benchmarkCuDNN();
  const char* env = std::getenv("CUBLAS_WORKSPACE_CONFIG");
  const std::string workspace = env ? env : "";
  unsetenv("CUBLAS_WORKSPACE_CONFIG");  // a value already set would be kept
  use_deterministic_kernels();
  EXPECT_TRUE(ctx.deterministicAlgorithms());
  EXPECT_FALSE(ctx.deterministicAlgorithmsWarnOnly());
  EXPECT_TRUE(ctx.deterministicCuDNN());
  EXPECT_FALSE(ctx.benchmarkCuDNN());
  EXPECT_STREQ(std::getenv("CUBLAS_WORKSPACE_CONFIG"), ":4096:8");
  ctx.setDeterministicAlgorithms(algorithms, warn_only);
  ctx.setDeterministicCuDNN(cudnn);
  ctx.setBenchmarkCuDNN(benchmark);
  if (env)
    setenv("CUBLAS_WORKSPACE_CONFIG", workspace.c_str(), 1);
  else
    unsetenv("CUBLAS_WORKSPACE_CONFIG");
}

// With frozen embeddings the first layer's input needs no gradient; a checkpointed layer must
// still give its weights theirs, the same as without checkpointing.
TEST(ActivationCheckpointing, GradientsReachLayersWhoseInputNeedsNone) {
  const auto ids = at::randint(64, {1, 9}, at::kLong);
  std::vector<std::map<std::string, at::Tensor>> grads;
  for (bool checkpoint : {false, true}) {
    Transformer m = init_transformer(small_config(), at::kCPU, 5);
    for (auto& [name, t] : named_parameters(m)) t.requires_grad_(name != "model.embed_tokens.weight");
    sequence_logprob(m, {ids}, checkpoint).backward();
    std::map<std::string, at::Tensor> g;
    for (auto& [name, t] : named_parameters(m))
      if (t.requires_grad()) {
        EXPECT_TRUE(t.grad().defined()) << name << (checkpoint ? " with" : " without") << " checkpointing";
        if (t.grad().defined()) g.emplace(name, t.grad().clone());
      }
    grads.push_back(g);
  }
  ASSERT_EQ(grads[0].size(), grads[1].size());
  for (const auto& [name, g] : grads[0]) EXPECT_LT(max_change(g, grads[1].at(name)), 1e-6) << name;
}

}  // namespace
