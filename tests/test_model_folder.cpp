// Model folders as save_transformer writes them: what it may replace, the scratch names it uses, and
// what load_transformer warns about.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "core/log.h"
#include "io/hf_checkpoint.h"
#include "model/config.h"
#include "test_util.h"

namespace aligner {
namespace {

namespace fs = std::filesystem;
using test::error_of;

Transformer tiny(nlohmann::json extra = nlohmann::json::object()) {
  nlohmann::json j = {{"model_type", "llama"},    {"vocab_size", 64},
                      {"hidden_size", 16},        {"intermediate_size", 32},
                      {"num_hidden_layers", 1},   {"num_attention_heads", 2},
                      {"num_key_value_heads", 1}, {"max_position_embeddings", 32},
                      {"torch_dtype", "float32"}};
  j.update(extra);
  return init_transformer(parse_model_config(j, "tiny"), at::kCPU, 1);
}

// The names in `dir`, sorted, hidden ones included.
std::vector<std::string> entries(const fs::path& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

void write(const fs::path& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

std::string read(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

using Names = std::vector<std::string>;

TEST(SaveTransformer, RefusesWhatItDidNotWriteUnlessToldToReplaceAnything) {
  const fs::path root = test::temp_dir("save_refuses");
  const fs::path out = root / "out";
  fs::create_directories(out);
  write(out / "notes.txt", "mine");
  std::string msg = error_of([&] { save_transformer(tiny(), out.string()); });
  EXPECT_EQ(msg, out.string() +
                     ": not a model folder written by aligner (it holds 'notes.txt'); pass --overwrite to "
                     "replace it");
  EXPECT_EQ(entries(out), Names{"notes.txt"});
  EXPECT_EQ(entries(root), Names{"out"});  // no scratch folder left behind

  // Someone else's model folder: only files a save writes, but not written by aligner.
  fs::remove(out / "notes.txt");
  write(out / "config.json", "{}");
  write(out / "model.safetensors", "weights");
  msg = error_of([&] { save_transformer(tiny(), out.string()); });
  EXPECT_NE(msg.find("(it has no .written-by-aligner)"), std::string::npos) << msg;
  EXPECT_EQ(read(out / "model.safetensors"), "weights");

  const fs::path file = root / "file";
  write(file, "data");
  msg = error_of([&] { save_transformer(tiny(), file.string()); });
  EXPECT_EQ(msg, file.string() + ": exists and is not a folder; pass --overwrite to replace it");
  EXPECT_EQ(read(file), "data");

  save_transformer(tiny(), out.string(), std::nullopt, 0, "", Replace::anything);
  save_transformer(tiny(), file.string(), std::nullopt, 0, "", Replace::anything);
  for (const auto& dir : {out, file})
    EXPECT_EQ(entries(dir), (Names{".written-by-aligner", "config.json", "model.safetensors"})) << dir;
  EXPECT_EQ(entries(root), (Names{"file", "out"}));
}

TEST(SaveTransformer, ReplacesItsOwnFoldersAndNeverTouchesOtherNames) {
  const fs::path root = test::temp_dir("save_replaces");
  const fs::path out = root / "m";
  // The names the writer once used as scratch, here a user's folders.
  for (const char* name : {"m.old", "m.tmp", ".m.tmp"}) {
    fs::create_directories(root / name);
    write(root / name / "keep", name);
  }
  save_transformer(tiny(), out.string(), std::nullopt, /*max_shard_bytes=*/2000);
  EXPECT_TRUE(fs::exists(out / "model.safetensors.index.json"));
  save_transformer(tiny(), out.string(), at::kBFloat16);  // ours, sharded or not: replaced
  EXPECT_EQ(entries(out), (Names{".written-by-aligner", "config.json", "model.safetensors"}));
  EXPECT_EQ(load_model_config((out / "config.json").string()).dtype, at::kBFloat16);
  EXPECT_EQ(entries(root), (Names{".m.tmp", "m", "m.old", "m.tmp"}));
  for (const char* name : {"m.old", "m.tmp", ".m.tmp"}) EXPECT_EQ(read(root / name / "keep"), name);

  // An empty folder is replaced; a trailing "/" or "/." names the folder itself.
  fs::create_directories(root / "empty");
  save_transformer(tiny(), (root / "empty").string() + "/");
  EXPECT_TRUE(fs::exists(root / "empty" / "config.json"));
  save_transformer(tiny(), (root / "empty").string() + "/.");
  EXPECT_EQ(entries(root / "empty"), (Names{".written-by-aligner", "config.json", "model.safetensors"}));
  EXPECT_EQ(entries(root), (Names{".m.tmp", "empty", "m", "m.old", "m.tmp"}));
}

TEST(SaveTransformer, FailureLeavesTheOldFolderAndNoScratch) {
  const fs::path root = test::temp_dir("save_fails");
  const fs::path out = root / "m";
  save_transformer(tiny(), out.string());
  const std::string config = read(out / "config.json");
  // A tokenizer file that cannot be copied: a folder of that name.
  fs::create_directories(root / "tok" / "tokenizer.json");
  const std::string msg = error_of([&] {
    save_transformer(tiny({{"vocab_size", 80}}), out.string(), std::nullopt, 0, (root / "tok").string());
  });
  EXPECT_NE(msg.find("tokenizer.json"), std::string::npos) << msg;
  EXPECT_EQ(read(out / "config.json"), config);
  EXPECT_EQ(entries(root), (Names{"m", "tok"}));
}

TEST(SaveTransformer, RefusesAFolderHoldingWhatItReadsFrom) {
  const fs::path root = test::temp_dir("save_source");
  const fs::path source = root / "a" / "model";
  save_transformer(tiny(), source.string());
  const std::string msg = error_of([&] {
    save_transformer(tiny(), (root / "a").string(), std::nullopt, 0, source.string(), Replace::anything);
  });
  EXPECT_NE(msg.find("holds " + source.string()), std::string::npos) << msg;
  EXPECT_TRUE(fs::exists(source / "config.json"));
  save_transformer(tiny(), source.string(), std::nullopt, 0, source.string());  // in place is fine
  EXPECT_TRUE(fs::exists(source / "config.json"));
}

TEST(LoadTransformer, WarnsAboutAnEosTokenOutsideTheVocabulary) {
  const fs::path out = test::temp_dir("eos") / "m";
  save_transformer(tiny({{"eos_token_id", {2, 640}}}), out.string());
  std::vector<std::string> lines;
  LogSink previous = set_log_sink([&](const std::string& line) { lines.push_back(line); });
  load_transformer(out.string(), at::kCPU);
  set_log_sink(std::move(previous));
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_NE(lines[0].find("warning: " + (out / "config.json").string() +
                          ": eos_token_id 640 is outside the vocabulary (vocab_size 64)"),
            std::string::npos)
      << lines[0];
}

TEST(ParseComputeDtype, RefusesFloat16OnTheCpuNamingTheKey) {
  EXPECT_EQ(parse_compute_dtype("bf16", at::kCPU, "model.dtype"), at::kBFloat16);
  EXPECT_EQ(parse_compute_dtype("float32", at::kCPU, "model.dtype"), at::kFloat);
  const std::string msg = error_of([] { parse_compute_dtype("float16", at::kCPU, "model.dtype"); });
  EXPECT_EQ(msg.rfind("model.dtype: float16 does not run on the CPU", 0), 0u) << msg;
}

}  // namespace
}  // namespace aligner
