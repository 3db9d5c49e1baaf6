// `aligner kd-prepare` and `aligner sft kd.logits=FILE`: the stored top-k is the teacher's, a run
// that distils from the file reports the losses of the same run with the teacher live (padded and
// packed batches), and a file made for other data or settings is refused with a one-line error.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "data/packing.h"
#include "data/sft_data.h"
#include "io/hf_checkpoint.h"
#include "io/safetensors.h"
#include "model/transformer.h"
#include "run_outputs.h"
#include "test_util.h"
#include "text/chat_template.h"

namespace fs = std::filesystem;
using namespace aligner;
using namespace aligner::test;

namespace {

const std::string kData = kRoot + "/examples/data/code-alpaca/code-alpaca-300.jsonl";

// The student is tiny_model(); the teacher is the same architecture with other random weights, so
// that distillation has something to move.
const std::string& teacher() {
  static const std::string dir = [] {
    const auto d = temp_dir("kdp_teacher") / "m";
    std::ifstream config(fs::path(tiny_model()) / "config.json");
    auto m = init_transformer(parse_model_config(nlohmann::json::parse(config), "teacher"), at::kCPU, 7);
    save_transformer(m, d.string(), std::nullopt, 0, tiny_model());
    return d.string();
  }();
  return dir;
}

// Records [skip, skip + n) of the example data, as a file of their own.
std::string data_file(const fs::path& dir, const std::string& name, int n, int skip = 0) {
  std::ifstream in(kData);
  const auto path = dir / name;
  std::ofstream out(path);
  std::string line;
  for (int i = 0; i < skip + n && std::getline(in, line); ++i)
    if (i >= skip) out << line << "\n";
  return path.string();
}

// The line the CLI prints for an aligner::Error; "" when there is none.
std::string error_line(const std::string& output) {
  const auto at = output.rfind("error: ");
  if (at == std::string::npos) return "";
  return output.substr(at, output.find('\n', at) - at);
}

std::string prepare_args(const std::string& data, const std::string& extra, int max_length = 128) {
  return "kd-prepare kd.teacher=" + teacher() + " data.train=" + data +
         " data.max_length=" + std::to_string(max_length) + " model.device=cpu " + extra;
}

std::string sft_args(const std::string& data, const fs::path& out, const std::string& extra,
                     int max_length = 128) {
  return "sft model.path=" + tiny_model() + " data.train=" + data +
         " data.max_length=" + std::to_string(max_length) + " optim.lr=3e-3 " +
         "optim.scheduler=constant trainer.seed=7 model.device=cpu output_dir=" + out.string() + " " + extra;
}

using aligner::test::metrics;

TEST(KdPrepare, StoredTopKIsTheTeachersTopK) {
  const auto dir = temp_dir("kdp_topk");
  const auto data = data_file(dir, "data.jsonl", 40);
  // Batches of 3 examples sorted by length: other batch shapes than the one-example forward below.
  auto r = run_aligner(prepare_args(data, "kd.top_k=8 trainer.micro_batch_size=3"));
  ASSERT_EQ(r.status, 0) << r.output;
  const std::string path = data + ".kd-top8.safetensors";
  ASSERT_TRUE(fs::exists(path)) << r.output;
  EXPECT_FALSE(fs::exists(path + ".tmp"));
  const auto file = safetensors::File::open(path);
  const auto& meta = file.metadata();
  EXPECT_EQ(meta.at("teacher"), teacher());
  EXPECT_EQ(meta.at("top_k"), "8");
  EXPECT_EQ(meta.at("data"), data);
  EXPECT_EQ(meta.at("data_lines"), "40");
  EXPECT_EQ(meta.at("data.max_length"), "128");
  const auto offsets = file.get("offsets"), ids = file.get("ids"), values = file.get("values");
  EXPECT_EQ(values.scalar_type(), at::kFloat);  // a float32 teacher's logits as they are
  ASSERT_EQ(offsets.size(0), 41);

  const auto model = load_transformer(teacher(), at::kCPU);
  const auto tok = load_tokenizer(teacher());
  DataOptions opt;
  opt.max_length = 128;
  auto ds = open_sft_dataset(data, *tok, resolve_chat_template("auto", *tok), opt);
  at::NoGradGuard no_grad;
  int64_t rows_seen = 0;
  for (int64_t e = 0; e < 40; ++e) {
    auto seq = sft_example(ds, e);
    ASSERT_TRUE(seq);
    const auto b = collate_padded({*seq}, pad_id_for(*tok));
    const auto hidden = forward_hidden(model, ForwardInput{b.input_ids, b.attention_mask, b.position_ids});
    const auto rows = (b.labels.reshape({-1}) != kIgnoreIndex).nonzero().squeeze(1);
    const auto [tv, ti] =
        lm_logits(model, hidden.reshape({-1, hidden.size(-1)}).index_select(0, rows)).topk(8, -1);
    const int64_t begin = offsets[e].item<int64_t>(), n = offsets[e + 1].item<int64_t>() - begin;
    ASSERT_EQ(n, rows.size(0)) << "example " << e;
    EXPECT_TRUE(at::equal(ids.narrow(0, begin, n), ti.to(at::kInt))) << "example " << e;
    EXPECT_LT((values.narrow(0, begin, n) - tv).abs().max().item<double>(), 1e-5) << "example " << e;
    rows_seen += n;
  }
  EXPECT_EQ(rows_seen, ids.size(0));
  fs::remove_all(dir);
}

// Stores the teacher's logits for train and validation data, then runs sft twice, with the teacher
// live and from the file: every step's losses and the validation losses are the same.
void expect_stored_matches_live(const std::string& name, const std::string& sft_extra, int max_length) {
  const auto dir = temp_dir("kdp_" + name);
  const auto data = data_file(dir, "train.jsonl", 40), val = data_file(dir, "val.jsonl", 12, 40);
  auto r = run_aligner(
      prepare_args(data, "data.validation=" + val + " kd.top_k=8 trainer.micro_batch_size=4", max_length));
  ASSERT_EQ(r.status, 0) << r.output;
  const std::string common =
      "data.validation=" + val +
      " trainer.max_steps=4 trainer.micro_batch_size=2 trainer.global_batch_size=4 trainer.val_interval=2 "
      "kd.kd_weight=0.5 kd.ce_weight=0.8 kd.temperature=2.0 " +
      sft_extra;
  const auto live = dir / "live", stored = dir / "stored";
  r = run_aligner(sft_args(data, live, common + " kd.teacher=" + teacher(), max_length));
  ASSERT_EQ(r.status, 0) << r.output;
  // kd.validation_logits is left to its default: next to the validation data.
  r = run_aligner(sft_args(data, stored, common + " kd.logits=" + data + ".kd-top8.safetensors", max_length));
  ASSERT_EQ(r.status, 0) << r.output;
  for (const char* split : {"train", "validation"}) {
    const auto a = metrics(live, split), b = metrics(stored, split);
    ASSERT_EQ(a.size(), split == std::string("train") ? 4u : 3u) << split;
    ASSERT_EQ(b.size(), a.size()) << split;
    for (size_t i = 0; i < a.size(); ++i)
      for (const char* key : {"loss", "ce_loss", "kd_loss"})
        EXPECT_NEAR(a[i][key].get<double>(), b[i][key].get<double>(), 1e-5)
            << split << " " << i << " " << key;
    EXPECT_GT(b.back()["kd_loss"].get<double>(), 0.0) << split;
  }
  fs::remove_all(dir);
}

TEST(KdPrepare, SftFromStoredLogitsMatchesLiveTeacher) {
  expect_stored_matches_live("padded", "kd.top_k=8", 128);
}

// Rows of 256 tokens hold two or three examples, and first-fit packing puts some of them in
// another order than they were read in; sft reads a smaller top-k than the file holds.
TEST(KdPrepare, SftFromStoredLogitsMatchesLiveTeacherPacked) {
  expect_stored_matches_live("packed", "data.packing=true kd.top_k=4", 256);
}

TEST(KdPrepare, MismatchedLogitsFileIsAOneLineError) {
  const auto dir = temp_dir("kdp_mismatch");
  const auto data = data_file(dir, "data.jsonl", 40), other = data_file(dir, "other.jsonl", 30);
  auto r = run_aligner(prepare_args(data, "kd.top_k=8"));
  ASSERT_EQ(r.status, 0) << r.output;
  const std::string logits = data + ".kd-top8.safetensors";
  const auto out = dir / "out";

  r = run_aligner(sft_args(other, out, "trainer.max_steps=1 kd.logits=" + logits));
  EXPECT_NE(r.status, 0);
  auto line = error_line(r.output);
  EXPECT_NE(line.find(logits), std::string::npos) << r.output;
  EXPECT_NE(line.find("data.train=" + other + " (30 lines"), std::string::npos) << r.output;

  r = run_aligner(sft_args(data, out, "trainer.max_steps=1 data.max_length=64 kd.logits=" + logits));
  EXPECT_NE(r.status, 0);
  line = error_line(r.output);
  EXPECT_NE(line.find(logits), std::string::npos) << r.output;
  EXPECT_NE(line.find("data.max_length=128, but this run has data.max_length=64"), std::string::npos)
      << r.output;

  r = run_aligner(sft_args(data, out, "trainer.max_steps=1 kd.top_k=16 kd.logits=" + logits));
  EXPECT_NE(r.status, 0);
  EXPECT_NE(error_line(r.output).find("top 8 logits"), std::string::npos) << r.output;

  r = run_aligner(
      sft_args(data, out, "trainer.max_steps=1 kd.teacher=" + teacher() + " kd.logits=" + logits));
  EXPECT_NE(r.status, 0);
  EXPECT_NE(error_line(r.output).find("not both"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(out / "final"));
  fs::remove_all(dir);
}

}  // namespace
