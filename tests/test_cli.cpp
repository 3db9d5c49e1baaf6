// The aligner binary as a user meets it: unknown commands, the help and README, what convert and
// init may write over, and settings refused before any work.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "test_util.h"

namespace aligner {
namespace {

namespace fs = std::filesystem;
using test::kRoot;
using test::run_aligner;
using test::tiny_model;

std::vector<std::string> entries(const fs::path& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

std::string read(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

// `aligner args` run in the folder `cwd`; stdout and stderr together.
test::Run run_in(const fs::path& cwd, const std::string& args) {
  return test::run_shell("cd '" + cwd.string() + "' && " + ALIGNER_BINARY + " " + args);
}

using Names = std::vector<std::string>;
const Names kModelFiles = {".written-by-aligner", "config.json", "model.safetensors", "tokenizer.json",
                           "tokenizer_config.json"};

TEST(Cli, UnknownCommandIsNamedAndTheCommandsListed) {
  for (const std::string& args : {std::string("frobnicate"), std::string("frobnicate --config run.yaml")}) {
    const auto r = run_aligner(args);
    EXPECT_EQ(r.status, 1) << r.output;
    EXPECT_EQ(r.output.rfind("error: unknown command 'frobnicate' (commands: ", 0), 0u) << r.output;
    for (const char* command : {"sft", "dpo", "rm", "convert", "generate", "ppo"})
      EXPECT_NE(r.output.find(command), std::string::npos) << command;
    EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << r.output;
  }
  EXPECT_EQ(run_aligner("--version").status, 0);
}

// The help and the README name only commands that exist.
TEST(Cli, HelpAndReadmeNameOnlyRealCommands) {
  const auto help = run_aligner("--help");
  EXPECT_EQ(help.status, 0) << help.output;
  const std::string readme = read(kRoot + "/README.md");
  const std::regex row(R"(\n\| `aligner ([a-z-]+))");
  int rows = 0;
  for (std::sregex_iterator it(readme.begin(), readme.end(), row), end; it != end; ++it, ++rows) {
    const std::string command = (*it)[1];
    const auto r = run_aligner(command + " --help");
    EXPECT_EQ(r.status, 0) << command << ": " << r.output;
    EXPECT_NE(help.output.find("  " + command + " "), std::string::npos) << command;
  }
  EXPECT_GE(rows, 10);
}

TEST(Cli, ConvertWritesOnlyItsOutputFolder) {
  const fs::path root = test::temp_dir("cli_convert");
  const std::string convert = "convert --model " + tiny_model() + " --out ";

  // A trailing slash names the folder; nothing is left beside or inside it.
  auto r = run_aligner(convert + (root / "conv").string() + "/");
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(entries(root), Names{"conv"});
  EXPECT_EQ(entries(root / "conv"), kModelFiles);
  r = run_aligner(convert + (root / "conv").string() + "/ --dtype bfloat16");  // ours: replaced
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(entries(root), Names{"conv"});

  // A user's folder is refused, and left as it was, unless --overwrite.
  const fs::path mine = root / "mine";
  fs::create_directories(mine);
  std::ofstream(mine / "notes.txt") << "mine";
  r = run_aligner(convert + mine.string());
  EXPECT_EQ(r.status, 1);
  EXPECT_EQ(r.output,
            "error: " + mine.string() +
                ": not a model folder written by aligner (it holds 'notes.txt'); pass --overwrite to "
                "replace it\n");
  EXPECT_EQ(entries(mine), Names{"notes.txt"});
  r = run_aligner(convert + mine.string() + " --overwrite");
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(entries(mine), kModelFiles);

  // "--out ." in a folder of the user's: refused, and nothing written beside it ("..tmp").
  const fs::path here = root / "here";
  fs::create_directories(here);
  std::ofstream(here / "notes.txt") << "mine";
  r = run_in(here, convert + ".");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("it holds 'notes.txt'"), std::string::npos) << r.output;
  EXPECT_EQ(entries(here), Names{"notes.txt"});
  EXPECT_EQ(entries(root), (Names{"conv", "here", "mine"}));
  fs::remove(here / "notes.txt");
  r = run_in(here, convert + ".");  // empty: written
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(entries(here), kModelFiles);
  EXPECT_EQ(entries(root), (Names{"conv", "here", "mine"}));
}

TEST(Cli, InitLeavesOtherFoldersAlone) {
  const fs::path root = test::temp_dir("cli_init");
  // Names the writer once used as scratch (and deleted), here a user's.
  for (const char* name : {"m.old", "m.tmp"}) {
    fs::create_directories(root / name);
    std::ofstream(root / name / "keep") << name;
  }
  const std::string init = "init --config " + kRoot + "/examples/models/tiny-llama.config.json --tokenizer " +
                           kRoot + "/tests/fixtures/tokenizers/llama3-style-bpe6k --out ";
  auto r = run_aligner(init + (root / "m").string());
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(entries(root), (Names{"m", "m.old", "m.tmp"}));
  for (const char* name : {"m.old", "m.tmp"}) EXPECT_EQ(read(root / name / "keep"), name);

  std::ofstream(root / "file") << "data";
  r = run_aligner(init + (root / "file").string());
  EXPECT_EQ(r.status, 1);
  EXPECT_EQ(r.output, "error: " + (root / "file").string() +
                          ": exists and is not a folder; pass --overwrite to replace it\n");
  EXPECT_EQ(read(root / "file"), "data");
}

// config.json is untrusted input: nesting deep enough to overflow the stack of a recursive walk
// (it crashed with SIGSEGV) is a one-line error naming the file.
TEST(Cli, DeeplyNestedConfigIsAnErrorNotACrash) {
  const fs::path root = test::temp_dir("cli_deep");
  const fs::path model = root / "m";
  fs::create_directories(model);
  fs::copy_file(fs::path(tiny_model()) / "model.safetensors", model / "model.safetensors");
  std::string deep;
  for (int i = 0; i < 100000; ++i) deep += "{\"a\": ";
  deep += "1" + std::string(100000, '}');
  std::ofstream(model / "config.json") << "{\"model_type\": \"llama\", \"x\": " << deep << "}";
  const auto r = run_aligner("convert --model " + model.string() + " --out " + (root / "out").string());
  EXPECT_EQ(r.status, 1);
  EXPECT_EQ(r.output,
            "error: " + (model / "config.json").string() + ": JSON nested deeper than 256 levels\n");
}

// libtorch has no CPU float16 kernels: refused before the model is loaded, naming the setting.
TEST(Cli, Float16OnTheCpuIsRefusedUpFront) {
  const std::string data = test::write_temp("f16.jsonl", "{\"text\": \"hello\"}\n");
  const std::string out = test::temp_dir("cli_f16").string() + "/out.jsonl";
  const std::string common = " --model " + tiny_model() + " --data " + data;
  const std::string expected =
      ": float16 does not run on the CPU (libtorch has no CPU float16 kernels); use "
      "bfloat16 or float32\n";
  // --dtype is model.dtype, so the error names the key either way.
  for (const std::string& command :
       {"perplexity" + common, "rm-score" + common, "generate" + common + " --out " + out}) {
    for (const char* setting : {" --dtype float16 --device cpu", " model.dtype=float16 model.device=cpu"}) {
      const auto r = run_aligner(command + setting);
      EXPECT_EQ(r.status, 1) << command << setting;
      EXPECT_EQ(r.output, "error: model.dtype" + expected) << command << setting;
    }
  }
}

// Every command that takes a config takes its keys both as flags and as key=value, and
// --print-config shows the result without loading anything (the model folder does not exist).
TEST(Cli, FlagsAndKeysAreTwoSpellingsOfOneSetting) {
  struct Spellings {
    std::string command, flags, keys;
  };
  const std::string model = " --model /no/such/model", model_key = " model.path=/no/such/model";
  const std::string common = model + " --device cpu --dtype bfloat16",
                    common_keys = model_key + " model.device=cpu model.dtype=bfloat16";
  const std::vector<Spellings> cases = {
      {"perplexity", common + " --data d.jsonl --batch-size 3 --stride 4",
       common_keys + " data.path=d.jsonl batch_size=3 stride=4"},
      {"rm-score", common + " --data d.jsonl --batch-size 3 --template chatml --no-eos",
       common_keys + " data.path=d.jsonl batch_size=3 data.template=chatml data.add_eos=false"},
      {"generate", common + " --data d.jsonl --out o.jsonl --batch-size 3",
       common_keys + " data.path=d.jsonl out=o.jsonl gen.batch_size=3"},
      {"serve-reward", common + " --port 6000 --host 0.0.0.0",
       common_keys + " server.port=6000 server.host=0.0.0.0"},
      {"convert", model + " --out o --dtype bfloat16 --shard-size 5GB --overwrite",
       model_key + " out=o model.dtype=bfloat16 shard_size=5GB overwrite=true"},
      {"sft", common, common_keys},
      {"kd-prepare", common, common_keys},
      {"rm", common, common_keys},
      {"dpo", common, common_keys}};
  for (const auto& c : cases) {
    const auto defaults = run_aligner(c.command + " --print-config");
    const auto flags = run_aligner(c.command + " --print-config" + c.flags);
    const auto keys = run_aligner(c.command + " --print-config" + c.keys);
    ASSERT_EQ(flags.status, 0) << c.command << ": " << flags.output;
    ASSERT_EQ(keys.status, 0) << c.command << ": " << keys.output;
    EXPECT_EQ(flags.output, keys.output) << c.command;
    EXPECT_NE(flags.output, defaults.output) << c.command;
    EXPECT_NE(flags.output.find("path: /no/such/model\n"), std::string::npos)
        << c.command << ": " << flags.output;
    EXPECT_NE(flags.output.find("dtype: bfloat16\n"), std::string::npos) << c.command << ": " << flags.output;
  }
  // A key=value comes after the flags; a flag's value is text, whatever YAML would make of it.
  const auto r = run_aligner("perplexity --print-config --device cpu model.device=cuda --model 'a: [b'");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("device: cuda\n"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("path: \"a: [b\"\n"), std::string::npos) << r.output;
  // A bad value through a flag is the key's error.
  EXPECT_EQ(run_aligner("perplexity --print-config --batch-size x").output,
            "error: config key 'batch_size' expects an int, got 'x' (from the command line)\n");
  // What must be set is named with both spellings.
  EXPECT_EQ(run_aligner("perplexity --data d.jsonl").output,
            "error: config key 'model.path' must be set: --model VALUE or model.path=VALUE\n");
}

// A user with only the binary learns every key, its default and its meaning from --help.
TEST(Cli, HelpListsEveryKeyWithItsDefault) {
  for (const auto& [command, config] :
       std::vector<std::pair<std::string, std::string>>{{"perplexity", "perplexity"},
                                                        {"rm-score", "rm-score"},
                                                        {"generate", "generate"},
                                                        {"serve-reward", "serve-reward"},
                                                        {"convert", "convert"},
                                                        {"sft", "sft"},
                                                        {"kd-prepare", "sft"},
                                                        {"rm", "rm"},
                                                        {"dpo", "dpo"},
                                                        {"ppo", "ppo"},
                                                        {"reinforce", "reinforce"},
                                                        {"rs", "rs"},
                                                        {"spin", "spin"},
                                                        {"steerlm label", "steerlm-label"},
                                                        {"steerlm2", "steerlm2"},
                                                        {"steerlm2 prepare", "steerlm2-prepare"},
                                                        {"cai critique", "cai-critique"},
                                                        {"cai compare", "cai-compare"}}) {
    const auto r = run_aligner(command + " --help");
    EXPECT_EQ(r.status, 0) << command;
    EXPECT_NE(r.output.find(read(kRoot + "/configs/" + config + ".yaml")), std::string::npos)
        << command << ": " << r.output;
    EXPECT_NE(r.output.find("--print-config"), std::string::npos) << command;
  }
}

}  // namespace
}  // namespace aligner
