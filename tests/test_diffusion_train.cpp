// `aligner diffusion-train` on the synthetic shapes set (16 images of 16 x 16) and a tiny
// Stable-Diffusion-shaped model of random weights (tests/fixtures/tiny-sd-configs): the VAE's and the
// UNet's losses fall, the VAE's scaling_factor is measured and exported, final/ is a whole diffusers
// folder, runs resume exactly, and bad data are errors naming the file and line.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "algo/diffusion_train.h"
#include "diffusion/shapes_data.h"
#include "io/png.h"
#include "io/safetensors.h"
#include "run_outputs.h"
#include "test_util.h"
#include "tiny_diffusion.h"

namespace aligner {
namespace {

namespace fs = std::filesystem;
using test::error_of;
using test::kRoot;
using test::metrics;
using test::run_aligner;
using test::temp_dir;

const std::string& kConfigs = test::kTinyDiffusionConfigs;

const fs::path& model_dir() {
  return test::tiny_diffusion_model(21);
}

const fs::path& data_dir() {
  static const fs::path dir = [] {
    const auto d = temp_dir("diffusion_train_shapes") / "shapes";
    write_shapes_dataset(d.string(), 16, 16, 5);
    return d;
  }();
  return dir;
}

std::string train_args(const fs::path& out, const std::string& extra) {
  return fmt::format(
      "diffusion-train --model {} data.train={} data.image_size=16 trainer.max_epochs=100 "
      "trainer.global_batch_size=4 trainer.micro_batch_size=4 optim.lr=2e-3 output_dir={} {}",
      model_dir().string(), (data_dir() / "captions.jsonl").string(), out.string(), extra);
}

double mean_loss(const std::vector<nlohmann::json>& rows, size_t first, size_t last) {
  double sum = 0;
  for (size_t i = first; i < last; ++i) sum += rows.at(i)["loss"].get<double>();
  return sum / double(last - first);
}

// The terms by hand: without a generator the decoded latent is the encoder's mean.
TEST(DiffusionTrain, VaeLossTermsAreTheReconstructionAndTheKl) {
  const auto p = init_pipeline(kConfigs, 3);
  const auto data = read_captioned_images((data_dir() / "captions.jsonl").string(), "image", "caption", 16);
  ASSERT_EQ(data.size(), 16u);
  EXPECT_EQ(data[0].caption, shape_caption(shape_spec(5, 0)));
  EXPECT_GE(data[0].image.min().item<double>(), -1.0);
  EXPECT_LE(data[0].image.max().item<double>(), 1.0);
  at::NoGradGuard g;
  const auto x = at::stack({data[0].image, data[1].image});
  const auto t = vae_loss_terms(p.vae, x, false, std::nullopt);
  const auto d = vae_encode(p.vae, x);
  const auto y = vae_decode(p.vae, d.mean * p.vae.cfg.scaling_factor);
  EXPECT_TRUE(at::allclose(t.recon, (y - x).pow(2).flatten(1).mean(1)));
  EXPECT_TRUE(at::allclose(t.kl, (0.5 * (d.mean.pow(2) + d.logvar.exp() - 1 - d.logvar)).flatten(1).mean(1)));
  EXPECT_TRUE(
      at::allclose(vae_loss_terms(p.vae, x, true, std::nullopt).recon, (y - x).abs().flatten(1).mean(1)));
  EXPECT_NEAR(measure_scaling_factor(p.vae, x, 1), 1 / d.mean.to(at::kDouble).std().item<double>(), 1e-6);
}

TEST(DiffusionTrain, VaeLossFallsAndTheScalingFactorIsWritten) {
  const auto out = temp_dir("diffusion_train_vae");
  const auto captions = (data_dir() / "captions.jsonl").string();
  const auto r = run_aligner(train_args(
      out, "train.part=vae trainer.max_steps=100 trainer.val_interval=100 data.validation=" + captions));
  ASSERT_EQ(r.status, 0) << r.output;
  const auto train = metrics(out), val = metrics(out, "validation");
  ASSERT_EQ(train.size(), 100u);
  EXPECT_LT(mean_loss(train, 80, 100), 0.5 * mean_loss(train, 0, 20)) << r.output;
  EXPECT_GT(train.back()["kl"].get<double>(), 0.0);
  // The images' reconstructions from the encoder's means.
  ASSERT_EQ(val.size(), 2u);
  EXPECT_LT(val[1]["recon"].get<double>(), 0.3 * val[0]["recon"].get<double>());
  EXPECT_NEAR(val[1]["loss"].get<double>(), val[1]["recon"].get<double>() + 1e-6 * val[1]["kl"].get<double>(),
              1e-6);
  // Images beside their reconstructions, two columns of 16 x 16.
  EXPECT_EQ(read_png((out / "images" / "step_100" / "reconstructions.png").string()).sizes(),
            (at::IntArrayRef{8 * 16, 32, 3}));
  // final/ is the whole folder, its VAE's scaling_factor 1 / std of the trained encoder's means.
  const auto p = load_pipeline((out / "final").string(), at::kCPU, at::kFloat);
  const auto data = read_captioned_images(captions, "image", "caption", 16);
  std::vector<at::Tensor> images;
  for (const auto& d : data) images.push_back(d.image);
  const double s = p.vae.cfg.scaling_factor;
  EXPECT_NE(s, 1.0);
  EXPECT_NEAR(s, measure_scaling_factor(p.vae, at::stack(images), 16), 1e-5 * s);
  // The UNet and the text encoder are the starting model's.
  const auto start = load_pipeline(model_dir().string(), at::kCPU, at::kFloat);
  EXPECT_TRUE(p.unet.conv_in.weight.equal(start.unet.conv_in.weight));
  EXPECT_FALSE(p.vae.encoder.conv_in.weight.equal(start.vae.encoder.conv_in.weight));
  fs::remove_all(out);
}

TEST(DiffusionTrain, UNetLossFallsAndValidationDrawsSamples) {
  const auto out = temp_dir("diffusion_train_unet");
  const auto r = run_aligner(
      train_args(out,
                 "train.part=unet trainer.max_steps=40 trainer.val_interval=40 infer.inference_steps=4 "
                 "data.validation=" +
                     (data_dir() / "captions.jsonl").string()));
  ASSERT_EQ(r.status, 0) << r.output;
  const auto train = metrics(out), val = metrics(out, "validation");
  ASSERT_EQ(train.size(), 40u);
  // The training loss is noisy (a timestep per image): the validation's noise and timesteps are fixed.
  EXPECT_LT(mean_loss(train, 20, 40), mean_loss(train, 0, 20)) << r.output;
  ASSERT_EQ(val.size(), 2u);
  EXPECT_LT(val[1]["loss"].get<double>(), 0.75 * val[0]["loss"].get<double>()) << r.output;
  // The first 8 captions' samples in rows of 4.
  EXPECT_EQ(read_png((out / "images" / "step_40" / "samples.png").string()).sizes(),
            (at::IntArrayRef{32, 64, 3}));
  const auto p = load_pipeline((out / "final").string(), at::kCPU, at::kFloat);
  const auto start = load_pipeline(model_dir().string(), at::kCPU, at::kFloat);
  EXPECT_FALSE(p.unet.conv_in.weight.equal(start.unet.conv_in.weight));
  EXPECT_TRUE(p.vae.encoder.conv_in.weight.equal(start.vae.encoder.conv_in.weight));
  EXPECT_EQ(p.vae.cfg.scaling_factor, start.vae.cfg.scaling_factor);
  fs::remove_all(out);
}

// The trained part's final weights, from a run that stops at step 2 and resumes, and from one that
// does not; random flips on, so that every draw of a step is keyed by where the data stands. On a GPU
// only deterministic kernels repeat a step bit for bit (cuDNN's convolution backward passes).
void expect_resumes_exactly(const std::string& part, const std::string& extra) {
  const auto whole = temp_dir("diffusion_train_whole"), parts = temp_dir("diffusion_train_parts");
  const std::string every =
      "train.part=" + part +
      " data.random_flip=true trainer.save_interval=2 trainer.keep_last=0 trainer.deterministic=true "
      "trainer.micro_batch_size=2 " +
      extra + " ";
  auto r = run_aligner(train_args(whole, every + "trainer.max_steps=4"));
  ASSERT_EQ(r.status, 0) << r.output;
  r = run_aligner(train_args(parts, every + "trainer.max_steps=2"));
  ASSERT_EQ(r.status, 0) << r.output;
  r = run_aligner(train_args(parts, every + "trainer.max_steps=4"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("resuming from"), std::string::npos);
  const std::string file = "final/" + part + "/diffusion_pytorch_model.safetensors";
  const auto a = safetensors::File::open((whole / file).string());
  const auto b = safetensors::File::open((parts / file).string());
  ASSERT_EQ(a.tensors().size(), b.tensors().size());
  for (const auto& t : a.tensors()) EXPECT_TRUE(a.get(t.name).equal(b.get(t.name))) << t.name;
  const auto ma = metrics(whole), mb = metrics(parts);
  ASSERT_EQ(mb.size(), 4u);
  EXPECT_EQ(ma[3]["loss"].get<double>(), mb[3]["loss"].get<double>());
  if (part == "unet") {
    // A validation of prompts draws samples and has no loss.
    EXPECT_TRUE(metrics(whole, "validation").empty());
    EXPECT_EQ(read_png((whole / "images" / "step_4" / "samples.png").string()).sizes(),
              (at::IntArrayRef{32, 64, 3}));
  }
  fs::remove_all(whole);
  fs::remove_all(parts);
}

TEST(DiffusionTrain, ResumesToTheSameWeights) {
  expect_resumes_exactly(
      "unet", "infer.inference_steps=2 data.validation=" + (data_dir() / "prompts.jsonl").string());
  expect_resumes_exactly("vae", "");
}

// A 16 x 16 RGB PNG whose image data is a deflate block with fixed Huffman codes that ends at once
// (no pixels), then zeros: a corrupt file, whose zlib checksum (of nothing) is wrong.
std::string corrupt_png() {
  const auto be32 = [](uint32_t v) {
    return std::string{char(v >> 24), char(v >> 16), char(v >> 8), char(v)};
  };
  const auto chunk = [&](const std::string& type, const std::string& data) {
    return be32(uint32_t(data.size())) + type + data + be32(png_crc32(type + data));
  };
  const std::string header = be32(16) + be32(16) + std::string{8, 2, 0, 0, 0};
  const std::string zlib = std::string{0x78, 0x01, 0x03} + std::string(16 * 49, '\0');
  return "\x89PNG\r\n\x1a\n" + chunk("IHDR", header) + chunk("IDAT", zlib) + chunk("IEND", "");
}

TEST(DiffusionTrain, BadDataAreErrorsNamingTheFileAndLine) {
  const auto dir = temp_dir("diffusion_train_bad");
  fs::create_directories(dir / "images");
  fs::copy_file(data_dir() / "images" / "00000.png", dir / "images" / "ok.png");
  write_png((dir / "images" / "small.png").string(), at::zeros({8, 8, 3}, at::kByte));
  std::ofstream(dir / "images" / "bad.png") << "not a png";
  std::ofstream(dir / "images" / "corrupt.png", std::ios::binary) << corrupt_png();
  const auto error = [&](const std::string& second_line, const std::string& extra = "") {
    std::ofstream(dir / "data.jsonl") << "{\"image\": \"images/ok.png\", \"caption\": \"fine\"}\n"
                                      << second_line << "\n";
    const auto r = run_aligner(
        fmt::format("diffusion-train --model {} data.train={} data.image_size=16 trainer.max_steps=1 "
                    "trainer.global_batch_size=1 output_dir={} {}",
                    model_dir().string(), (dir / "data.jsonl").string(), (dir / "run").string(), extra));
    EXPECT_NE(r.status, 0) << second_line;
    return r.output;
  };
  const std::string where = (dir / "data.jsonl").string() + ":2";
  EXPECT_NE(error(R"({"image": "images/none.png", "caption": "x"})").find(where + ": field \"image\": image"),
            std::string::npos);
  EXPECT_NE(error(R"({"image": "images/none.png", "caption": "x"})").find("none.png does not exist"),
            std::string::npos);
  EXPECT_NE(error(R"({"image": "images/small.png", "caption": "x"})")
                .find(where + ": image " + (dir / "images" / "small.png").string() +
                      " is 8 x 8 pixels; data.image_size is 16"),
            std::string::npos);
  EXPECT_NE(error(R"({"image": "images/bad.png", "caption": "x"})").find(where + ": "), std::string::npos);
  EXPECT_NE(error(R"({"image": "images/bad.png", "caption": "x"})").find("not a PNG file"),
            std::string::npos);
  EXPECT_NE(error(R"({"image": "images/corrupt.png", "caption": "x"})")
                .find(where + ": " + (dir / "images" / "corrupt.png").string() +
                      ": decompressed data fails its Adler-32 checksum"),
            std::string::npos);
  const auto no_caption = error(R"({"image": "images/ok.png", "text": "x"})");
  EXPECT_NE(no_caption.find(where), std::string::npos) << no_caption;
  EXPECT_NE(no_caption.find("caption"), std::string::npos) << no_caption;
  const std::string ok = R"({"image": "images/ok.png", "caption": "x"})";
  EXPECT_NE(error(ok, "train.part=text_encoder").find("'train.part' expects vae or unet, got 'text_encoder'"),
            std::string::npos);
  EXPECT_NE(error(ok, "data.image_size=15").find("data.image_size: images of 15 x 15 pixels"),
            std::string::npos);
  EXPECT_NE(error(ok, "train.caption_dropout=2").find("'train.caption_dropout' must be in [0, 1]"),
            std::string::npos);
  EXPECT_NE(error(ok, "vae.recon_loss=lpips").find("'vae.recon_loss' expects l2 or l1"), std::string::npos);
  fs::remove_all(dir);
}

}  // namespace
}  // namespace aligner
