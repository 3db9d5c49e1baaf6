#include "core/config.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "test_util.h"

namespace aligner {
namespace {

namespace fs = std::filesystem;

const char* const kDefaults = R"(
seed: 42
model:
  name: gpt2
  revision: "1"   # quoted: a string key, although it looks like an int
  checkpoint: null
trainer:
  max_steps: 1000
  grad_clip: 1.0
  bf16: true
  eval_every: 100
optim:
  lr: 1.0e-5
  betas: [0.9, 0.999]
  weight_decay: 0.0
data:
  datasets: []
  seq_lens: [512, 1024]
)";

using test::error_of;

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

class CoreConfigTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("aligner_test_config_" + std::to_string(getpid()) + "_" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string write(const std::string& name, const std::string& text) {
    const std::string path = (dir_ / name).string();
    std::ofstream(path) << text;
    return path;
  }

  static Config load(const std::string& file, const std::vector<std::string>& overrides = {}) {
    return Config::load(kDefaults, file, overrides);
  }

  fs::path dir_;
};

TEST_F(CoreConfigTest, DefaultsAlone) {
  const Config c = load("");
  EXPECT_EQ(c.get_int("seed"), 42);
  EXPECT_EQ(c.get_string("model.name"), "gpt2");
  EXPECT_EQ(c.get_string("model.revision"), "1");
  EXPECT_TRUE(c.is_null("model.checkpoint"));
  EXPECT_EQ(c.get_string("model.checkpoint"), "");
  EXPECT_EQ(c.get_int("trainer.max_steps"), 1000);
  EXPECT_DOUBLE_EQ(c.get_float("trainer.grad_clip"), 1.0);
  EXPECT_TRUE(c.get_bool("trainer.bf16"));
  EXPECT_DOUBLE_EQ(c.get_float("optim.lr"), 1e-5);
  EXPECT_EQ(c.get_float_list("optim.betas"), (std::vector<double>{0.9, 0.999}));
  EXPECT_TRUE(c.get_string_list("data.datasets").empty());
  EXPECT_EQ(c.get_int_list("data.seq_lens"), (std::vector<int64_t>{512, 1024}));
  EXPECT_TRUE(c.has("trainer"));
  EXPECT_TRUE(c.has("trainer.max_steps"));
  EXPECT_FALSE(c.has("trainer.max_step"));
  EXPECT_FALSE(c.has("trainer.max_steps.x"));
}

TEST_F(CoreConfigTest, FileOverridesNestedKeysAndKeepsTheOthers) {
  const Config c = load(write("run.yaml", "trainer:\n  max_steps: 5\nmodel:\n  name: llama\n"));
  EXPECT_EQ(c.get_int("trainer.max_steps"), 5);
  EXPECT_EQ(c.get_string("model.name"), "llama");
  EXPECT_DOUBLE_EQ(c.get_float("trainer.grad_clip"), 1.0);
  EXPECT_TRUE(c.get_bool("trainer.bf16"));
  EXPECT_EQ(c.get_int("trainer.eval_every"), 100);
  EXPECT_TRUE(c.is_null("model.checkpoint"));
  EXPECT_EQ(c.get_int("seed"), 42);
}

TEST_F(CoreConfigTest, DottedKeyInFile) {
  const Config c = load(write("run.yaml", "trainer.max_steps: 3\n"));
  EXPECT_EQ(c.get_int("trainer.max_steps"), 3);
  EXPECT_EQ(c.get_int("trainer.eval_every"), 100);
}

TEST_F(CoreConfigTest, EmptyFileChangesNothing) {
  const Config c = load(write("run.yaml", "# nothing yet\n"));
  EXPECT_EQ(c.to_yaml(), load("").to_yaml());
}

TEST_F(CoreConfigTest, CommandLineWinsOverFile) {
  const std::string file = write("run.yaml", "trainer:\n  max_steps: 5\n  eval_every: 7\n");
  const Config c = load(file, {"trainer.max_steps=9", "seed=1", "seed=2"});
  EXPECT_EQ(c.get_int("trainer.max_steps"), 9);
  EXPECT_EQ(c.get_int("trainer.eval_every"), 7);
  EXPECT_EQ(c.get_int("seed"), 2);
}

TEST_F(CoreConfigTest, WholeSectionOverrideMergesKeyByKey) {
  const Config c = load("", {"trainer={max_steps: 3, bf16: false}"});
  EXPECT_EQ(c.get_int("trainer.max_steps"), 3);
  EXPECT_FALSE(c.get_bool("trainer.bf16"));
  EXPECT_EQ(c.get_int("trainer.eval_every"), 100);
}

TEST_F(CoreConfigTest, IntWidensToFloat) {
  const Config c =
      load(write("run.yaml", "optim:\n  weight_decay: 1\n"), {"trainer.grad_clip=2", "optim.lr=3e-4"});
  EXPECT_DOUBLE_EQ(c.get_float("optim.weight_decay"), 1.0);
  EXPECT_DOUBLE_EQ(c.get_float("trainer.grad_clip"), 2.0);
  EXPECT_DOUBLE_EQ(c.get_float("optim.lr"), 3e-4);
  // Printed as a float, so that readers that go by the text (PyYAML) see one.
  EXPECT_TRUE(contains(c.to_yaml(), "grad_clip: 2.0\n")) << c.to_yaml();
  // The other way round loses information, so it is an error.
  EXPECT_TRUE(contains(error_of([] { load("", {"trainer.max_steps=1.5"}); }), "expects an int"));
}

TEST_F(CoreConfigTest, ListOverrideReplacesTheList) {
  const Config c = load("", {"optim.betas=[0.8, 1]", "data.datasets=[alpaca, \"a b\"]", "data.seq_lens=[]"});
  EXPECT_EQ(c.get_float_list("optim.betas"), (std::vector<double>{0.8, 1.0}));
  EXPECT_EQ(c.get_string_list("data.datasets"), (std::vector<std::string>{"alpaca", "a b"}));
  EXPECT_TRUE(c.get_int_list("data.seq_lens").empty());
}

TEST_F(CoreConfigTest, NullDefaultTakesAStringOrNull) {
  const std::string file = write("run.yaml", "model:\n  checkpoint: /ckpt/step_5\n");
  const Config from_file = load(file);
  EXPECT_FALSE(from_file.is_null("model.checkpoint"));
  EXPECT_EQ(from_file.get_string("model.checkpoint"), "/ckpt/step_5");
  EXPECT_TRUE(load(file, {"model.checkpoint=null"}).is_null("model.checkpoint"));
  EXPECT_EQ(load("", {"model.checkpoint=\"a b\""}).get_string("model.checkpoint"), "a b");
  // Null is only for keys whose default is null.
  EXPECT_TRUE(contains(error_of([] { load("", {"model.name=null"}); }), "expects a string, got null"));
}

TEST_F(CoreConfigTest, UnknownKeyInFileNamesKeyFileLineAndSuggestion) {
  const std::string file = write("run.yaml", "trainer:\n  max_steps: 5\n  max_step: 10\n");
  EXPECT_EQ(error_of([&] { load(file); }), "unknown config key 'trainer.max_step' in " + file +
                                               " (line 3); did you mean 'trainer.max_steps'?");
  // A right name in the wrong place.
  const std::string top = write("top.yaml", "seed: 1\neval_every: 10\n");
  EXPECT_EQ(error_of([&] { load(top); }),
            "unknown config key 'eval_every' in " + top + " (line 2); did you mean 'trainer.eval_every'?");
  // A misspelt section.
  const std::string section = write("section.yaml", "traner:\n  max_steps: 5\n");
  EXPECT_TRUE(contains(error_of([&] { load(section); }), "did you mean 'trainer'?"));
}

TEST_F(CoreConfigTest, UnknownKeyOnCommandLineSuggests) {
  EXPECT_EQ(error_of([] { load("", {"optim.lrr=1"}); }),
            "unknown config key 'optim.lrr' (from the command line); did you mean 'optim.lr'?");
  EXPECT_EQ(error_of([] { load("", {"trainer.lr=1"}); }),
            "unknown config key 'trainer.lr' (from the command line); did you mean 'optim.lr'?");
  // Nothing close: the section's keys instead of a wild guess.
  EXPECT_EQ(error_of([] { load("", {"trainer.gradient_accumulation=4"}); }),
            "unknown config key 'trainer.gradient_accumulation' (from the command line); "
            "valid keys in 'trainer': max_steps, grad_clip, bf16, eval_every");
  EXPECT_TRUE(contains(error_of([] { load("", {"zzzz=1"}); }),
                       "valid top-level keys: seed, model, trainer, optim, data"));
}

TEST_F(CoreConfigTest, WrongTypeNamesKeyAndExpectedType) {
  EXPECT_EQ(error_of([] { load("", {"trainer.max_steps=ten"}); }),
            "config key 'trainer.max_steps' expects an int, got 'ten' (from the command line)");
  const std::string file = write("run.yaml", "seed: 1\ntrainer:\n  grad_clip: high\n");
  EXPECT_EQ(error_of([&] { load(file); }),
            "config key 'trainer.grad_clip' expects a float, got 'high' (from " + file + " line 3)");
  const std::string list_error = error_of([] { load("", {"optim.betas=[0.9, x]"}); });
  EXPECT_TRUE(contains(list_error, "'optim.betas' expects a list of floats, got 'x' at index 1"))
      << list_error;
  EXPECT_TRUE(contains(error_of([] { load("", {"optim.betas=0.9"}); }), "expects a list of floats"));
  EXPECT_TRUE(contains(error_of([] { load("", {"trainer=5"}); }), "config key 'trainer' expects a section"));
  EXPECT_TRUE(contains(error_of([] { load("", {"trainer.max_steps={a: 1}"}); }),
                       "config key 'trainer.max_steps' expects an int, got a map"));
  EXPECT_TRUE(
      contains(error_of([] { load("", {"trainer.max_steps=99999999999999999999"}); }), "expects an int"));
  EXPECT_TRUE(contains(error_of([] { load("", {"model.name=[a]"}); }), "'model.name' expects a string"));
}

TEST_F(CoreConfigTest, BoolParsing) {
  for (const char* yes : {"true", "True", "yes", "on", "ON"})
    EXPECT_TRUE(load("", {"trainer.bf16=false", std::string("trainer.bf16=") + yes}).get_bool("trainer.bf16"))
        << yes;
  for (const char* no : {"false", "FALSE", "no", "off", "Off"})
    EXPECT_FALSE(load("", {std::string("trainer.bf16=") + no}).get_bool("trainer.bf16")) << no;
  EXPECT_TRUE(contains(error_of([] { load("", {"trainer.bf16=1"}); }), "expects a bool, got '1'"));
  EXPECT_EQ(load("", {"model.name=yes"}).get_string("model.name"), "yes");
}

TEST_F(CoreConfigTest, ToYamlRoundTrips) {
  const Config c = load("", {"model.name=\"a: b\"", "model.revision=2", "model.checkpoint=true",
                             "optim.lr=3e-4", "data.datasets=[x, \"1\", \"\"]", "trainer.bf16=no"});
  const std::string yaml = c.to_yaml();
  EXPECT_TRUE(contains(yaml, "max_steps: 1000\n")) << yaml;
  EXPECT_TRUE(contains(yaml, "lr: 0.0003\n")) << yaml;
  EXPECT_TRUE(contains(yaml, "bf16: false\n")) << yaml;
  EXPECT_TRUE(contains(load("").to_yaml(), "lr: 1.0e-05\n"));
  EXPECT_LT(yaml.find("seed:"), yaml.find("model:"));
  EXPECT_LT(yaml.find("model:"), yaml.find("trainer:"));
  EXPECT_LT(yaml.find("max_steps:"), yaml.find("eval_every:"));

  const Config again = load(write("resolved.yaml", yaml));
  EXPECT_EQ(again.to_yaml(), yaml);
  EXPECT_EQ(again.get_string("model.name"), "a: b");
  EXPECT_EQ(again.get_string("model.revision"), "2");
  EXPECT_EQ(again.get_string("model.checkpoint"), "true");
  EXPECT_DOUBLE_EQ(again.get_float("optim.lr"), 3e-4);
  EXPECT_EQ(again.get_string_list("data.datasets"), (std::vector<std::string>{"x", "1", ""}));
  EXPECT_FALSE(again.get_bool("trainer.bf16"));
  EXPECT_TRUE(load(write("null.yaml", load("").to_yaml())).is_null("model.checkpoint"));
}

TEST_F(CoreConfigTest, SaveWritesTheResolvedConfig) {
  const Config c = load("", {"trainer.max_steps=7"});
  const std::string path = (dir_ / "config.yaml").string();
  c.save(path);
  EXPECT_FALSE(fs::exists(path + ".tmp"));
  EXPECT_EQ(load(path).get_int("trainer.max_steps"), 7);
}

TEST_F(CoreConfigTest, MalformedOverride) {
  EXPECT_TRUE(contains(error_of([] { load("", {"foo"}); }), "'foo'"));
  EXPECT_TRUE(contains(error_of([] { load("", {"=5"}); }), "'=5'"));
  EXPECT_TRUE(contains(error_of([] { load("", {"optim.betas=[0.9"}); }), "'optim.betas=[0.9'"));
}

TEST_F(CoreConfigTest, FileErrorsNameTheFile) {
  const std::string bad = write("bad.yaml", "trainer:\n  max_steps: [1, 2\n");
  const std::string message = error_of([&] { load(bad); });
  EXPECT_TRUE(contains(message, bad)) << message;
  EXPECT_TRUE(contains(message, "line ")) << message;
  const std::string missing = (dir_ / "missing.yaml").string();
  EXPECT_TRUE(contains(error_of([&] { load(missing); }), missing));
  EXPECT_TRUE(contains(error_of([&] { load(dir_.string()); }), dir_.string()));
  const std::string list = write("list.yaml", "- a\n- b\n");
  EXPECT_TRUE(contains(error_of([&] { load(list); }), list));
}

TEST_F(CoreConfigTest, GettersCheckKeyAndType) {
  const Config c = load("");
  EXPECT_TRUE(contains(error_of([&] { c.get_int("trainer.max_step"); }), "'trainer.max_step'"));
  EXPECT_TRUE(contains(error_of([&] { c.get_string("trainer.max_steps"); }), "'trainer.max_steps'"));
  EXPECT_TRUE(contains(error_of([&] { c.get_float("trainer.max_steps"); }), "'trainer.max_steps'"));
  EXPECT_TRUE(contains(error_of([&] { c.get_int("trainer"); }), "'trainer'"));
  EXPECT_TRUE(contains(error_of([&] { c.get_int_list("optim.betas"); }), "'optim.betas'"));
  EXPECT_TRUE(contains(error_of([&] { c.is_null("nope"); }), "'nope'"));
}

TEST(CoreConfigSchemaTest, BadDefaultsAreErrors) {
  EXPECT_TRUE(contains(error_of([] { Config::load("a: [[1]]\n", "", {}); }), "'a'"));
  EXPECT_TRUE(contains(error_of([] { Config::load("a: [1, x]\n", "", {}); }), "'a' expects a list of ints"));
  // An empty default says its elements' type with a tag.
  const auto typed = Config::load("ids: !ints []\nw: !floats []\n", "", {"ids=[3, 4]", "w=[0.5, 2]"});
  EXPECT_EQ(typed.get_int_list("ids"), (std::vector<int64_t>{3, 4}));
  EXPECT_EQ(typed.get_float_list("w"), (std::vector<double>{0.5, 2.0}));
  EXPECT_TRUE(contains(error_of([] { Config::load("ids: !ints []\n", "", {"ids=[1, x]"}); }),
                       "'ids' expects a list of ints"));
  EXPECT_TRUE(Config::load("w: !floats []\n", "", {}).get_float_list("w").empty());
  EXPECT_TRUE(contains(error_of([] { Config::load("a: [1\n", "", {}); }), "the built-in defaults"));
}

}  // namespace
}  // namespace aligner
