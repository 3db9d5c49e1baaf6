// Tensor parallelism (Megatron's split) on CPU ranks over Gloo. Two ranks of this test binary (started
// again, as in test_dist.cpp) hold each family's fixture whole and split, and compare logits, log-probs
// and every parameter's gradient with the matching slice of the whole model's. Then end to end through
// aligner launch: SFT, DPO and GRPO with trainer.tensor_parallel=2 train as one rank does, 2 data x 2
// tensor ranks too; a run resumes on the same or another tensor-parallel size (checkpoints hold whole
// tensors); generate and perplexity --tensor-parallel 2 give one process's output; what is not built is
// a one-line error. LoRA adapters split as their projections: on two tensor ranks they match the whole
// model's (forward, gradients, dropout, initialisation, PEFT folders), and SFT and DPO with adapters,
// a resumed run, a continued adapter and generation with one train and run as one rank does.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <thread>

#include "core/torch_compat.h"
#include "io/peft_adapter.h"
#include "io/safetensors.h"
#include "model/tensor_parallel.h"
#include "model/transformer.h"
#include "online_fixtures.h"
#include "run_outputs.h"
#include "test_ranks.h"
#include "test_util.h"
#include "train/run_setup.h"

namespace aligner::test {
namespace {

namespace fs = std::filesystem;

const std::string kModels = kRoot + "/tests/fixtures/models/";
const std::string kSftData = kRoot + "/examples/data/code-alpaca/code-alpaca-300.jsonl";
const std::string kDpoData = kRoot + "/examples/data/nemo-aligner/dummy-dpo.jsonl";

// ---- two ranks of this binary: each family whole and split ----

// At most `tolerance` apart, relative to the larger of 1 and `want`'s largest magnitude.
void expect_close(const at::Tensor& got, const at::Tensor& want, double tolerance, const std::string& what) {
  ASSERT_EQ(got.sizes(), want.sizes()) << what;
  const double scale = std::max(1.0, want.abs().max().item<double>());
  EXPECT_LE((got - want).abs().max().item<double>(), tolerance * scale) << what;
}

// Three rows of T tokens: one plain, one left-padded, one packed with two segments.
struct Batch {
  ForwardInput in;
  at::Tensor targets;      // the next token, -1 where there is none (padding, a segment's end)
  at::Tensor weights;      // per position, for the loss
  at::Tensor logit_scale;  // [B, T, 1]: small, 0 on padding
};

Batch fixed_batch(int64_t vocab) {
  const int64_t B = 3, T = 28, padded = 5, cut = 12;
  auto gen = at::detail::createCPUGenerator(11);
  const auto longs = at::TensorOptions().dtype(at::kLong);
  Batch b;
  b.in.input_ids = at::randint(vocab, {B, T}, gen, longs);
  b.in.attention_mask = at::ones({B, T}, longs);
  b.in.attention_mask[1].narrow(0, 0, padded).zero_();
  b.in.segment_ids = at::zeros({B, T}, longs);
  b.in.segment_ids[2].narrow(0, cut, T - cut).fill_(1);
  b.in.position_ids = at::arange(T, longs).repeat({B, 1});
  b.in.position_ids[1] = (b.in.attention_mask[1].cumsum(0) - 1).clamp_min(0);
  b.in.position_ids[2].narrow(0, cut, T - cut).copy_(at::arange(T - cut, longs));
  b.targets = at::full({B, T}, -1, longs);
  const auto next_valid =
      b.in.attention_mask.narrow(1, 0, T - 1)
          .logical_and(b.in.attention_mask.narrow(1, 1, T - 1))
          .logical_and(b.in.segment_ids.narrow(1, 0, T - 1) == b.in.segment_ids.narrow(1, 1, T - 1));
  b.targets.narrow(1, 0, T - 1).copy_(at::where(next_valid, b.in.input_ids.narrow(1, 1, T - 1), -1));
  b.weights = at::randn({B, T}, gen) / double(B * T);
  b.logit_scale = b.in.attention_mask.to(at::kFloat).unsqueeze(-1) * 1e-2;
  return b;
}

struct Outputs {
  at::Tensor logits, logprobs;
};

// Logits and log-probs, and the gradients of a loss of both in what requires them.
Outputs loss_backward(const Transformer& m, const Batch& b) {
  const auto hidden = forward_hidden(m, b.in);
  Outputs out{lm_logits(m, hidden), token_logprobs(m, hidden, b.targets)};
  const auto w = at::randn(out.logits.sizes(), at::detail::createCPUGenerator(5));
  ((out.logprobs * b.weights).sum() + (out.logits * w * b.logit_scale).sum()).backward();
  return {out.logits.detach(), out.logprobs.detach()};
}

// The same, in every parameter.
Outputs forward_backward(const Transformer& m, const Batch& b) {
  for (auto& [name, p] : named_parameters(m)) p.requires_grad_(true);
  return loss_backward(m, b);
}

void check_family(const std::string& family, const TensorParallel& tp) {
  const std::string dir = kModels + family;
  set_process_tensor_parallel(std::nullopt);
  const Transformer whole = load_transformer(dir, at::kCPU, at::kFloat);
  set_process_tensor_parallel(tp);
  const Transformer split = load_transformer(dir, at::kCPU, at::kFloat);
  ASSERT_TRUE(split.tp);
  EXPECT_EQ(split.cfg.num_heads * 2, whole.cfg.num_heads);
  EXPECT_EQ(split.embed.size(0), (whole.cfg.vocab_size + 1) / 2);

  const Batch b = fixed_batch(whole.cfg.vocab_size);
  // Inference first (nothing recorded: the partial sums are taken in place), then training.
  {
    at::NoGradGuard no_grad;
    const auto want = lm_logits(whole, forward_hidden(whole, b.in));
    expect_close(lm_logits(split, forward_hidden(split, b.in)), want, 1e-5, family + " logits, no grad");
  }
  const Outputs want = forward_backward(whole, b), got = forward_backward(split, b);
  const auto real = b.in.attention_mask.to(at::kBool);
  expect_close(got.logits.index({real}), want.logits.index({real}), 1e-5, family + " logits");
  expect_close(got.logprobs, want.logprobs, 1e-5, family + " token_logprobs");

  std::map<std::string, at::Tensor> whole_params;
  for (const auto& [name, p] : named_parameters(whole)) whole_params.emplace(name, p);
  const auto params = named_parameters(split);
  EXPECT_EQ(params.size(), whole_params.size());
  int sliced = 0;
  for (const auto& [name, p] : params) {
    const auto it = whole_params.find(name);
    ASSERT_NE(it, whole_params.end()) << family << ": " << name;
    const SliceSpec spec = tensor_slice(*split.tp, name);
    sliced += spec.dim >= 0;
    EXPECT_TRUE(p.detach().equal(take_slice(it->second.detach(), spec))) << family << ": " << name;
    ASSERT_TRUE(p.grad().defined()) << family << ": " << name;
    const auto want_grad = take_slice(it->second.grad(), spec);
    // A gradient of zeros would pass any comparison.
    EXPECT_GT(want_grad.abs().max().item<double>(), 0) << family << ": " << name;
    expect_close(p.grad(), want_grad, 1e-5, family + " grad of " + name);
  }
  EXPECT_GT(sliced, 0) << family;
}

TEST(TensorParallelWorker, Families) {
  const char* done = std::getenv("ALIGNER_TP_TEST_DONE");
  if (!done) GTEST_SKIP() << "runs as a rank started by TensorParallel.EachFamilyMatchesTheWholeModel";
  dist::Dist data = split_tensor_parallel(
      dist::Dist::init(dist::read_dist_env(), at::kCPU, std::chrono::seconds(60)), 2, "test");
  EXPECT_EQ(data.world_size(), 1);
  ASSERT_NE(process_tensor_parallel(), nullptr);
  const TensorParallel tp = *process_tensor_parallel();
  ASSERT_EQ(tp.size(), 2);
  for (const std::string family :
       {"llama2", "llama3", "llama_bias", "mistral", "qwen2", "qwen3", "nemotron", "llama_dynamic"}) {
    check_family(family, tp);
    set_process_tensor_parallel(tp);
  }
  // Mixtral: each expert split as a gated MLP, the router replicated; with the load-balancing loss's
  // gradient, which every rank gives its router whole.
  router_aux_loss() = {0.05, 0, 0};
  check_family("mixtral", tp);
  router_aux_loss() = {};
  set_process_tensor_parallel(std::nullopt);
  if (!HasFailure()) std::ofstream(std::string(done) + "/rank" + std::to_string(tp.rank())) << "ok\n";
}

// LoRA adapters on every projection, whole and split from the same seed: the split ones are the whole
// ones' slices (A replicated beside a column-parallel weight, B beside a row-parallel one), and with
// dropout drawn alike the logits, log-probs and adapter gradients match; gathered, a split model's
// adapters are whole, and a PEFT folder of whole adapters loads into a split model as its slices.
void check_adapters(const std::string& family, const TensorParallel& tp, const fs::path& shared_dir) {
  const std::string dir = kModels + family;
  LoraConfig c;
  c.rank = 4;
  c.alpha = 8;
  c.dropout = 0.25;
  c.targets = kLoraTargets;
  set_process_tensor_parallel(std::nullopt);
  Transformer whole = load_transformer(dir, at::kCPU, at::kFloat);
  add_adapters(whole, c, 9);
  set_process_tensor_parallel(tp);
  Transformer split = load_transformer(dir, at::kCPU, at::kFloat);
  add_adapters(split, c, 9);
  ASSERT_TRUE(split.tp);
  const TensorSplit& s = *split.tp;

  std::map<std::string, at::Tensor> whole_adapters;
  for (const auto& [name, t] : adapter_parameters(whole)) whole_adapters.emplace(name, t);
  const auto adapters = adapter_parameters(split);
  ASSERT_EQ(adapters.size(), whole_adapters.size()) << family;
  int sliced = 0;
  for (const auto& [name, t] : adapters) {
    const SliceSpec spec = tensor_slice(s, name);
    const bool a = name.find(".lora_A.") != std::string::npos;
    const bool row = name.find("o_proj") != std::string::npos || name.find("down_proj") != std::string::npos;
    // Split where the weight is: a row-parallel projection's A, a column-parallel one's B.
    EXPECT_EQ(spec.dim, a == row ? (a ? 1 : 0) : -1) << family << ": " << name;
    sliced += spec.dim >= 0;
    EXPECT_TRUE(t.equal(take_slice(whole_adapters.at(name), spec))) << family << " init of " << name;
  }
  EXPECT_EQ(sliced, int(adapters.size()) / 2) << family;

  // B starts at zero, which would hide what B carries: random values, the same on every rank.
  {
    at::NoGradGuard no_grad;
    auto gen = at::detail::createCPUGenerator(13);
    for (auto& [name, t] : whole_adapters)
      if (name.find(".lora_B.") != std::string::npos) t.copy_(at::randn(t.sizes(), gen) * 0.1);
    for (const auto& [name, t] : adapters)
      t.copy_(take_slice(whole_adapters.at(name), tensor_slice(s, name)));
  }
  for (const Transformer* m : {&whole, &split}) {
    for (auto& [name, p] : named_parameters(*m)) p.requires_grad_(false);
    for (auto& [name, p] : adapter_parameters(*m)) p.requires_grad_(true);
  }
  const Batch b = fixed_batch(whole.cfg.vocab_size);
  // The same dropout masks: the whole draws each projection's, the split the same from the same state.
  at::manual_seed(21);
  const Outputs want = loss_backward(whole, b);
  at::manual_seed(21);
  const Outputs got = loss_backward(split, b);
  const auto real = b.in.attention_mask.to(at::kBool);
  expect_close(got.logits.index({real}), want.logits.index({real}), 1e-5, family + " adapted logits");
  expect_close(got.logprobs, want.logprobs, 1e-5, family + " adapted token_logprobs");
  for (const auto& [name, t] : adapters) {
    const auto& w = whole_adapters.at(name);
    ASSERT_TRUE(t.grad().defined()) << family << ": " << name;
    const auto want_grad = take_slice(w.grad(), tensor_slice(s, name));
    EXPECT_GT(want_grad.abs().max().item<double>(), 0) << family << ": " << name;
    expect_close(t.grad(), want_grad, 1e-5, family + " grad of " + name);
  }
  // Without gradients (generation): the partial sums taken in place, no dropout.
  {
    at::NoGradGuard no_grad;
    expect_close(lm_logits(split, forward_hidden(split, b.in)), lm_logits(whole, forward_hidden(whole, b.in)),
                 1e-5, family + " adapted logits, no grad");
  }

  const Transformer gathered = gather_transformer(split);
  const auto gathered_adapters = adapter_parameters(gathered);
  ASSERT_EQ(gathered_adapters.size(), whole_adapters.size()) << family;
  for (const auto& [name, t] : gathered_adapters)
    EXPECT_TRUE(t.equal(whole_adapters.at(name).detach())) << family << " gathered " << name;
  EXPECT_EQ(adapter_config(gathered).rank, c.rank);

  // A PEFT folder of the whole adapters (rank 0 writes it) loads into a split model as its slices; a
  // split model's own adapters are no folder.
  const std::string folder = (shared_dir / ("peft_" + family)).string();
  if (tp.rank() == 0) save_peft_adapter(whole, c, folder, dir, "", Replace::anything);
  tp.group->barrier();
  Transformer loaded = load_transformer(dir, at::kCPU, at::kFloat);
  load_peft_adapter(loaded, folder);
  const auto loaded_adapters = adapter_parameters(loaded);
  ASSERT_EQ(loaded_adapters.size(), adapters.size()) << family;
  for (size_t i = 0; i < adapters.size(); ++i)
    EXPECT_TRUE(loaded_adapters[i].second.equal(adapters[i].second.detach()))
        << family << " loaded " << loaded_adapters[i].first;
  EXPECT_NE(error_of([&] {
              save_peft_adapter(split, c, folder + "_split", dir, "", Replace::anything);
            }).find("tensor-parallel"),
            std::string::npos);
  tp.group->barrier();
}

TEST(TensorParallelWorker, Adapters) {
  const char* done = std::getenv("ALIGNER_TP_TEST_DONE");
  if (!done) GTEST_SKIP() << "runs as a rank started by TensorParallel.AdaptersMatchTheWholeModel";
  const dist::Dist data = split_tensor_parallel(
      dist::Dist::init(dist::read_dist_env(), at::kCPU, std::chrono::seconds(60)), 2, "test");
  ASSERT_NE(process_tensor_parallel(), nullptr);
  const TensorParallel tp = *process_tensor_parallel();
  // llama_bias: one key/value head, shared by both ranks, and biases; qwen3: per-head norms.
  for (const std::string family : {"llama3", "llama_bias", "qwen3", "nemotron"})
    check_adapters(family, tp, done);
  set_process_tensor_parallel(std::nullopt);
  if (!HasFailure()) std::ofstream(std::string(done) + "/rank" + std::to_string(tp.rank())) << "ok\n";
}

// `filter`'s test run by `ranks` copies of this binary as the ranks of one group; whether each exited
// cleanly and wrote DONE/rank<r>.
void run_worker_ranks(const std::string& filter, int ranks) {
  const auto dir = temp_dir("tp_worker");
  run_test_ranks(filter, ranks, dir.string(), {"ALIGNER_TP_TEST_DONE=" + dir.string()});
  fs::remove_all(dir);
}

TEST(TensorParallel, EachFamilyMatchesTheWholeModel) {
  if (!ALIGNER_HAS_GLOO) GTEST_SKIP() << "this libtorch build has no Gloo headers";
  run_worker_ranks("TensorParallelWorker.Families", 2);
}

TEST(TensorParallel, AdaptersMatchTheWholeModel) {
  if (!ALIGNER_HAS_GLOO) GTEST_SKIP() << "this libtorch build has no Gloo headers";
  run_worker_ranks("TensorParallelWorker.Adapters", 2);
}

// ---- end to end, through aligner launch ----

// `aligner ARGS` as `ranks` local ranks on a free port; a hang is killed.
Run launch(int ranks, const std::string& args, const std::string& env = "") {
  return run_aligner("launch --nproc-per-node " + std::to_string(ranks) + " --master-port " +
                         std::to_string(free_port()) + " -- " + ALIGNER_BINARY + " " + args,
                     env + " timeout -s KILL 300");
}

bool no_gloo(const Run& r) {
  return r.output.find("needs Gloo") != std::string::npos;
}

// Four examples per step: one rank accumulates two micro-batches, two data replicas take one each.
std::string sft_args(const fs::path& out, const std::string& extra = "") {
  return "sft model.path=" + tiny_model() + " data.train=" + kSftData +
         " data.max_length=64 model.device=cpu optim.lr=1e-3 optim.scheduler=constant optim.weight_decay=0.1 "
         "trainer.seed=7 trainer.micro_batch_size=2 trainer.global_batch_size=4 trainer.max_steps=4 "
         "output_dir=" +
         out.string() + " " + extra;
}

std::string dpo_args(const fs::path& out, const std::string& extra = "") {
  return "dpo model.path=" + tiny_model() + " data.train=" + kDpoData +
         " data.max_length=64 model.device=cpu optim.lr=1e-3 optim.scheduler=constant trainer.seed=3 "
         "trainer.micro_batch_size=2 trainer.global_batch_size=4 trainer.max_steps=3 output_dir=" +
         out.string() + " " + extra;
}

void expect_same_losses(const fs::path& a, const fs::path& b, double tolerance) {
  const auto ma = metrics(a), mb = metrics(b);
  ASSERT_EQ(ma.size(), mb.size()) << a << " " << b;
  for (size_t i = 0; i < ma.size(); ++i)
    for (const char* key : {"loss", "grad_norm"})
      EXPECT_NEAR(ma[i][key].get<double>(), mb[i][key].get<double>(), tolerance)
          << b << " step " << i + 1 << " " << key;
}

// SFT (checkpoints every 2 steps) on two tensor ranks killed at step 3 and resumed ends exactly as the
// uninterrupted run out/`two` did; a two-rank checkpoint continued on one rank, and a one-rank checkpoint
// on two tensor ranks, end as the one-rank run out/one did (within 1e-5). `same` compares two final/.
void expect_resumes_across_layouts(
    const fs::path& out, const std::string& one_args, const std::string& tp2_args, const std::string& two,
    const std::function<void(const fs::path&, const fs::path&, double)>& same) {
  const auto killed = launch(2, sft_args(out / "killed", tp2_args), "ALIGNER_KILL_AT_STEP=3");
  ASSERT_NE(killed.status, 0) << killed.output;
  ASSERT_FALSE(fs::exists(out / "killed" / "final"));
  const auto resumed = launch(2, sft_args(out / "killed", tp2_args));
  ASSERT_EQ(resumed.status, 0) << resumed.output;
  EXPECT_NE(resumed.output.find("resuming from"), std::string::npos) << resumed.output;
  same(out / two / "final", out / "killed" / "final", 0);
  expect_same_losses(out / two, out / "killed", 0);

  const auto first_two = launch(2, sft_args(out / "two_then_one", tp2_args), "ALIGNER_KILL_AT_STEP=2");
  ASSERT_NE(first_two.status, 0) << first_two.output;
  const auto then_one = run_aligner(sft_args(out / "two_then_one", one_args));
  ASSERT_EQ(then_one.status, 0) << then_one.output;
  EXPECT_NE(then_one.output.find("resuming from"), std::string::npos) << then_one.output;
  same(out / "one" / "final", out / "two_then_one" / "final", 1e-5);
  expect_same_losses(out / "one", out / "two_then_one", 1e-5);

  const auto first_one = run_aligner(sft_args(out / "one_then_two", one_args), "ALIGNER_KILL_AT_STEP=2");
  ASSERT_NE(first_one.status, 0) << first_one.output;
  const auto then_two = launch(2, sft_args(out / "one_then_two", tp2_args));
  ASSERT_EQ(then_two.status, 0) << then_two.output;
  EXPECT_NE(then_two.output.find("resuming from"), std::string::npos) << then_two.output;
  same(out / "one" / "final", out / "one_then_two" / "final", 1e-5);
  expect_same_losses(out / "one", out / "one_then_two", 1e-5);
}

TEST(TensorParallel, SftAndDpoOnTwoTensorRanksTrainAsOneRank) {
  const auto out = temp_dir("tp_train");
  for (const bool dpo : {false, true}) {
    const auto args = [&](const fs::path& dir, const std::string& extra) {
      return dpo ? dpo_args(dir, extra) : sft_args(dir, extra);
    };
    const fs::path one = out / (dpo ? "dpo_one" : "sft_one"), two = out / (dpo ? "dpo_two" : "sft_two");
    const auto r1 = run_aligner(args(one, ""));
    ASSERT_EQ(r1.status, 0) << r1.output;
    const auto r2 = launch(2, args(two, "trainer.tensor_parallel=2"));
    if (no_gloo(r2)) GTEST_SKIP() << "this libtorch has no Gloo for CPU ranks";
    ASSERT_EQ(r2.status, 0) << r2.output;
    EXPECT_NE(r2.output.find("tensor parallel: 2 ranks per model, 1 data-parallel replicas"),
              std::string::npos)
        << r2.output;
    expect_same_losses(one, two, 1e-5);
    expect_same_weights(one / "final", two / "final", 1e-5);
  }
  fs::remove_all(out);
}

std::vector<nlohmann::json> read_lines(const fs::path& path) {
  std::ifstream f(path);
  std::vector<nlohmann::json> rows;
  for (std::string line; std::getline(f, line);) rows.push_back(nlohmann::json::parse(line));
  return rows;
}

// LoRA on every projection (A replicated beside a column-parallel weight, B beside a row-parallel one),
// with and without adapter dropout; merged on save; DPO with the frozen base as its reference.
TEST(TensorParallel, LoraOnTwoTensorRanksTrainsAsOneRank) {
  const auto out = temp_dir("tp_lora");
  const std::string lora = "lora.rank=4 lora.alpha=8 ";
  const std::string tp2 = "trainer.tensor_parallel=2 ";
  for (const std::string extra : {"lora.dropout=0.1", "lora.dropout=0"}) {
    const fs::path one = out / ("one_" + extra), two = out / ("two_" + extra);
    const auto r1 = run_aligner(sft_args(one, lora + extra));
    ASSERT_EQ(r1.status, 0) << r1.output;
    const auto r2 = launch(2, sft_args(two, lora + tp2 + extra));
    if (no_gloo(r2)) GTEST_SKIP() << "this libtorch has no Gloo for CPU ranks";
    ASSERT_EQ(r2.status, 0) << r2.output;
    expect_same_losses(one, two, 1e-5);
    expect_same_adapters(one / "final", two / "final", 1e-5);
  }
  // The adapters are trained (B is no longer zero), else the comparisons above would say little.
  {
    const auto f = safetensors::File::open(
        (out / "one_lora.dropout=0" / "final" / "adapter_model.safetensors").string());
    const auto b = f.get("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight");
    EXPECT_GT(b.abs().max().item<double>(), 0);
  }

  const std::string merged = lora + "lora.dropout=0.1 lora.merge_on_save=true";
  const auto m1 = run_aligner(sft_args(out / "merged_one", merged));
  ASSERT_EQ(m1.status, 0) << m1.output;
  const auto m2 = launch(2, sft_args(out / "merged_two", tp2 + merged));
  ASSERT_EQ(m2.status, 0) << m2.output;
  expect_same_weights(out / "merged_one" / "final", out / "merged_two" / "final", 1e-5);

  const auto d1 = run_aligner(dpo_args(out / "dpo_one", lora + "lora.dropout=0.1"));
  ASSERT_EQ(d1.status, 0) << d1.output;
  const auto d2 = launch(2, dpo_args(out / "dpo_two", lora + tp2 + "lora.dropout=0.1"));
  ASSERT_EQ(d2.status, 0) << d2.output;
  expect_same_losses(out / "dpo_one", out / "dpo_two", 1e-5);
  expect_same_adapters(out / "dpo_one" / "final", out / "dpo_two" / "final", 1e-5);
  fs::remove_all(out);
}

// Adapter checkpoints hold whole tensors too: a tensor-parallel LoRA run killed and resumed on the same
// or another size ends as one never stopped. A trained adapter continues (lora.from) on two tensor ranks
// as on one, and generates (--adapter) as one process does.
TEST(TensorParallel, LoraResumesContinuesAndGeneratesAsOneRank) {
  const auto out = temp_dir("tp_lora_resume");
  const std::string lora =
      "lora.rank=4 lora.alpha=8 lora.dropout=0.1 trainer.save_interval=2 trainer.keep_last=0 ";
  const std::string tp2 = lora + "trainer.tensor_parallel=2";
  const auto one = run_aligner(sft_args(out / "one", lora));
  ASSERT_EQ(one.status, 0) << one.output;
  const auto two = launch(2, sft_args(out / "two", tp2));
  if (no_gloo(two)) GTEST_SKIP() << "this libtorch has no Gloo for CPU ranks";
  ASSERT_EQ(two.status, 0) << two.output;
  // The checkpoint's adapters are whole: row-parallel A has the whole input's columns.
  {
    const auto f = safetensors::File::open(
        (out / "two" / "checkpoints" / "step_2" / "model" / "trainable.safetensors").string());
    EXPECT_EQ(f.get("model.layers.0.mlp.down_proj.lora_A.weight").size(1), 128);
    EXPECT_EQ(f.get("model.layers.0.mlp.up_proj.lora_B.weight").size(0), 128);
  }

  expect_resumes_across_layouts(out, lora, tp2, "two", [](const fs::path& a, const fs::path& b, double tol) {
    expect_same_adapters(a, b, tol);
  });
  if (HasFatalFailure()) return;

  const std::string from = "lora.from=" + (out / "one" / "final").string();
  const auto c1 = run_aligner(sft_args(out / "from_one", from));
  ASSERT_EQ(c1.status, 0) << c1.output;
  const auto c2 = launch(2, sft_args(out / "from_two", from + " trainer.tensor_parallel=2"));
  ASSERT_EQ(c2.status, 0) << c2.output;
  expect_same_losses(out / "from_one", out / "from_two", 1e-5);
  expect_same_adapters(out / "from_one" / "final", out / "from_two" / "final", 1e-5);

  { std::ofstream(out / "prompts.jsonl") << "{\"prompt\": \"Hello there\"}\n{\"input_ids\": [5, 6, 7]}\n"; }
  const std::string gen =
      "generate --model " + tiny_model() + " --adapter " + (out / "one" / "final").string() + " --data " +
      (out / "prompts.jsonl").string() +
      " gen.greedy=true gen.max_new_tokens=8 model.device=cpu data.template=llama3 --out ";
  const auto g1 = run_aligner(gen + (out / "g1.jsonl").string());
  ASSERT_EQ(g1.status, 0) << g1.output;
  const auto g2 = launch(2, gen + (out / "g2.jsonl").string() + " --tensor-parallel 2");
  ASSERT_EQ(g2.status, 0) << g2.output;
  const auto a = read_lines(out / "g1.jsonl"), b = read_lines(out / "g2.jsonl");
  ASSERT_EQ(a.size(), 2u);
  ASSERT_EQ(b.size(), a.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(b[i]["output_ids"], a[i]["output_ids"]) << i;
    const auto la = a[i]["logprobs"].get<std::vector<double>>(),
               lb = b[i]["logprobs"].get<std::vector<double>>();
    ASSERT_EQ(la.size(), lb.size()) << i;
    for (size_t j = 0; j < la.size(); ++j) EXPECT_NEAR(lb[j], la[j], 1e-5) << i << " token " << j;
  }
  fs::remove_all(out);
}

TEST(TensorParallel, TwoDataByTwoTensorRanksTrainAsOneRank) {
  const auto out = temp_dir("tp_mesh");
  const auto one = run_aligner(sft_args(out / "one"));
  ASSERT_EQ(one.status, 0) << one.output;
  const auto four = launch(4, sft_args(out / "four", "trainer.tensor_parallel=2"));
  if (no_gloo(four)) GTEST_SKIP() << "this libtorch has no Gloo for CPU ranks";
  ASSERT_EQ(four.status, 0) << four.output;
  EXPECT_NE(four.output.find("2 data-parallel replicas"), std::string::npos) << four.output;
  expect_same_losses(out / "one", out / "four", 1e-5);
  expect_same_weights(out / "one" / "final", out / "four" / "final", 1e-5);
  fs::remove_all(out);
}

// ZeRO over the data-parallel ranks of a 2 x 2 mesh: each tensor rank's slices sharded over its data
// replicas trains as one rank does, and its per-rank checkpoint files (named by tensor rank) resume
// to the same weights as a run never stopped.
TEST(TensorParallel, ShardingOverTheDataRanksOfAMesh) {
  const auto out = temp_dir("tp_zero");
  const auto one = run_aligner(sft_args(out / "one"));
  ASSERT_EQ(one.status, 0) << one.output;
  const std::string mesh = "trainer.tensor_parallel=2 trainer.save_interval=2 trainer.keep_last=0 ";
  for (const std::string stage : {"optimizer", "full"}) {
    const fs::path dir = out / stage;
    const auto r = launch(4, sft_args(dir, mesh + "trainer.sharding=" + stage));
    if (no_gloo(r)) GTEST_SKIP() << "this libtorch has no Gloo for CPU ranks";
    ASSERT_EQ(r.status, 0) << r.output;
    EXPECT_NE(r.output.find("sharding=" + stage), std::string::npos) << r.output;
    expect_same_losses(out / "one", dir, 1e-5);
    expect_same_weights(out / "one" / "final", dir / "final", 1e-5);
    EXPECT_TRUE(fs::exists(dir / "checkpoints" / "step_2" /
                           "model.tp-1-of-2.optimizer.rank-00001-of-00002.safetensors"));

    const fs::path killed = out / (stage + "_killed");
    const auto first =
        launch(4, sft_args(killed, mesh + "trainer.sharding=" + stage), "ALIGNER_KILL_AT_STEP=3");
    ASSERT_NE(first.status, 0) << first.output;
    const auto resumed = launch(4, sft_args(killed, mesh + "trainer.sharding=" + stage));
    ASSERT_EQ(resumed.status, 0) << resumed.output;
    EXPECT_NE(resumed.output.find("resuming from"), std::string::npos) << resumed.output;
    expect_same_weights(dir / "final", killed / "final");
    expect_same_losses(dir, killed, 0);
  }
  fs::remove_all(out);
}

// A data-parallel run's sharded checkpoint (pieces of whole tensors) continues on two tensor ranks; a
// sharded tensor-parallel one, whose shards are per tensor rank, refuses another layout in one line.
TEST(TensorParallel, ShardedCheckpointsAcrossLayouts) {
  const auto out = temp_dir("tp_zero_layouts");
  const std::string save = "trainer.save_interval=2 trainer.keep_last=0 ";
  const auto one = run_aligner(sft_args(out / "one", save));
  ASSERT_EQ(one.status, 0) << one.output;
  const auto first =
      launch(2, sft_args(out / "zero_then_tp", save + "trainer.sharding=full"), "ALIGNER_KILL_AT_STEP=2");
  if (no_gloo(first)) GTEST_SKIP() << "this libtorch has no Gloo for CPU ranks";
  ASSERT_NE(first.status, 0) << first.output;
  const auto then_tp = launch(2, sft_args(out / "zero_then_tp", save + "trainer.tensor_parallel=2"));
  ASSERT_EQ(then_tp.status, 0) << then_tp.output;
  EXPECT_NE(then_tp.output.find("resuming from"), std::string::npos) << then_tp.output;
  expect_same_weights(out / "one" / "final", out / "zero_then_tp" / "final", 1e-5);

  const auto mesh =
      launch(4, sft_args(out / "mesh", save + "trainer.sharding=optimizer trainer.tensor_parallel=2"),
             "ALIGNER_KILL_AT_STEP=2");
  ASSERT_NE(mesh.status, 0) << mesh.output;
  const auto other = launch(2, sft_args(out / "mesh", save + "trainer.sharding=optimizer"));
  EXPECT_NE(other.status, 0);
  EXPECT_NE(other.output.find("holds no optimizer state for 'model'"), std::string::npos) << other.output;
  fs::remove_all(out);
}

// Checkpoints hold whole tensors (gathered over the group): a killed tensor-parallel run resumes as
// it was, and a checkpoint of either layout goes on in the other.
TEST(TensorParallel, ResumeOnTheSameOrAnotherTensorParallelSize) {
  const auto out = temp_dir("tp_resume");
  const std::string save = "trainer.save_interval=2 trainer.keep_last=0 ";
  const std::string tp2 = save + "trainer.tensor_parallel=2";
  const auto one = run_aligner(sft_args(out / "one", save));
  ASSERT_EQ(one.status, 0) << one.output;
  const auto whole = launch(2, sft_args(out / "whole", tp2));
  if (no_gloo(whole)) GTEST_SKIP() << "this libtorch has no Gloo for CPU ranks";
  ASSERT_EQ(whole.status, 0) << whole.output;
  // The checkpoint's model is the whole one: it loads as the tiny model's shapes.
  {
    const auto saved =
        load_transformer((out / "whole" / "checkpoints" / "step_2" / "model").string(), at::kCPU);
    const auto base = named_parameters(load_transformer(tiny_model(), at::kCPU));
    const auto got = named_parameters(saved);
    ASSERT_EQ(got.size(), base.size());
    for (size_t i = 0; i < got.size(); ++i)
      EXPECT_EQ(got[i].second.sizes(), base[i].second.sizes()) << got[i].first;
  }

  expect_resumes_across_layouts(
      out, save, tp2, "whole",
      [](const fs::path& a, const fs::path& b, double tol) { expect_same_weights(a, b, tol); });
  fs::remove_all(out);
}

TEST(TensorParallel, GreedyGenerationAndPerplexityMatchOneProcess) {
  const auto out = temp_dir("tp_generate");
  {
    std::ofstream(out / "prompts.jsonl")
        << "{\"prompt\": \"Hello there\"}\n"
        << "{\"input_ids\": [5, 6, 7]}\n"
        << "{\"messages\": [{\"role\": \"user\", \"content\": \"Tell me about the sea\"}]}\n";
  }
  const std::string gen = "generate --model " + tiny_model() + " --data " + (out / "prompts.jsonl").string() +
                          " gen.greedy=true gen.max_new_tokens=8 gen.num_samples=2 model.device=cpu "
                          "data.template=llama3 --out ";
  const auto g1 = run_aligner(gen + (out / "one.jsonl").string());
  ASSERT_EQ(g1.status, 0) << g1.output;
  const auto g2 = launch(2, gen + (out / "two.jsonl").string() + " --tensor-parallel 2");
  if (no_gloo(g2)) GTEST_SKIP() << "this libtorch has no Gloo for CPU ranks";
  ASSERT_EQ(g2.status, 0) << g2.output;
  const auto a = read_lines(out / "one.jsonl"), b = read_lines(out / "two.jsonl");
  ASSERT_EQ(a.size(), 6u);
  ASSERT_EQ(b.size(), a.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(b[i]["output_ids"], a[i]["output_ids"]) << i;
    EXPECT_EQ(b[i]["text"], a[i]["text"]) << i;
    const auto la = a[i]["logprobs"].get<std::vector<double>>(),
               lb = b[i]["logprobs"].get<std::vector<double>>();
    ASSERT_EQ(la.size(), lb.size()) << i;
    for (size_t j = 0; j < la.size(); ++j) EXPECT_NEAR(lb[j], la[j], 1e-5) << i << " token " << j;
  }

  // Perplexity over random id sequences: the per-sequence log-probs (sums) and the summary.
  {
    std::ofstream f(out / "ids.jsonl");
    auto g = at::detail::createCPUGenerator(3);
    for (int64_t n : {40, 9, 25}) {
      const auto ids = at::randint(6000, {n}, g, at::TensorOptions().dtype(at::kLong));
      f << nlohmann::json{{"input_ids",
                           std::vector<int64_t>(ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + n)}}
               .dump()
        << "\n";
    }
  }
  const std::string ppl = "perplexity --model " + tiny_model() + " --data " + (out / "ids.jsonl").string() +
                          " --device cpu --batch-size 2";
  const auto p1 = run_aligner(ppl);
  ASSERT_EQ(p1.status, 0) << p1.output;
  const auto p2 = launch(2, ppl + " --tensor-parallel 2");
  ASSERT_EQ(p2.status, 0) << p2.output;
  const auto ra = json_lines(p1.output), rb = json_lines(p2.output);
  ASSERT_EQ(ra.size(), 4u) << p1.output;
  ASSERT_EQ(rb.size(), ra.size()) << p2.output;
  for (size_t i = 0; i < ra.size(); ++i)
    for (const auto& [key, value] : ra[i].items()) {
      ASSERT_TRUE(rb[i].contains(key)) << i << " " << key;
      if (!value.is_number_float()) {
        EXPECT_EQ(rb[i][key], value) << i << " " << key;
        continue;
      }
      const double x = value.get<double>();
      EXPECT_NEAR(rb[i][key].get<double>(), x, 1e-5 * std::max(1.0, std::abs(x))) << i << " " << key;
    }
  fs::remove_all(out);
}

// The line of `output` that holds `fragment`: one line, an error's.
void expect_error_line(const Run& r, const std::string& fragment) {
  EXPECT_NE(r.status, 0) << r.output;
  std::istringstream in(r.output);
  for (std::string line; std::getline(in, line);)
    if (line.find(fragment) != std::string::npos) {
      EXPECT_EQ(line.rfind("error: ", 0), 0u) << line;
      return;
    }
  ADD_FAILURE() << "no line holds '" << fragment << "':\n" << r.output;
}

TEST(TensorParallel, WhatIsNotBuiltIsAOneLineError) {
  const auto out = temp_dir("tp_errors");
  const auto r = launch(2, sft_args(out / "a", "trainer.tensor_parallel=3"));
  if (no_gloo(r)) GTEST_SKIP() << "this libtorch has no Gloo for CPU ranks";
  expect_error_line(r, "trainer.tensor_parallel=3 must divide the number of ranks (2)");
  { std::ofstream(out / "p.jsonl") << "{\"input_ids\": [5, 6, 7]}\n"; }
  expect_error_line(
      run_aligner("generate --model " + tiny_model() + " --data " + (out / "p.jsonl").string() + " --out " +
                  (out / "g.jsonl").string() + " model.device=cpu --tensor-parallel 2"),
      "needs as many ranks, and 1 were started: run it under aligner launch --nproc-per-node 2");
  fs::remove_all(out);
}

// GRPO: the rollouts (the split policy generating, the split reward model scoring), the reference's
// KL and the updates as one rank's.
// Online training on two tensor ranks: generation, the reward model, the reference (and PPO's critic)
// all split, every metric as on one rank.
TEST(TensorParallel, GrpoAndPpoOnTwoTensorRanksMatchOneRank) {
  const auto out = temp_dir("tp_online");
  const std::map<std::string, std::string> runs = {
      {"grpo",
       online_args("reinforce model.path=" + tiny_model(), out / "grpo_DIR") +
           " rollout.prompts_per_step=4 rollout.samples_per_prompt=4 trainer.micro_batch_size=4"
           " reinforce.mask_unfinished=false optim.lr=2e-3 reinforce.advantage=grpo trainer.max_steps=2"},
      {"ppo", online_args("ppo actor.path=" + tiny_model(), out / "ppo_DIR") +
                  " rollout.prompts_per_step=4 rollout.samples_per_prompt=2 trainer.micro_batch_size=4"
                  " ppo.minibatches=2 ppo.mask_unfinished=false actor.optim.lr=2e-3 critic.optim.lr=2e-3"
                  " trainer.max_steps=2"}};
  for (const auto& [name, args] : runs) {
    // A copy: C++17 lambdas cannot capture a structured binding (clang refuses it).
    const std::string base = args;
    const auto at = [&base](const std::string& dir) {
      std::string a = base;
      return a.replace(a.find("DIR"), 3, dir);
    };
    const auto one = run_aligner(at("one"));
    ASSERT_EQ(one.status, 0) << one.output;
    const auto two = launch(2, at("two") + " trainer.tensor_parallel=2");
    if (no_gloo(two)) GTEST_SKIP() << "this libtorch has no Gloo for CPU ranks";
    ASSERT_EQ(two.status, 0) << two.output;
    for (const std::string split : {"train", "validation"}) {
      const auto a = metrics(out / (name + "_one"), split), b = metrics(out / (name + "_two"), split);
      ASSERT_EQ(a.size(), split == "train" ? 2u : 1u) << name;
      ASSERT_EQ(b.size(), a.size()) << name;
      for (size_t i = 0; i < a.size(); ++i)
        for (const auto& [key, value] : a[i].items()) {
          // Timings and throughputs differ from run to run.
          if (!value.is_number_float() || key.find("time") != std::string::npos ||
              key.find("seconds") != std::string::npos || key.find("per_s") != std::string::npos)
            continue;
          const double x = value.get<double>();
          EXPECT_NEAR(b[i][key].get<double>(), x, 1e-4 * (1 + std::abs(x)))
              << name << " " << split << " step " << i + 1 << " " << key;
        }
    }
  }
  fs::remove_all(out);
}

// SPIN's reference snapshots are whole models gathered over the group: a two-iteration run on two
// tensor ranks trains as one rank does, and killed inside its second iteration it resumes from the
// snapshot (read back as this rank's slices) to the same weights.
TEST(TensorParallel, SpinSnapshotsWholeModelsAndResumes) {
  const auto out = temp_dir("tp_spin");
  copy_lines(kSftData, out / "train.jsonl", 0, 8);
  const auto args = [&](const fs::path& dir, const std::string& extra) {
    return "spin model.path=" + tiny_model() + " data.train=" + (out / "train.jsonl").string() +
           " model.device=cpu data.max_length=128 spin.max_new_tokens=16 trainer.micro_batch_size=2"
           " trainer.global_batch_size=4 optim.lr=1e-3 optim.scheduler=constant trainer.seed=5 "
           "spin.iterations=2"
           " spin.beta=[0.1,0.1] trainer.save_interval=1 output_dir=" +
           dir.string() + " " + extra;
  };
  const auto one = run_aligner(args(out / "one", ""));
  ASSERT_EQ(one.status, 0) << one.output;
  const auto two = launch(2, args(out / "two", "trainer.tensor_parallel=2"));
  if (no_gloo(two)) GTEST_SKIP() << "this libtorch has no Gloo for CPU ranks";
  ASSERT_EQ(two.status, 0) << two.output;
  // Adam's normalised steps move a weight whose gradient is rounding noise by up to lr (1e-3) a step:
  // a tenth of that bounds what the split's rounding makes of four steps.
  expect_same_losses(out / "one", out / "two", 1e-5);
  expect_same_weights(out / "one" / "final", out / "two" / "final", 1e-4);
  expect_same_weights(out / "one" / "reference" / "step_2", out / "two" / "reference" / "step_2", 1e-4);

  const auto killed = launch(2, args(out / "killed", "trainer.tensor_parallel=2"), "ALIGNER_KILL_AT_STEP=3");
  ASSERT_NE(killed.status, 0) << killed.output;
  const auto resumed = launch(2, args(out / "killed", "trainer.tensor_parallel=2"));
  ASSERT_EQ(resumed.status, 0) << resumed.output;
  EXPECT_NE(resumed.output.find("read from"), std::string::npos) << resumed.output;
  expect_same_weights(out / "two" / "final", out / "killed" / "final");
  fs::remove_all(out);
}

}  // namespace
}  // namespace aligner::test
