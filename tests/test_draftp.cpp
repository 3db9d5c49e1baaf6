// Diffusion model folders (init, save, load), `aligner draftp` (DRaFT+) and `aligner diffuse` on a
// tiny Stable-Diffusion-shaped model of random weights (tests/fixtures/tiny-sd-configs): the
// reward rises, the KL term is what NeMo-Aligner computes, runs resume exactly, the adapter is a
// diffusers LoRA file that diffuse reads, and bad settings are one-line errors.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "algo/draftp.h"
#include "diffusion/shapes_data.h"
#include "diffusion/unet_lora.h"
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
  return test::tiny_diffusion_model(11);
}

fs::path prompts_file(const fs::path& dir) {
  fs::create_directories(dir);
  const auto path = dir / "prompts.jsonl";
  std::ofstream f(path);
  for (const char* p : {"a red circle on a blue background", "a green square on a white background",
                        "a blue triangle on a black background", "a yellow circle on a purple background"})
    f << nlohmann::json{{"prompt", p}}.dump() << "\n";
  return path;
}

std::string draftp_args(const fs::path& out, const fs::path& prompts, const std::string& extra = "") {
  return fmt::format(
      "draftp --model {} data.train={} data.validation={} reward.kind=redness infer.height=16 infer.width=16 "
      "infer.inference_steps=4 draftp.truncation_steps=2 trainer.max_epochs=100 trainer.global_batch_size=4 "
      "trainer.micro_batch_size=2 lora.rank=4 optim.lr=3e-2 optim.warmup_steps=0 output_dir={} {}",
      model_dir().string(), prompts.string(), prompts.string(), out.string(), extra);
}

TEST(DiffusionPipeline, InitSaveLoadRoundTrips) {
  const auto p = load_pipeline(model_dir().string(), at::kCPU, at::kFloat);
  const auto again = init_pipeline(kConfigs, 11);
  const auto a = named_parameters(p.unet), b = named_parameters(again.unet);
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(a[i].second.equal(b[i].second)) << a[i].first;
  EXPECT_TRUE(p.text_encoder.token_embedding.equal(again.text_encoder.token_embedding));
  // The prompt embedding the UNet attends to: [prompts, 77, hidden]; prompts differ.
  at::NoGradGuard g;
  const auto e = encode_prompts(p, {"a red circle", "a blue square"});
  EXPECT_EQ(e.sizes(), (at::IntArrayRef{2, 77, 16}));
  EXPECT_FALSE(at::allclose(e[0], e[1]));
  EXPECT_EQ(latent_scale(p.vae), 2);
  EXPECT_NE(error_of([&] {
              initial_latents(p, 1, 15, 16, 0, at::kCPU, at::kFloat, "infer.height");
            }).find("infer.height: images of 15 x 16 pixels; each side must be a positive multiple of 2"),
            std::string::npos);
}

// With ALIGNER_TEST_DEVICE=cuda: the models on the GPU (cuDNN convolutions, fused attention) follow
// the CPU's through the whole chain DRaFT+ differentiates: prompts -> guided UNet -> DDIM step -> VAE
// decoding -> reward, and the reward's gradient reaching the UNet's weights. In float32 to TF32's
// rounding (cuDNN convolutions use it); in bfloat16 no further from float32 than bfloat16 on the
// CPU is (twice that, as the GPU's fused kernels round in other places), so that rounding, which
// grows through the chain, is told from a wrong kernel. Measured: bfloat16 errors of 1-9%.
TEST(DiffusionPipeline, GpuFollowsTheCpu) {
  const char* d = std::getenv("ALIGNER_TEST_DEVICE");
  if (!d || std::string(d) != "cuda") GTEST_SKIP() << "set ALIGNER_TEST_DEVICE=cuda";
  const auto run = [&](at::Device device, at::ScalarType dtype) {
    auto p = load_pipeline(model_dir().string(), device, dtype);
    for (auto& [name, w] : named_parameters(p.unet)) w.requires_grad_(true);
    at::Tensor cond, uncond;
    {
      at::NoGradGuard g;
      cond = encode_prompts(p, {"a red circle on a blue background", "a green square"});
      uncond = encode_prompts(p, {""});
    }
    const auto x = initial_latents(p, 2, 16, 16, 5, device, dtype, "test");
    const auto eps = guided_output(p.unet, x, 501, cond, uncond, 3.0);
    const auto images =
        decode_images(p.vae, ddim_step(p.scheduler, eps, 501, 481, x, 0.0).pred_original_sample);
    redness_reward(images).sum().backward();
    std::vector<std::pair<std::string, at::Tensor>> out{
        {"prompt embeddings", cond}, {"guided eps", eps}, {"images", images}};
    // The gradients as one vector: a small tensor's (a bias whose terms cancel) rounding error alone
    // says little about a kernel.
    std::vector<at::Tensor> grads;
    for (auto& [name, w] : named_parameters(p.unet)) grads.push_back(w.grad().reshape({-1}).to(at::kFloat));
    out.emplace_back("UNet gradients", at::cat(grads));
    for (auto& [name, o] : out) o = o.detach().to(at::kCPU, at::kDouble);
    return out;
  };
  const auto ref = run(at::kCPU, at::kFloat);
  const auto error = [&](const std::vector<std::pair<std::string, at::Tensor>>& got, size_t i) {
    return (got[i].second - ref[i].second).norm().item<double>() / ref[i].second.norm().item<double>();
  };
  const auto gpu32 = run(at::kCUDA, at::kFloat);
  const auto cpu16 = run(at::kCPU, at::kBFloat16);
  const auto gpu16 = run(at::kCUDA, at::kBFloat16);
  for (size_t i = 0; i < ref.size(); ++i) {
    EXPECT_LT(error(gpu32, i), 5e-3) << ref[i].first;
    EXPECT_LT(error(gpu16, i), 2 * error(cpu16, i) + 0.01)
        << ref[i].first << " (bfloat16 on the CPU: " << error(cpu16, i) << ")";
  }
}

TEST(DiffusionPipeline, FoldersThatDoNotFitAreRefused) {
  const auto dir = temp_dir("tiny_sd_bad");
  fs::copy(kConfigs, dir / "configs", fs::copy_options::recursive);
  // A text encoder narrower than the UNet's cross-attention.
  auto j = nlohmann::json::parse(std::ifstream(dir / "configs" / "text_encoder" / "config.json"));
  j["hidden_size"] = 32;
  std::ofstream(dir / "configs" / "text_encoder" / "config.json") << j.dump();
  EXPECT_NE(error_of([&] {
              init_pipeline((dir / "configs").string(), 1);
            }).find("the text encoder's hidden size 32 is not the UNet's cross_attention_dim 16"),
            std::string::npos);
  fs::remove_all(dir / "configs" / "scheduler");
  EXPECT_NE(error_of([&] { init_pipeline((dir / "configs").string(), 1); }).find("has no scheduler/ folder"),
            std::string::npos);
  // model_index.json names the classes aligner runs.
  fs::copy(model_dir(), dir / "model", fs::copy_options::recursive);
  auto index = nlohmann::json::parse(std::ifstream(dir / "model" / "model_index.json"));
  index["unet"] = {"diffusers", "UNet2DModel"};
  std::ofstream(dir / "model" / "model_index.json") << index.dump();
  EXPECT_NE(error_of([&] {
              load_pipeline((dir / "model").string(), at::kCPU, at::kFloat);
            }).find("\"unet\" is a UNet2DModel; aligner runs UNet2DConditionModel"),
            std::string::npos);
  // Saving over a folder aligner did not write is refused (a downloaded model's too), unless asked.
  fs::create_directories(dir / "other");
  std::ofstream(dir / "other" / "notes.txt") << "mine";
  const auto p = init_pipeline(kConfigs, 1);
  EXPECT_NE(error_of([&] {
              save_pipeline(p, (dir / "other").string(), Replace::ours);
            }).find("not a model folder written by aligner (it holds 'notes.txt')"),
            std::string::npos);
  fs::remove(dir / "model" / ".written-by-aligner");
  EXPECT_NE(error_of([&] {
              save_pipeline(p, (dir / "model").string(), Replace::ours);
            }).find("not a model folder written by aligner (it has no .written-by-aligner)"),
            std::string::npos);
  save_pipeline(p, (dir / "model").string(), Replace::anything);
  EXPECT_TRUE(fs::exists(dir / "model" / "unet" / "diffusion_pytorch_model.safetensors"));
  fs::remove_all(dir);
}

// NeMo-Aligner's KL: the mean over the recorded steps and the latents' elements of the squared
// difference between the trained and the frozen model's guided outputs on the trained trajectory.
TEST(Draftp, KlIsZeroAtTheBaseAndTheMeanSquaredDifference) {
  auto p = load_pipeline(model_dir().string(), at::kCPU, at::kFloat);
  LoraConfig lora;
  lora.rank = 2;
  lora.targets = kUNetLoraTargets;
  add_unet_adapters(p.unet, lora, 3);
  const UNet base = unet_without_adapters(p.unet);
  DraftpOptions o;
  o.inference_steps = 3;
  o.truncation_steps = 2;
  o.height = o.width = 8;
  o.guidance_scale = 3;
  const ImageReward reward = [](const at::Tensor& images, const std::vector<std::string>&) {
    return redness_reward(images);
  };
  const std::vector<std::string> prompts = {"a red circle", "a blue square"};
  const auto uncond = encode_prompts(p, {""}).detach();
  const auto latents = initial_latents(p, 2, 8, 8, 5, at::kCPU, at::kFloat, "test");
  const auto s0 = draftp_sample(p, p.unet, base, reward, o, prompts, uncond, latents, {});
  EXPECT_EQ(s0.kl.sizes(), (at::IntArrayRef{2}));
  EXPECT_EQ(s0.kl.abs().max().item<double>(), 0.0);  // B = 0: the adapters do nothing yet
  EXPECT_EQ(s0.images.sizes(), (at::IntArrayRef{2, 3, 8, 8}));
  EXPECT_TRUE(at::allclose(s0.reward, redness_reward(s0.images)));

  {
    at::NoGradGuard g;
    for (auto& [name, l] : unet_attention_linears(p.unet)) l->lora.b.normal_(0, 0.3);
  }
  const auto s = draftp_sample(p, p.unet, base, reward, o, prompts, uncond, latents, {});
  // The same by hand: both models' guided outputs at the last two steps of the trained trajectory.
  at::NoGradGuard g;
  const auto cond = encode_prompts(p, prompts);
  std::vector<at::Tensor> outs, frozen;
  const EpsFn eps = [&](const at::Tensor& x, int64_t t, int64_t i) {
    const auto y = guided_output(p.unet, x, t, cond, uncond, 3);
    if (i >= 1) {
      outs.push_back(y);
      frozen.push_back(guided_output(base, x, t, cond, uncond, 3));
    }
    return y;
  };
  ddim_sample(p.scheduler, {3, 0.0, {}, 0}, eps, latents);
  ASSERT_EQ(outs.size(), 2u);
  const auto expected =
      ((outs[0] - frozen[0]).pow(2).flatten(1).mean(1) + (outs[1] - frozen[1]).pow(2).flatten(1).mean(1)) / 2;
  EXPECT_GT(expected.min().item<double>(), 0);
  EXPECT_TRUE(at::allclose(s.kl.detach(), expected, 1e-5, 1e-9)) << s.kl << expected;
}

TEST(Draftp, RewardRisesAndTheAdapterIsADiffusersLoraFile) {
  const auto out = temp_dir("draftp_run");
  const auto prompts = prompts_file(out);
  const auto r = run_aligner(
      draftp_args(out, prompts, "trainer.max_steps=30 trainer.val_interval=30 draftp.kl_coeff=0.01"));
  ASSERT_EQ(r.status, 0) << r.output;
  const auto train = metrics(out), val = metrics(out, "validation");
  ASSERT_EQ(train.size(), 30u);
  ASSERT_EQ(val.size(), 2u);  // steps 0 and 30
  const double before = val[0]["reward"].get<double>(), after = val[1]["reward"].get<double>();
  EXPECT_DOUBLE_EQ(before, val[0]["reward_base"].get<double>());  // nothing trained yet
  EXPECT_DOUBLE_EQ(before, val[1]["reward_base"].get<double>());  // the frozen model, the same noise
  EXPECT_GT(after, before + 0.05) << r.output;
  EXPECT_GT(train.back()["kl"].get<double>(), 0.0);
  EXPECT_EQ(train.front()["kl"].get<double>(), 0.0);
  // The validation grid: a row per prompt, the trained image then the frozen one's, 16 x 16 each.
  const auto grid = read_png((out / "images" / "step_30" / "trained_vs_base.png").string());
  EXPECT_EQ(grid.sizes(), (at::IntArrayRef{64, 32, 3}));
  EXPECT_TRUE(fs::exists(out / "images" / "step_0" / "trained_vs_base.png"));
  // final/ is diffusers' LoRA file, which diffuse applies: its images are the trained model's.
  const auto lora = safetensors::File::open((out / "final" / "pytorch_lora_weights.safetensors").string());
  EXPECT_TRUE(lora.contains("unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight"));
  const std::string diffuse = fmt::format(
      "diffuse --model {} --prompts {} infer.height=16 infer.width=16 infer.inference_steps=4 "
      "infer.batch_size=3 ",
      model_dir().string(), prompts.string());
  const auto base_run = run_aligner(diffuse + "--out " + (out / "base").string());
  ASSERT_EQ(base_run.status, 0) << base_run.output;
  const auto tuned =
      run_aligner(diffuse + "--out " + (out / "tuned").string() + " --adapter " + (out / "final").string());
  ASSERT_EQ(tuned.status, 0) << tuned.output;
  const auto base_aig = run_aligner(diffuse + "--out " + (out / "aig_base").string() + " --adapter " +
                                    (out / "final").string() + " --aig base");
  ASSERT_EQ(base_aig.status, 0) << base_aig.output;
  const auto linear = run_aligner(diffuse + "--out " + (out / "aig_linear").string() + " --adapter " +
                                  (out / "final").string() + " --aig linear");
  ASSERT_EQ(linear.status, 0) << linear.output;
  double red_base = 0, red_tuned = 0, red_linear = 0;
  for (int i = 0; i < 4; ++i) {
    const std::string name = fmt::format("{:05d}_0.png", i);
    const auto load = [&](const char* run) {
      return read_png((out / run / name).string()).permute({2, 0, 1}).unsqueeze(0).to(at::kFloat) / 255;
    };
    EXPECT_TRUE(load("aig_base").equal(load("base"))) << "--aig base is the model without its adapter";
    red_base += redness_reward(load("base")).item<double>();
    red_tuned += redness_reward(load("tuned")).item<double>();
    red_linear += redness_reward(load("aig_linear")).item<double>();
  }
  EXPECT_GT(red_tuned, red_base + 0.2);
  EXPECT_GT(red_linear, red_base);  // part of the way
  EXPECT_LT(red_linear, red_tuned);
  std::ifstream index(out / "tuned" / "images.jsonl");
  std::string first;
  std::getline(index, first);
  EXPECT_EQ(nlohmann::json::parse(first)["prompt"], "a red circle on a blue background");
  fs::remove_all(out);
}

TEST(Draftp, ResumesToTheSameAdapter) {
  const auto whole = temp_dir("draftp_whole"), parts = temp_dir("draftp_parts");
  const auto prompts = prompts_file(whole);
  // Deterministic kernels: on a GPU, cuDNN's convolution backward passes add in varying order.
  const std::string every =
      "trainer.save_interval=2 trainer.keep_last=0 data.validation=null trainer.deterministic=true";
  auto r = run_aligner(draftp_args(whole, prompts, "trainer.max_steps=4 " + every));
  ASSERT_EQ(r.status, 0) << r.output;
  r = run_aligner(draftp_args(parts, prompts, "trainer.max_steps=2 " + every));
  ASSERT_EQ(r.status, 0) << r.output;
  r = run_aligner(draftp_args(parts, prompts, "trainer.max_steps=4 " + every));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("resuming from"), std::string::npos);
  const auto a = safetensors::File::open((whole / "final" / "pytorch_lora_weights.safetensors").string());
  const auto b = safetensors::File::open((parts / "final" / "pytorch_lora_weights.safetensors").string());
  ASSERT_EQ(a.tensors().size(), b.tensors().size());
  for (const auto& t : a.tensors()) EXPECT_TRUE(a.get(t.name).equal(b.get(t.name))) << t.name;
  const auto ma = metrics(whole), mb = metrics(parts);
  ASSERT_EQ(mb.size(), 4u);
  EXPECT_EQ(ma[3]["loss"].get<double>(), mb[3]["loss"].get<double>());
  fs::remove_all(whole);
  fs::remove_all(parts);
}

TEST(Draftp, BadSettingsAreOneLineErrors) {
  const auto out = temp_dir("draftp_bad");
  const auto prompts = prompts_file(out);
  const auto error = [&](const std::string& extra) {
    const auto r = run_aligner(draftp_args(out / "run", prompts, "trainer.max_steps=1 " + extra));
    EXPECT_NE(r.status, 0) << extra;
    return r.output;
  };
  EXPECT_NE(error("lora.rank=0").find("'lora.rank' must be >= 1"), std::string::npos);
  EXPECT_NE(error("draftp.truncation_steps=5")
                .find("'draftp.truncation_steps' must be in [1, infer.inference_steps = 4]"),
            std::string::npos);
  EXPECT_NE(error("reward.kind=pickscore").find("'reward.kind' expects clip or redness"), std::string::npos);
  EXPECT_NE(error("reward.kind=clip").find("'reward.model' must be set"), std::string::npos);
  EXPECT_NE(error("lora.target_modules=[q_proj]").find("unknown module 'q_proj'"), std::string::npos);
  EXPECT_NE(error("infer.height=15").find("images of 15 x 16 pixels"), std::string::npos);
  EXPECT_NE(error("trainer.tensor_parallel=2").find("tensor_parallel"), std::string::npos);
  std::ofstream(out / "bad.jsonl") << "{\"prompt\": \"fine\"}\n{\"text\": \"no prompt\"}\n";
  EXPECT_NE(error("data.train=" + (out / "bad.jsonl").string()).find("bad.jsonl:2"), std::string::npos);
  const auto r = run_aligner(fmt::format("diffuse --model {} --prompts {} --out {} --aig linear",
                                         model_dir().string(), prompts.string(), (out / "img").string()));
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("'infer.aig' mixes the adapted and the base UNet: it needs model.adapter"),
            std::string::npos);
  fs::remove_all(out);
}

}  // namespace
}  // namespace aligner
