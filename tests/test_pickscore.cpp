// `aligner pickscore`: PickScore training of a CLIPModel from preference pairs of images, on the tiny
// CLIPModel of tests/fixtures/clip-tiny (transformers' weights) and synthetic shapes: the loss is
// PickScore's cross entropy over the two images' CLIP scores, the model learns which image matches
// its caption, runs resume exactly, the result is a CLIPModel folder draftp's reward reads, and bad
// data is a one-line error naming the file, line and field.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "algo/pickscore.h"
#include "diffusion/shapes_data.h"
#include "io/png.h"
#include "run_outputs.h"
#include "test_util.h"
#include "text/tokenizer.h"

namespace aligner {
namespace {

namespace fs = std::filesystem;
using test::error_of;
using test::kRoot;
using test::metrics;
using test::run_aligner;
using test::temp_dir;

const std::string kClip = kRoot + "/tests/fixtures/clip-tiny";

// `n` pairs of 32 x 32 shape images: a caption naming the shape's colour (red or blue), an image that
// matches it and one of the other colour, in either order; every `tie_every`-th pair a tie. The
// images of the first pairs are 40 x 48, so that CLIP's resize and crop run too.
fs::path write_pairs(const fs::path& dir, int n, uint64_t seed, int tie_every = 0) {
  fs::create_directories(dir / "images");
  const auto path = dir / "pairs.jsonl";
  std::ofstream f(path);
  for (int i = 0; i < n; ++i) {
    ShapeSpec spec = shape_spec(seed, i);
    spec.colour = i % 2 ? ShapeColour::kRed : ShapeColour::kBlue;
    spec.background = ShapeColour::kWhite;
    ShapeSpec other = spec;
    other.colour = i % 2 ? ShapeColour::kBlue : ShapeColour::kRed;
    const bool swap = (i / 2) % 2;
    const std::string names[2] = {fmt::format("images/{}a.png", i), fmt::format("images/{}b.png", i)};
    const int64_t size = i < 2 ? 48 : 32;
    auto good = make_shape_image(spec, size), bad = make_shape_image(other, size);
    if (i < 2) good = good.narrow(0, 4, 40), bad = bad.narrow(0, 4, 40);
    write_png((dir / names[swap ? 1 : 0]).string(), good);
    write_png((dir / names[swap ? 0 : 1]).string(), bad);
    const bool tie = tie_every > 0 && i % tie_every == tie_every - 1;
    const double label0 = tie ? 0.5 : swap ? 0 : 1;
    f << nlohmann::json{{"caption", shape_caption(spec)},
                        {"image_0", names[0]},
                        {"image_1", names[1]},
                        {"label_0", label0},
                        {"label_1", 1 - label0}}
             .dump()
      << "\n";
  }
  return path;
}

std::string pickscore_args(const fs::path& out, const fs::path& train, const fs::path& val,
                           const std::string& extra = "") {
  return fmt::format(
      "pickscore --model {} data.train={} data.validation={} trainer.micro_batch_size=8 "
      "trainer.global_batch_size=16 trainer.max_epochs=100 optim.lr=2e-3 optim.weight_decay=0 "
      "optim.warmup_steps=0 output_dir={} {}",
      kClip, train.string(), val.string(), out.string(), extra);
}

TEST(PickscoreLoss, IsTheCrossEntropyOfTheClipScores) {
  const auto m = load_clip_model(kClip, at::kCPU);
  const auto tok = load_tokenizer(kClip);
  const auto ids = clip_input_ids(*tok, {"a red circle", "a blue square", "a green thing"}, 77);
  const auto images = at::rand({2, 3, 3, 32, 32}, at::detail::createCPUGenerator(3));
  const auto labels = at::tensor({1.0f, 0.0f, 0.0f, 1.0f, 0.5f, 0.5f}).view({3, 2});
  const auto s =
      pickscore_loss(m, clip_preprocess(images.flatten(0, 1), 32).view({2, 3, 3, 32, 32}), ids, labels);
  ASSERT_EQ(s.scores.sizes(), (at::IntArrayRef{2, 3}));
  for (int64_t k = 0; k < 3; ++k) {
    // clip_score: each image with its caption on its own.
    const double s0 = clip_score(m, images[0].narrow(0, k, 1), ids.narrow(0, k, 1)).item<double>();
    const double s1 = clip_score(m, images[1].narrow(0, k, 1), ids.narrow(0, k, 1)).item<double>();
    EXPECT_NEAR(s.scores[0][k].item<double>(), s0, 1e-5);
    EXPECT_NEAR(s.scores[1][k].item<double>(), s1, 1e-5);
    const double l0 = labels[k][0].item<double>(), l1 = labels[k][1].item<double>();
    const double log_z = std::log(std::exp(s0) + std::exp(s1));
    EXPECT_NEAR(s.loss[k].item<double>(), -(l0 * (s0 - log_z) + l1 * (s1 - log_z)), 1e-5);
  }
  EXPECT_NE(error_of([&] {
              pickscore_loss(m, images, ids.narrow(0, 0, 2), labels);
            }).find("pickscore_loss takes pixels [2, 2, 3, S, S]"),
            std::string::npos);
}

TEST(Pickscore, LearnsWhichImageMatchesItsCaptionAndSavesACLIPModel) {
  const auto dir = temp_dir("pickscore_learns");
  const auto train = write_pairs(dir / "train", 64, 1, 16), val = write_pairs(dir / "val", 32, 2);
  const auto out = dir / "run";
  const auto r = run_aligner(pickscore_args(out, train, val, "trainer.max_steps=60 trainer.val_interval=60"));
  ASSERT_EQ(r.status, 0) << r.output;
  const auto rows = metrics(out), val_rows = metrics(out, "validation");
  ASSERT_EQ(rows.size(), 60u);
  double first = 0, last = 0;
  for (int k = 0; k < 8; ++k)
    first += rows[k]["loss"].get<double>(), last += rows[52 + k]["loss"].get<double>();
  EXPECT_LT(last, 0.5 * first) << r.output;
  ASSERT_FALSE(val_rows.empty());
  EXPECT_GE(val_rows.back()["accuracy"].get<double>(), 0.9) << r.output;

  // final/ is a CLIPModel folder: what draftp's reward loads, its config and tokenizer the source's.
  const auto m = load_clip_model((out / "final").string(), at::kCPU);
  const auto src = load_clip_model(kClip, at::kCPU);
  EXPECT_FALSE(m.vision.projection.weight.equal(src.vision.projection.weight));
  EXPECT_TRUE(fs::exists(out / "final" / "tokenizer.json"));
  const auto tok = load_tokenizer((out / "final").string());
  // The trained scorer ranks the validation pairs as the run's own validation did.
  std::ifstream f(val);
  int right = 0, n = 0;
  for (std::string line; std::getline(f, line); ++n) {
    const auto j = nlohmann::json::parse(line);
    const auto ids = clip_input_ids(*tok, {j["caption"].get<std::string>()}, 77);
    double s[2];
    for (int k = 0; k < 2; ++k) {
      const auto px =
          read_png((val.parent_path() / j[fmt::format("image_{}", k)].get<std::string>()).string());
      s[k] = clip_score(m, px.permute({2, 0, 1}).unsqueeze(0).to(at::kFloat).div(255), ids).item<double>();
    }
    right += (s[0] > s[1]) == (j["label_0"].get<double>() > 0.5);
  }
  EXPECT_NEAR(double(right) / n, val_rows.back()["accuracy"].get<double>(), 1e-9);
  fs::remove_all(dir);
}

TEST(Pickscore, ResumesToTheSameWeights) {
  const auto dir = temp_dir("pickscore_resume");
  const auto train = write_pairs(dir / "train", 32, 3, 5);
  const auto args = [&](const fs::path& out) {
    return pickscore_args(out, train, train,
                          "trainer.max_steps=4 trainer.save_interval=2 trainer.keep_last=0");
  };
  test::run_whole_and_killed(args, dir / "whole", dir / "killed", 3);
  const auto a = load_clip_model((dir / "whole" / "final").string(), at::kCPU);
  const auto b = load_clip_model((dir / "killed" / "final").string(), at::kCPU);
  const auto pa = named_parameters(a), pb = named_parameters(b);
  ASSERT_EQ(pa.size(), pb.size());
  for (size_t i = 0; i < pa.size(); ++i) EXPECT_TRUE(pa[i].second.equal(pb[i].second)) << pa[i].first;
  EXPECT_EQ(metrics(dir / "whole")[3]["loss"].get<double>(),
            metrics(dir / "killed")[3]["loss"].get<double>());
  fs::remove_all(dir);
}

TEST(Pickscore, SaveAndLoadRoundTripExactly) {
  const auto dir = temp_dir("pickscore_save");
  const auto m = load_clip_model(kClip, at::kCPU);
  save_clip_model(m, kClip + "/config.json", kClip, (dir / "copy").string(), Replace::ours);
  const auto again = load_clip_model((dir / "copy").string(), at::kCPU);
  const auto pa = named_parameters(m), pb = named_parameters(again);
  ASSERT_EQ(pa.size(), pb.size());
  for (size_t i = 0; i < pa.size(); ++i) {
    EXPECT_EQ(pa[i].first, pb[i].first);
    EXPECT_TRUE(pa[i].second.equal(pb[i].second)) << pa[i].first;
  }
  // Every tensor of the source file is written back under its name.
  const auto src = safetensors::File::open(kClip + "/model.safetensors");
  const auto copy = safetensors::File::open((dir / "copy" / "model.safetensors").string());
  size_t weights = 0;
  for (const auto& t : src.tensors()) weights += t.name.find("position_ids") == std::string::npos;
  EXPECT_EQ(copy.tensors().size(), weights);
  fs::remove_all(dir);
}

// `aligner init` makes a CLIPModel of random weights from a config.json, as transformers
// initialises one, and `aligner pickscore` trains it from scratch.
TEST(Pickscore, TrainsACLIPModelInitialisedFromAConfig) {
  const auto dir = temp_dir("pickscore_init");
  auto r = run_aligner(fmt::format("init --config {}/config.json --tokenizer {} --out {} --seed 5", kClip,
                                   kClip, (dir / "model").string()));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("CLIPModel"), std::string::npos) << r.output;
  const auto m = load_clip_model((dir / "model").string(), at::kCPU);
  EXPECT_FLOAT_EQ(m.logit_scale.item<float>(), 2.6592f);
  // transformers' init: embeddings N(0, 0.02), the projections N(0, hidden^-0.5), norms 1, biases 0.
  EXPECT_NEAR(m.text.token_embedding.std().item<double>(), 0.02, 0.002);
  EXPECT_NEAR(m.vision.projection.weight.std().item<double>(), 1 / std::sqrt(32.0), 0.03);
  EXPECT_NEAR(m.text.projection.weight.std().item<double>(), 1 / std::sqrt(32.0), 0.03);
  EXPECT_TRUE(m.vision.post_norm.eq(1).all().item<bool>());
  EXPECT_TRUE(m.vision.layers[0].q.bias.eq(0).all().item<bool>());
  EXPECT_FALSE(m.vision.projection.weight.equal(load_clip_model(kClip, at::kCPU).vision.projection.weight));

  const auto train = write_pairs(dir / "train", 32, 6);
  r = run_aligner(fmt::format(
      "pickscore --model {} data.train={} trainer.micro_batch_size=8 trainer.global_batch_size=16 "
      "trainer.max_epochs=100 trainer.max_steps=40 optim.lr=2e-3 optim.weight_decay=0 optim.warmup_steps=0 "
      "output_dir={}",
      (dir / "model").string(), train.string(), (dir / "run").string()));
  ASSERT_EQ(r.status, 0) << r.output;
  const auto rows = metrics(dir / "run");
  ASSERT_EQ(rows.size(), 40u);
  EXPECT_LT(rows.back()["loss"].get<double>(), 0.5 * rows.front()["loss"].get<double>()) << r.output;
  r = run_aligner(fmt::format("init --config {}/config.json --out {}", kClip, (dir / "m2").string()));
  EXPECT_NE(r.output.find("--tokenizer must be given"), std::string::npos) << r.output;
  fs::remove_all(dir);
}

TEST(Pickscore, BadDataIsAOneLineErrorNamingLineAndField) {
  const auto dir = temp_dir("pickscore_bad");
  const auto train = write_pairs(dir, 4, 4);
  const auto with_line = [&](const std::string& line) {
    const auto path = dir / "bad.jsonl";
    std::ifstream in(train);
    std::string first;
    std::getline(in, first);
    std::ofstream(path) << first << "\n" << line << "\n";
    const auto r = run_aligner(
        pickscore_args(dir / "run", path, path,
                       "trainer.max_steps=1 trainer.micro_batch_size=2 trainer.global_batch_size=2"));
    EXPECT_NE(r.status, 0) << line;
    return r.output;
  };
  const std::string ok = R"("image_0": "images/0a.png", "image_1": "images/0b.png")";
  EXPECT_NE(with_line(R"({"caption": "x", )" + ok + R"(, "label_0": 1})")
                .find("bad.jsonl:2: missing field \"label_1\""),
            std::string::npos);
  EXPECT_NE(with_line(R"({"caption": "x", )" + ok + R"(, "label_0": 0.7, "label_1": 0.7})")
                .find("bad.jsonl:2: fields \"label_0\" and \"label_1\" must sum to 1"),
            std::string::npos);
  EXPECT_NE(with_line(R"({"caption": "x", )" + ok + R"(, "label_0": 2, "label_1": -1})")
                .find("bad.jsonl:2: field \"label_0\" must be in [0, 1], got 2"),
            std::string::npos);
  EXPECT_NE(
      with_line(
          R"({"caption": "x", "image_0": "images/0a.png", "image_1": "nope.png", "label_0": 1, "label_1": 0})")
          .find("bad.jsonl:2: field \"image_1\": image"),
      std::string::npos);
  // An image that is not a PNG is found before training, naming the line, field and file.
  std::ofstream(dir / "images" / "fake.png") << "not a png";
  EXPECT_NE(
      with_line(
          R"({"caption": "x", "image_0": "images/fake.png", "image_1": "images/0b.png", "label_0": 1, "label_1": 0})")
          .find("bad.jsonl:2: field \"image_0\": " + (dir / "images" / "fake.png").string() +
                " is not a PNG file"),
      std::string::npos);
  const auto r = run_aligner(pickscore_args(dir / "run", train, train, "data.image_fields=[a]"));
  EXPECT_NE(r.output.find("config key 'data.image_fields' must name two different fields, got [a]"),
            std::string::npos)
      << r.output;
  const auto text_only =
      run_aligner(fmt::format("pickscore --model {}/text_encoder data.train={} output_dir={}", kClip,
                              train.string(), (dir / "run2").string()));
  EXPECT_NE(text_only.output.find("a CLIPModel (text and vision towers) is needed"), std::string::npos)
      << text_only.output;
  fs::remove_all(dir);
}

}  // namespace
}  // namespace aligner
