// Stable Diffusion's UNet and VAE (src/diffusion/): the real SD 1.5 configs give the published
// parameter counts, forward shapes, gradients against central differences, the diffusers folder
// round trip, errors for bad configs and files, and the small pieces against hand-computed values.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <functional>
#include <map>

#include "core/json.h"
#include "diffusion/blocks.h"
#include "diffusion/unet.h"
#include "diffusion/vae.h"
#include "io/safetensors.h"
#include "test_util.h"

namespace aligner {
namespace {

namespace fs = std::filesystem;
using test::error_of;
using test::kRoot;
using test::temp_dir;

const std::string kUNetConfig = kRoot + "/tests/fixtures/sd15-configs/unet_config.json";
const std::string kVaeConfig = kRoot + "/tests/fixtures/sd15-configs/vae_config.json";
const auto kMeta = at::TensorOptions().dtype(at::kFloat).device(at::kMeta);

std::map<std::string, std::vector<int64_t>> file_shapes(const Params& params) {
  std::map<std::string, std::vector<int64_t>> out;
  for (const auto& p : params) {
    auto s = p.tensor->sizes().vec();
    if (p.conv1x1) s.insert(s.end(), {1, 1});
    out[p.name] = s;
  }
  return out;
}

// SD 1.5's UNet block structure at a width that runs in milliseconds.
UNetConfig small_sd_unet_config() {
  auto j = read_json_file(kUNetConfig);
  j["block_out_channels"] = {16, 16, 32, 32};
  j["norm_num_groups"] = 8;
  j["cross_attention_dim"] = 12;
  return parse_unet_config(j, "small");
}

// The smallest UNet with every kind of block: [8, 16] channels, 2 heads.
UNetConfig tiny_unet_config(bool linear_projection) {
  const nlohmann::json j = {{"block_out_channels", {8, 16}},
                            {"down_block_types", {"CrossAttnDownBlock2D", "DownBlock2D"}},
                            {"up_block_types", {"UpBlock2D", "CrossAttnUpBlock2D"}},
                            {"layers_per_block", 1},
                            {"norm_num_groups", 4},
                            {"cross_attention_dim", 8},
                            {"attention_head_dim", 2},
                            {"use_linear_projection", linear_projection}};
  return parse_unet_config(j, "tiny");
}

VaeConfig tiny_vae_config() {
  const nlohmann::json j = {{"block_out_channels", {8, 16}},
                            {"down_block_types", {"DownEncoderBlock2D", "DownEncoderBlock2D"}},
                            {"up_block_types", {"UpDecoderBlock2D", "UpDecoderBlock2D"}},
                            {"layers_per_block", 1},
                            {"norm_num_groups", 4},
                            {"sample_size", 8}};
  return parse_vae_config(j, "tiny");
}

const at::Tensor* find_param(const Params& params, const std::string& name) {
  for (const auto& p : params)
    if (p.name == name) return p.tensor;
  ADD_FAILURE() << "no parameter " << name;
  return nullptr;
}

// d loss / d t[i] by autograd against central differences, for the given flat indices of t.
void expect_gradients_match(const std::function<at::Tensor()>& loss, at::Tensor t,
                            const std::vector<int64_t>& idx, const std::string& what) {
  t.mutable_grad() = at::Tensor();
  loss().backward();
  ASSERT_TRUE(t.grad().defined()) << what;
  const auto grad = t.grad().reshape({-1});
  auto flat = t.detach().view({-1});
  const double h = 1e-6;
  for (int64_t i : idx) {
    const int64_t k = i % flat.numel();
    const double x0 = flat[k].item<double>();
    double up, down;
    {
      at::NoGradGuard no_grad;
      flat[k].fill_(x0 + h);
      up = loss().item<double>();
      flat[k].fill_(x0 - h);
      down = loss().item<double>();
      flat[k].fill_(x0);
    }
    const double fd = (up - down) / (2 * h), ad = grad[k].item<double>();
    EXPECT_NEAR(ad, fd, 1e-6 + 1e-5 * std::abs(fd)) << what << " element " << k;
  }
}

TEST(DiffusionModels, Sd15ParameterCountsAndShapes) {
  const UNetConfig ucfg = load_unet_config(kUNetConfig);
  EXPECT_EQ(ucfg.attention_heads, (std::vector<int64_t>{8, 8, 8, 8}));
  UNet unet = allocate_unet(ucfg, kMeta);  // shapes only: no memory
  const Params up = unet_params(unet);
  EXPECT_EQ(count_params(up), 859520964);
  EXPECT_EQ(up.size(), 686u);  // tensors in SD 1.5's unet/diffusion_pytorch_model.safetensors
  const auto us = file_shapes(up);
  EXPECT_EQ(us.at("conv_in.weight"), (std::vector<int64_t>{320, 4, 3, 3}));
  EXPECT_EQ(us.at("time_embedding.linear_1.weight"), (std::vector<int64_t>{1280, 320}));
  EXPECT_EQ(us.at("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"),
            (std::vector<int64_t>{320, 768}));
  EXPECT_EQ(us.at("down_blocks.0.attentions.0.proj_in.weight"), (std::vector<int64_t>{320, 320, 1, 1}));
  EXPECT_EQ(us.at("down_blocks.1.attentions.1.transformer_blocks.0.ff.net.0.proj.weight"),
            (std::vector<int64_t>{5120, 640}));
  EXPECT_EQ(us.at("down_blocks.1.resnets.0.conv_shortcut.weight"), (std::vector<int64_t>{640, 320, 1, 1}));
  EXPECT_EQ(us.at("down_blocks.2.downsamplers.0.conv.weight"), (std::vector<int64_t>{1280, 1280, 3, 3}));
  EXPECT_EQ(us.count("down_blocks.3.downsamplers.0.conv.weight"), 0u);
  EXPECT_EQ(us.at("mid_block.attentions.0.transformer_blocks.0.ff.net.2.weight"),
            (std::vector<int64_t>{1280, 5120}));
  EXPECT_EQ(us.at("up_blocks.1.resnets.2.conv_shortcut.weight"), (std::vector<int64_t>{1280, 1920, 1, 1}));
  EXPECT_EQ(us.at("up_blocks.3.resnets.0.conv1.weight"), (std::vector<int64_t>{320, 960, 3, 3}));
  EXPECT_EQ(us.at("up_blocks.0.upsamplers.0.conv.weight"), (std::vector<int64_t>{1280, 1280, 3, 3}));
  EXPECT_EQ(us.count("up_blocks.3.upsamplers.0.conv.weight"), 0u);
  EXPECT_EQ(us.at("conv_out.weight"), (std::vector<int64_t>{4, 320, 3, 3}));

  const VaeConfig vcfg = load_vae_config(kVaeConfig);
  EXPECT_DOUBLE_EQ(vcfg.scaling_factor, 0.18215);
  Vae vae = allocate_vae(vcfg, kMeta);
  const Params vp = vae_params(vae);
  EXPECT_EQ(count_params(vp), 83653863);
  EXPECT_EQ(vp.size(), 248u);  // tensors in SD 1.5's vae/diffusion_pytorch_model.safetensors
  const auto vs = file_shapes(vp);
  EXPECT_EQ(vs.at("encoder.conv_out.weight"), (std::vector<int64_t>{8, 512, 3, 3}));
  EXPECT_EQ(vs.at("encoder.mid_block.attentions.0.to_q.weight"), (std::vector<int64_t>{512, 512}));
  EXPECT_EQ(vs.at("quant_conv.weight"), (std::vector<int64_t>{8, 8, 1, 1}));
  EXPECT_EQ(vs.at("post_quant_conv.weight"), (std::vector<int64_t>{4, 4, 1, 1}));
  EXPECT_EQ(vs.at("decoder.up_blocks.3.resnets.0.conv_shortcut.weight"),
            (std::vector<int64_t>{128, 256, 1, 1}));
  EXPECT_EQ(vs.at("decoder.up_blocks.0.resnets.2.conv2.weight"), (std::vector<int64_t>{512, 512, 3, 3}));
  EXPECT_EQ(vs.at("encoder.down_blocks.0.downsamplers.0.conv.weight"),
            (std::vector<int64_t>{128, 128, 3, 3}));
}

TEST(DiffusionModels, ForwardShapesOfTheSd15Structure) {
  const UNetConfig cfg = small_sd_unet_config();
  const UNet unet = init_unet(cfg, at::kCPU, at::kFloat, 1);
  at::NoGradGuard no_grad;
  const auto ctx = at::randn({2, 77, 12});
  // 64 -> 8 latents' worth of downsamplings: 8 -> 4 -> 2 -> 1.
  const auto out = unet_forward(unet, at::randn({2, 4, 8, 8}), at::tensor({999, 10}), ctx);
  EXPECT_EQ(out.sizes(), (std::vector<int64_t>{2, 4, 8, 8}));
  EXPECT_TRUE(out.isfinite().all().item<bool>());
  // Sizes the downsamplings round up come back to the skip connections' sizes: 10x12 -> 5x6 -> 3x3 -> 2x2.
  EXPECT_EQ(unet_forward(unet, at::randn({2, 4, 10, 12}), at::tensor({5.5f}), ctx).sizes(),
            (std::vector<int64_t>{2, 4, 10, 12}));
  // One timestep for the batch is that timestep for each sample.
  const auto x = at::randn({2, 4, 8, 8});
  EXPECT_TRUE(at::allclose(unet_forward(unet, x, at::tensor(int64_t(7)), ctx),
                           unet_forward(unet, x, at::tensor({7, 7}), ctx)));

  auto vj = read_json_file(kVaeConfig);
  vj["block_out_channels"] = {8, 8, 16, 16};
  vj["norm_num_groups"] = 4;
  const Vae vae = init_vae(parse_vae_config(vj, "small"), at::kCPU, at::kFloat, 2);
  const auto dist = vae_encode(vae, at::rand({1, 3, 16, 16}) * 2 - 1);
  EXPECT_EQ(dist.mean.sizes(), (std::vector<int64_t>{1, 4, 2, 2}));
  EXPECT_EQ(dist.logvar.sizes(), (std::vector<int64_t>{1, 4, 2, 2}));
  auto gen = at::detail::createCPUGenerator(3);
  const auto z = sample_latents(vae, dist, gen);
  EXPECT_EQ(vae_decode(vae, z).sizes(), (std::vector<int64_t>{1, 3, 16, 16}));
  // The sample is the scaled mean plus scaled noise of the posterior's spread.
  auto gen2 = at::detail::createCPUGenerator(3);
  const auto noise = at::randn({1, 4, 2, 2}, gen2);
  EXPECT_TRUE(at::allclose(z, (dist.mean + at::exp(0.5 * dist.logvar) * noise) * 0.18215));
}

TEST(DiffusionModels, UNetGradientsMatchFiniteDifferences) {
  for (bool linear : {false, true}) {
    UNet unet = init_unet(tiny_unet_config(linear), at::kCPU, at::kDouble, 3);
    const Params params = unet_params(unet);
    for (const auto& p : params) p.tensor->requires_grad_(true);
    auto sample = at::randn({1, 4, 4, 4}, at::kDouble).requires_grad_(true);
    auto ctx = at::randn({1, 3, 8}, at::kDouble).requires_grad_(true);
    const auto weights = at::randn({1, 4, 4, 4}, at::kDouble);
    const auto t = at::tensor({321});
    const auto loss = [&] { return (unet_forward(unet, sample, t, ctx) * weights).sum(); };
    const std::string mode = linear ? "linear projection: " : "conv projection: ";
    expect_gradients_match(loss, sample, {0, 17, 63}, mode + "sample");
    expect_gradients_match(loss, ctx, {0, 13, 23}, mode + "encoder_hidden_states");
    for (const char* name :
         {"conv_in.weight", "time_embedding.linear_1.weight", "down_blocks.0.attentions.0.proj_in.weight",
          "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
          "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
          "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
          "down_blocks.0.downsamplers.0.conv.weight", "mid_block.resnets.1.time_emb_proj.weight",
          "mid_block.attentions.0.transformer_blocks.0.attn2.to_v.weight",
          "up_blocks.0.resnets.1.conv_shortcut.weight", "up_blocks.0.upsamplers.0.conv.bias",
          "up_blocks.1.attentions.1.transformer_blocks.0.norm3.weight",
          "up_blocks.1.attentions.1.proj_out.bias", "conv_norm_out.weight", "conv_out.weight"})
      expect_gradients_match(loss, *find_param(params, name), {0, 5, 31}, mode + name);
  }
}

TEST(DiffusionModels, VaeGradientsMatchFiniteDifferences) {
  Vae vae = init_vae(tiny_vae_config(), at::kCPU, at::kDouble, 4);
  const Params params = vae_params(vae);
  for (const auto& p : params) p.tensor->requires_grad_(true);
  auto latents = at::randn({1, 4, 3, 3}, at::kDouble).requires_grad_(true);
  const auto weights = at::randn({1, 3, 6, 6}, at::kDouble);
  const auto decode_loss = [&] { return (vae_decode(vae, latents) * weights).sum(); };
  expect_gradients_match(decode_loss, latents, {0, 20, 35}, "latents");
  for (const char* name :
       {"post_quant_conv.weight", "decoder.conv_in.weight",
        "decoder.mid_block.attentions.0.group_norm.weight", "decoder.mid_block.attentions.0.to_q.weight",
        "decoder.mid_block.attentions.0.to_v.bias", "decoder.mid_block.attentions.0.to_out.0.weight",
        "decoder.up_blocks.0.resnets.0.conv1.weight", "decoder.up_blocks.0.upsamplers.0.conv.weight",
        "decoder.up_blocks.1.resnets.1.norm2.bias", "decoder.conv_out.weight"})
    expect_gradients_match(decode_loss, *find_param(params, name), {0, 7, 30}, name);

  auto images = at::randn({1, 3, 6, 6}, at::kDouble).requires_grad_(true);
  const auto mean_weights = at::randn({1, 4, 3, 3}, at::kDouble);
  const auto encode_loss = [&] {
    const auto d = vae_encode(vae, images);
    return (d.mean * mean_weights).sum() + d.logvar.sum();
  };
  expect_gradients_match(encode_loss, images, {0, 50, 107}, "images");
  for (const char* name : {"encoder.down_blocks.0.downsamplers.0.conv.weight",
                           "encoder.mid_block.attentions.0.to_v.weight", "quant_conv.bias"})
    expect_gradients_match(encode_loss, *find_param(params, name), {0, 9, 40}, name);
}

TEST(DiffusionModels, FolderRoundTripIsExact) {
  const auto dir = temp_dir("diffusion_round_trip");
  const UNet unet = init_unet(tiny_unet_config(false), at::kCPU, at::kFloat, 5);
  save_unet(unet, (dir / "unet").string());
  const UNet back = load_unet((dir / "unet").string(), at::kCPU);
  EXPECT_EQ(unet_config_json(back.cfg), unet_config_json(unet.cfg));
  const auto a = named_parameters(unet), b = named_parameters(back);
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].first, b[i].first);
    EXPECT_TRUE(at::equal(a[i].second, b[i].second)) << a[i].first;
  }
  {
    at::NoGradGuard no_grad;
    const auto x = at::randn({2, 4, 4, 4}), ctx = at::randn({2, 5, 8}), t = at::tensor({1, 500});
    EXPECT_TRUE(at::equal(unet_forward(unet, x, t, ctx), unet_forward(back, x, t, ctx)));
  }
  {
    // The same file in bfloat16, as on the GPU: finite and near the float32 result.
    const UNet half = load_unet((dir / "unet").string(), at::kCPU, at::kBFloat16);
    at::NoGradGuard no_grad;
    const auto x = at::randn({1, 4, 4, 4}), ctx = at::randn({1, 5, 8}), t = at::tensor({250});
    const auto full = unet_forward(unet, x, t, ctx), low = unet_forward(half, x, t, ctx);
    EXPECT_EQ(low.scalar_type(), at::kBFloat16);
    EXPECT_LT((low.to(at::kFloat) - full).abs().max().item<double>(), 0.05 * full.abs().max().item<double>());
  }
  // SD 1.5's own config survives a save as the same model.
  const UNetConfig sd = load_unet_config(kUNetConfig);
  EXPECT_EQ(unet_config_json(parse_unet_config(unet_config_json(sd), "again")), unet_config_json(sd));

  const Vae vae = init_vae(tiny_vae_config(), at::kCPU, at::kFloat, 6);
  const std::string vdir = (dir / "vae").string();
  save_vae(vae, vdir);
  const auto check_vae = [&](const Vae& loaded) {
    const auto va = named_parameters(vae), vb = named_parameters(loaded);
    ASSERT_EQ(va.size(), vb.size());
    for (size_t i = 0; i < va.size(); ++i) EXPECT_TRUE(at::equal(va[i].second, vb[i].second)) << va[i].first;
    at::NoGradGuard no_grad;
    const auto z = at::randn({1, 4, 2, 2});
    EXPECT_TRUE(at::equal(vae_decode(vae, z), vae_decode(loaded, z)));
  };
  check_vae(load_vae(vdir, at::kCPU));

  // The mid-block attention under the names older diffusers wrote (SD 1.5's vae file).
  const std::string file = vdir + "/diffusion_pytorch_model.safetensors";
  safetensors::NamedTensors old;
  {
    const auto f = safetensors::File::open(file);
    for (const auto& info : f.tensors()) {
      std::string name = info.name;
      for (const auto& [from, to] :
           std::vector<std::pair<std::string, std::string>>{{".to_q.", ".query."},
                                                            {".to_k.", ".key."},
                                                            {".to_v.", ".value."},
                                                            {".to_out.0.", ".proj_attn."}})
        if (name.find(from) != std::string::npos) name.replace(name.find(from), from.size(), to);
      old.emplace_back(name, f.get(info.name).clone());
    }
  }
  safetensors::save(file, old);
  check_vae(load_vae(vdir, at::kCPU));
  fs::remove_all(dir);
}

TEST(DiffusionModels, ConfigAndFileErrorsNameTheirSource) {
  const auto dir = temp_dir("diffusion_errors");
  auto j = read_json_file(kUNetConfig);
  j["down_block_types"][1] = "AttnDownBlock2D";
  auto msg = error_of([&] { parse_unet_config(j, "unet/config.json"); });
  EXPECT_NE(msg.find("unet/config.json"), std::string::npos) << msg;
  EXPECT_NE(msg.find("down_block_types[1] 'AttnDownBlock2D'"), std::string::npos) << msg;
  j = read_json_file(kUNetConfig);
  j["class_embed_type"] = "timestep";
  msg = error_of([&] { parse_unet_config(j, "unet/config.json"); });
  EXPECT_EQ(msg, "unet/config.json: class_embed_type \"timestep\" is not supported (only null)");
  j = read_json_file(kUNetConfig);
  j["layers_per_block"] = "two";
  msg = error_of([&] { parse_unet_config(j, "unet/config.json"); });
  EXPECT_EQ(msg, "unet/config.json: layers_per_block must be an integer, got \"two\"");
  j = read_json_file(kUNetConfig);
  j["only_cross_attention"] = {false, false, false, false};
  EXPECT_EQ(parse_unet_config(j, "unet/config.json").attention_heads.size(), 4u);
  j["only_cross_attention"][2] = true;
  msg = error_of([&] { parse_unet_config(j, "unet/config.json"); });
  EXPECT_EQ(msg, "unet/config.json: only_cross_attention true is not supported (only false)");
  auto v = read_json_file(kVaeConfig);
  v["shift_factor"] = 0.1159;
  msg = error_of([&] { parse_vae_config(v, "vae/config.json"); });
  EXPECT_EQ(msg, "vae/config.json: shift_factor 0.1159 is not supported (only null)");

  // A tensor of the wrong shape, a missing one and a stray one, each named with the file.
  const UNet unet = init_unet(tiny_unet_config(false), at::kCPU, at::kFloat, 7);
  const std::string udir = (dir / "unet").string(), file = udir + "/diffusion_pytorch_model.safetensors";
  const auto rewrite = [&](const std::function<void(safetensors::NamedTensors&)>& edit) {
    save_unet(unet, udir);
    safetensors::NamedTensors tensors;
    {
      const auto f = safetensors::File::open(file);
      for (const auto& info : f.tensors()) tensors.emplace_back(info.name, f.get(info.name).clone());
    }
    edit(tensors);
    safetensors::save(file, tensors);
  };
  const std::string name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight";
  rewrite([&](safetensors::NamedTensors& ts) {
    for (auto& [n, t] : ts)
      if (n == name) t = at::zeros({8, 9});
  });
  msg = error_of([&] { load_unet(udir, at::kCPU); });
  EXPECT_EQ(msg, file + ": tensor '" + name + "' has shape [8, 9] but config.json implies [8, 8]");
  rewrite([&](safetensors::NamedTensors& ts) {
    for (auto it = ts.begin(); it != ts.end(); ++it)
      if (it->first == "conv_out.bias") {
        ts.erase(it);
        break;
      }
  });
  msg = error_of([&] { load_unet(udir, at::kCPU); });
  EXPECT_EQ(msg, file + ": missing tensor 'conv_out.bias'");
  rewrite([&](safetensors::NamedTensors& ts) {
    ts.emplace_back("class_embedding.linear_1.weight", at::zeros({2}));
  });
  msg = error_of([&] { load_unet(udir, at::kCPU); });
  EXPECT_EQ(msg, file + ": unexpected tensor 'class_embedding.linear_1.weight'");
  fs::remove_all(dir);
}

TEST(DiffusionModels, PiecesMatchHandComputedValues) {
  // get_timestep_embedding with flip_sin_to_cos: cos then sin of t * 10000^(-i / (half - shift)).
  const auto t = at::tensor({0.0, 3.0, 250.0}, at::kDouble);
  const auto emb = timestep_embedding(t, 6, true, 0, at::kDouble);
  const double freqs[] = {1.0, std::pow(10000.0, -1.0 / 3), std::pow(10000.0, -2.0 / 3)};
  for (int r = 0; r < 3; ++r)
    for (int i = 0; i < 3; ++i) {
      const double a = t[r].item<double>() * freqs[i];
      EXPECT_NEAR(emb[r][i].item<double>(), std::cos(a), 1e-12);
      EXPECT_NEAR(emb[r][3 + i].item<double>(), std::sin(a), 1e-12);
    }
  // Without the flip sin comes first; freq_shift 1 divides by half - 1; an odd size ends in a zero.
  const auto plain = timestep_embedding(at::tensor({2.0}, at::kDouble), 5, false, 1, at::kDouble);
  const double expected[] = {std::sin(2.0), std::sin(2.0 * 1e-4), std::cos(2.0), std::cos(2.0 * 1e-4), 0.0};
  ASSERT_EQ(plain.sizes(), (std::vector<int64_t>{1, 5}));
  for (int i = 0; i < 5; ++i) EXPECT_NEAR(plain[0][i].item<double>(), expected[i], 1e-12) << i;
  // SD 1.5's 320-wide embedding at t = 999 in float32, as diffusers computes it.
  const auto sd = timestep_embedding(at::tensor({999}), 320, true, 0, at::kFloat);
  EXPECT_EQ(sd.scalar_type(), at::kFloat);
  EXPECT_NEAR(sd[0][0].item<double>(), std::cos(999.0), 1e-4);
  EXPECT_NEAR(sd[0][160].item<double>(), std::sin(999.0), 1e-4);
  EXPECT_NEAR(sd[0][319].item<double>(), std::sin(999.0 * std::pow(10000.0, -159.0 / 160)), 1e-5);

  // GEGLU: the first half of the projection times GELU (erf) of the second.
  Linear proj;
  proj.weight = at::tensor({1.0, 0.0, 0.0, 1.0, 2.0, 0.0, 0.0, -1.0}, at::kDouble).view({4, 2});
  proj.bias = at::tensor({0.0, 0.5, 0.0, 1.0}, at::kDouble);
  const auto g = geglu(proj, at::tensor({0.3, -0.7}, at::kDouble).view({1, 2}));
  const auto gelu = [](double x) { return 0.5 * x * (1 + std::erf(x / std::sqrt(2.0))); };
  EXPECT_NEAR(g[0][0].item<double>(), 0.3 * gelu(0.6), 1e-12);
  EXPECT_NEAR(g[0][1].item<double>(), (-0.7 + 0.5) * gelu(0.7 + 1.0), 1e-12);

  // Nearest upsampling repeats each value in a 2x2 square; to a given size it picks floor(i * in / out).
  const auto x = at::tensor({1.0f, 2.0f, 3.0f, 4.0f}).view({1, 1, 2, 2});
  EXPECT_TRUE(at::equal(
      upsample_nearest(x),
      at::tensor(std::vector<float>{1, 1, 2, 2, 1, 1, 2, 2, 3, 3, 4, 4, 3, 3, 4, 4}).view({1, 1, 4, 4})));
  EXPECT_TRUE(at::equal(upsample_nearest(x, {{3, 3}}),
                        at::tensor(std::vector<float>{1, 1, 2, 1, 1, 2, 3, 3, 4}).view({1, 1, 3, 3})));
  EXPECT_TRUE(at::equal(upsample_nearest(x.to(at::kBFloat16)), upsample_nearest(x).to(at::kBFloat16)));

  // The VAE encoder's downsampling pads one row and column at the bottom and right only.
  Downsample2D d{Conv2d{at::ones({1, 1, 3, 3}), at::zeros({1}), 2, 0}};
  const auto y = downsample_forward(d, at::arange(16.0f).view({1, 1, 4, 4}));
  // Windows at rows/cols {0,1,2} and {2,3,pad}: sums of the covered values.
  EXPECT_TRUE(at::equal(y, at::tensor(std::vector<float>{45, 39, 66, 50}).view({1, 1, 2, 2}))) << y;
}

}  // namespace
}  // namespace aligner
