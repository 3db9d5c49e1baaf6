// LoRA on the UNet's attention projections: adapters start with no effect, change the output once
// trained, come off for the frozen base, train alone, and round-trip through diffusers' LoRA file.
#include <gtest/gtest.h>

#include <filesystem>

#include "diffusion/unet_lora.h"
#include "io/safetensors.h"
#include "test_util.h"

namespace aligner {
namespace {

namespace fs = std::filesystem;
using test::error_of;
using test::temp_dir;

UNet tiny_unet() {
  const nlohmann::json j = {{"block_out_channels", {8, 16}},
                            {"down_block_types", {"CrossAttnDownBlock2D", "DownBlock2D"}},
                            {"up_block_types", {"UpBlock2D", "CrossAttnUpBlock2D"}},
                            {"layers_per_block", 1},
                            {"norm_num_groups", 4},
                            {"cross_attention_dim", 8},
                            {"attention_head_dim", 2}};
  return init_unet(parse_unet_config(j, "tiny"), at::kCPU, at::kFloat, 3);
}

struct Inputs {
  at::Tensor sample, t, context;
};

Inputs inputs() {
  at::manual_seed(1);
  return {at::randn({2, 4, 8, 8}), at::tensor({10, 500}, at::kLong), at::randn({2, 5, 8})};
}

at::Tensor run(const UNet& u, const Inputs& in) {
  return unet_forward(u, in.sample, in.t, in.context);
}

LoraConfig config(std::vector<std::string> targets = kUNetLoraTargets) {
  LoraConfig c;
  c.rank = 4;
  c.alpha = 8;
  c.targets = std::move(targets);
  return c;
}

// B drawn at random, as training would move it.
void perturb(UNet& u) {
  at::NoGradGuard g;
  for (auto& [name, l] : unet_attention_linears(u))
    if (l->lora.b.defined()) l->lora.b.normal_(0, 0.5);
}

TEST(UNetLora, AdaptersTargetTheAttentionProjections) {
  UNet u = tiny_unet();
  // One CrossAttnDownBlock2D and one CrossAttnUpBlock2D with a transformer block per resnet (1 down,
  // 2 up) and the mid block's: 4 transformer blocks of two attentions of four projections.
  EXPECT_EQ(unet_attention_linears(u).size(), 32u);
  EXPECT_EQ(unet_attention_linears(u)[0].first, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q");
  add_unet_adapters(u, config({"to_q", "to_out.0"}), 7);
  const auto params = unet_adapter_parameters(u);
  ASSERT_EQ(params.size(), 32u);  // 16 projections, A and B each
  EXPECT_EQ(params[2].first, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_A.weight");
  EXPECT_EQ(params[0].second.sizes(), (at::IntArrayRef{4, 8}));
  EXPECT_NE(error_of([&] {
              add_unet_adapters(u, config({"q_proj"}), 7);
            }).find("unknown LoRA target module 'q_proj'"),
            std::string::npos);
}

TEST(UNetLora, AdaptersStartAtTheBaseAndComeOff) {
  at::NoGradGuard g;
  const auto in = inputs();
  UNet u = tiny_unet();
  const auto base = run(u, in);
  add_unet_adapters(u, config(), 7);
  EXPECT_TRUE(at::allclose(run(u, in), base, 1e-6, 1e-6));  // B = 0
  perturb(u);
  EXPECT_GT((run(u, in) - base).abs().max().item<double>(), 1e-3);
  EXPECT_TRUE(run(unet_without_adapters(u), in).equal(base));
}

TEST(UNetLora, OnlyTheAdaptersTrain) {
  UNet u = tiny_unet();
  add_unet_adapters(u, config(), 7);
  perturb(u);
  for (auto& [name, t] : named_parameters(u)) t.requires_grad_(false);
  for (auto& [name, t] : unet_adapter_parameters(u)) t.requires_grad_(true);
  run(u, inputs()).pow(2).sum().backward();
  for (const auto& [name, t] : unet_adapter_parameters(u)) {
    ASSERT_TRUE(t.grad().defined()) << name;
    EXPECT_GT(t.grad().abs().sum().item<double>(), 0) << name;
  }
}

TEST(UNetLora, DiffusersFileRoundTrips) {
  at::NoGradGuard g;
  const auto in = inputs();
  UNet u = tiny_unet();
  add_unet_adapters(u, config(), 7);
  perturb(u);
  const auto dir = temp_dir("unet_lora");
  save_unet_adapter(u, dir.string());
  const auto file = safetensors::File::open((dir / "pytorch_lora_weights.safetensors").string());
  EXPECT_TRUE(file.contains("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora.down.weight"));
  EXPECT_TRUE(file.contains("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora.up.weight"));
  EXPECT_EQ(file.tensors().size(), 64u);

  UNet back = tiny_unet();
  load_unet_adapter(back, dir.string());
  EXPECT_TRUE(at::allclose(run(back, in), run(u, in), 1e-5, 1e-6));  // the scale folded into up

  // PEFT's names with an alpha per module load too; a module the UNet lacks and a misfit shape do not.
  const auto linears = unet_attention_linears(u);
  const auto& [name, l] = linears[0];
  const auto write = [&](const safetensors::NamedTensors& t) {
    safetensors::save((dir / "pytorch_lora_weights.safetensors").string(), t);
  };
  write({{name + ".lora_A.weight", l->lora.a},
         {name + ".lora_B.weight", l->lora.b},
         {name + ".alpha", at::tensor(8.0)}});
  UNet peft = tiny_unet();
  load_unet_adapter(peft, dir.string());
  EXPECT_DOUBLE_EQ(unet_attention_linears(peft)[0].second->lora.scale, 2.0);
  // Or alpha and r in the header, as newer diffusers write them.
  safetensors::save(
      (dir / "pytorch_lora_weights.safetensors").string(),
      {{"unet." + name + ".lora_A.weight", l->lora.a}, {"unet." + name + ".lora_B.weight", l->lora.b}},
      {{"format", "pt"}, {"lora_adapter_metadata", R"({"unet.r": 4, "unet.lora_alpha": 2})"}});
  UNet meta = tiny_unet();
  load_unet_adapter(meta, dir.string());
  EXPECT_DOUBLE_EQ(unet_attention_linears(meta)[0].second->lora.scale, 0.5);
  safetensors::save((dir / "pytorch_lora_weights.safetensors").string(),
                    {{name + ".lora_A.weight", l->lora.a}, {name + ".lora_B.weight", l->lora.b}},
                    {{"lora_adapter_metadata", R"({"r": 4, "lora_alpha": 4, "rank_pattern": {"to_q": 8}})"}});
  EXPECT_NE(error_of([&] { load_unet_adapter(meta, dir.string()); }).find("rank_pattern"), std::string::npos);
  write({{name + ".lora_A.weight", l->lora.a.to(at::kInt)}, {name + ".lora_B.weight", l->lora.b}});
  EXPECT_NE(error_of([&] { load_unet_adapter(meta, dir.string()); }).find("not a floating-point type"),
            std::string::npos);
  write({{"unet.nowhere.to_q.lora.down.weight", l->lora.a}, {"unet.nowhere.to_q.lora.up.weight", l->lora.b}});
  EXPECT_NE(
      error_of([&] { load_unet_adapter(peft, dir.string()); }).find("no attention projection 'nowhere.to_q'"),
      std::string::npos);
  write({{name + ".lora_A.weight", l->lora.a}, {name + ".lora_B.weight", l->lora.b.t().contiguous()}});
  EXPECT_NE(error_of([&] { load_unet_adapter(peft, dir.string()); }).find("do not fit"), std::string::npos);
  fs::remove_all(dir);
}

}  // namespace
}  // namespace aligner
