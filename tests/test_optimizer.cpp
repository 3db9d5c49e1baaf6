// AdamW against libtorch's own torch::optim::AdamW, fp32 master weights for bf16 parameters,
// bit-exact resume through a safetensors file, gradient clipping and learning-rate schedules.
#include "train/optimizer.h"

#include <gtest/gtest.h>
#include <torch/optim/adamw.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <map>

#include "core/error.h"
#include "io/safetensors.h"
#include "train/schedule.h"

namespace fs = std::filesystem;
using namespace aligner;

namespace {

struct Spec {
  std::string name;
  std::vector<int64_t> shape;
  bool decays;  // what the grouping rule must decide, written out independently of decays()
};

// Matrices decay; biases, norms (whatever their shape) and vectors do not.
const std::vector<Spec> kSpecs = {
    {"model.embed_tokens.weight", {10, 6}, true},
    {"model.layers.0.self_attn.q_proj.weight", {6, 6}, true},
    {"model.layers.0.self_attn.q_proj.bias", {6}, false},
    {"model.layers.0.input_layernorm.weight", {6}, false},
    {"model.layers.0.extra_norm.weight", {2, 3}, false},
    {"model.scale", {6}, false},
};

const std::vector<double> kLrs = {1e-2, 5e-3, 2e-2, 1e-2, 3e-3, 7e-3};

// Leaf parameters with the given dtype, initialised from the seed (values round-trip exactly
// through bf16, so fp32 and bf16 runs start from the same numbers).
NamedParams make_params(at::ScalarType dtype, uint64_t seed) {
  at::manual_seed(seed);
  NamedParams out;
  for (const auto& s : kSpecs)
    out.emplace_back(s.name, at::randn(s.shape).to(at::kBFloat16).to(dtype).requires_grad_());
  return out;
}

// Gradients for each step and parameter, already in bf16 precision for the same reason.
std::vector<std::vector<at::Tensor>> make_grads(int steps, uint64_t seed) {
  at::manual_seed(seed);
  std::vector<std::vector<at::Tensor>> out(steps);
  for (auto& step : out)
    for (const auto& s : kSpecs) step.push_back(at::randn(s.shape).to(at::kBFloat16).to(at::kFloat));
  return out;
}

void set_grads(const NamedParams& params, const std::vector<at::Tensor>& grads) {
  for (size_t i = 0; i < params.size(); ++i)
    params[i].second.mutable_grad() = grads[i].to(params[i].second.scalar_type());
}

NamedParams clone_params(const NamedParams& params) {
  NamedParams out;
  for (const auto& [name, p] : params) out.emplace_back(name, p.detach().clone().requires_grad_());
  return out;
}

// torch::optim::AdamW over the same (fp32) tensors, with the decay exemption as two groups.
struct Reference {
  std::vector<at::Tensor> params;
  std::unique_ptr<torch::optim::AdamW> opt;

  Reference(const NamedParams& init, const AdamWConfig& c) {
    std::vector<at::Tensor> decayed, exempt;
    for (size_t i = 0; i < init.size(); ++i) {
      params.push_back(init[i].second.detach().to(at::kFloat).clone().requires_grad_());
      (kSpecs[i].decays ? decayed : exempt).push_back(params.back());
    }
    auto options = [&](double wd) {
      return std::make_unique<torch::optim::AdamWOptions>(
          torch::optim::AdamWOptions(c.lr).betas({c.beta1, c.beta2}).eps(c.eps).weight_decay(wd));
    };
    std::vector<torch::optim::OptimizerParamGroup> groups;
    groups.emplace_back(decayed, options(c.weight_decay));
    groups.emplace_back(exempt, options(0.0));
    opt = std::make_unique<torch::optim::AdamW>(std::move(groups));
  }

  void step(const std::vector<at::Tensor>& grads, double lr) {
    for (size_t i = 0; i < params.size(); ++i) params[i].mutable_grad() = grads[i].clone();
    for (auto& group : opt->param_groups()) static_cast<torch::optim::AdamWOptions&>(group.options()).lr(lr);
    opt->step();
  }
};

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

std::map<std::string, at::Tensor> state_map(const AdamW& opt) {
  std::map<std::string, at::Tensor> out;
  for (const auto& [name, t] : opt.state()) out.emplace(name, t);
  return out;
}

const AdamWConfig kConfig{/*lr=*/1e-2, /*beta1=*/0.9, /*beta2=*/0.95, /*eps=*/1e-8, /*weight_decay=*/0.1};

TEST(AdamW, GroupsByNameAndShape) {
  for (const auto& s : kSpecs) EXPECT_EQ(decays(s.name, at::zeros(s.shape)), s.decays) << s.name;
  EXPECT_FALSE(decays("model.layers.3.post_attention_layernorm.weight", at::zeros({4, 4})));
  EXPECT_FALSE(decays("lm_head.bias", at::zeros({4, 4})));
  EXPECT_TRUE(decays("lm_head.bias_proj", at::zeros({4, 4})));
}

TEST(AdamW, MatchesTorchAdamWWithDecayExemptions) {
  const auto params = make_params(at::kFloat, 1);
  const auto grads = make_grads(5, 2);
  AdamW ours(params, kConfig);
  Reference ref(params, kConfig);
  for (int s = 0; s < 5; ++s) {
    set_grads(params, grads[s]);
    ours.step(kLrs[s]);
    ref.step(grads[s], kLrs[s]);
  }
  EXPECT_EQ(ours.step_count(), 5);
  for (size_t i = 0; i < params.size(); ++i) {
    EXPECT_EQ(params[i].second.scalar_type(), at::kFloat);
    EXPECT_LE(max_abs_diff(params[i].second, ref.params[i]), 1e-6) << params[i].first;
  }
  // fp32 parameters are updated in place, without a master copy.
  for (const auto& [name, t] : ours.state()) EXPECT_NE(name.rfind("master.", 0), 0u) << name;
}

TEST(AdamW, StepWithoutArgumentUsesConfiguredLr) {
  const auto params = make_params(at::kFloat, 3);
  const auto grads = make_grads(2, 4);
  AdamW ours(params, kConfig);
  Reference ref(params, kConfig);
  for (int s = 0; s < 2; ++s) {
    set_grads(params, grads[s]);
    ours.step();
    ref.step(grads[s], kConfig.lr);
  }
  for (size_t i = 0; i < params.size(); ++i)
    EXPECT_LE(max_abs_diff(params[i].second, ref.params[i]), 1e-6) << params[i].first;
}

TEST(AdamW, Bf16ParamsKeepFp32MasterWeights) {
  // A small lr makes most updates smaller than a bf16 ulp: only a master copy accumulates them.
  AdamWConfig cfg = kConfig;
  cfg.lr = 1e-4;
  auto params = make_params(at::kBFloat16, 5);
  params[3].second = params[3].second.detach().to(at::kFloat).requires_grad_();  // a norm kept in fp32
  const auto grads = make_grads(5, 6);
  AdamW ours(params, cfg);
  Reference ref(params, cfg);
  for (int s = 0; s < 5; ++s) {
    set_grads(params, grads[s]);
    ours.step();
    ref.step(grads[s], cfg.lr);
  }
  auto state = state_map(ours);
  double sub_ulp = 0.0;
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& [name, p] = params[i];
    SCOPED_TRACE(name);
    EXPECT_EQ(state.at("exp_avg." + name).scalar_type(), at::kFloat);
    EXPECT_EQ(state.at("exp_avg_sq." + name).scalar_type(), at::kFloat);
    if (i == 3) {
      EXPECT_EQ(state.count("master." + name), 0u);
      EXPECT_LE(max_abs_diff(p, ref.params[i]), 1e-6);
      continue;
    }
    const at::Tensor master = state.at("master." + name);
    EXPECT_EQ(p.scalar_type(), at::kBFloat16);
    EXPECT_EQ(master.scalar_type(), at::kFloat);
    // The master sees the same fp32 math on the same gradients as an fp32 run.
    EXPECT_LE(max_abs_diff(master, ref.params[i]), 1e-6);
    EXPECT_TRUE(at::equal(p, master.to(at::kBFloat16)));
    sub_ulp = std::max(sub_ulp, max_abs_diff(p, master));
  }
  EXPECT_GT(sub_ulp, 0.0) << "masters should hold updates that bf16 cannot";
}

// PPO moves the optimizer state to host memory while it generates: the state comes back to the
// GPU whole, and the steps after it are those of an optimizer that never moved.
TEST(AdamW, StateMovedToTheHostAndBackStepsTheSame) {
  if (!at::hasCUDA()) GTEST_SKIP() << "needs a GPU to move the state away from";
  const at::Device cuda(at::kCUDA);
  auto on_gpu = [&] {
    auto p = make_params(at::kBFloat16, 4);
    for (auto& [name, t] : p) t = t.detach().to(cuda).requires_grad_();
    return p;
  };
  auto moved = on_gpu(), still = on_gpu();
  AdamW a(moved, kConfig), b(still, kConfig);
  const auto grads = make_grads(4, 3);
  for (int s = 0; s < 3; ++s) {
    if (s > 0) {
      a.move_state(at::kCPU);
      for (const auto& [name, t] : a.state())
        if (name != "step") EXPECT_TRUE(t.device().is_cpu()) << name;
      a.move_state(cuda);
    }
    for (auto* p : {&moved, &still})
      for (size_t i = 0; i < p->size(); ++i)
        (*p)[i].second.mutable_grad() = grads[s][i].to(cuda, at::kBFloat16);
    a.step();
    b.step();
  }
  for (size_t i = 0; i < moved.size(); ++i) EXPECT_TRUE(at::equal(moved[i].second, still[i].second)) << i;
  const auto sa = a.state(), sb = b.state();
  for (size_t i = 0; i < sa.size(); ++i) {
    EXPECT_EQ(sa[i].second.device(), sb[i].second.device()) << sa[i].first;
    EXPECT_TRUE(at::equal(sa[i].second, sb[i].second)) << sa[i].first;
  }
}

// On a GPU the update is one kernel per tensor (kernels/adamw.cu): it must follow torch's AdamW as
// the ATen sequence does, for float32 parameters and for bf16 ones with their masters, over
// tensors longer than the kernel's grid (a bf16 gradient read as is), gradients scaled or not.
TEST(AdamW, GpuKernelFollowsTheReference) {
  if (!at::hasCUDA()) GTEST_SKIP() << "needs a GPU";
  const at::Device cuda(at::kCUDA);
  const auto grads = make_grads(5, 12);
  for (const auto dtype : {at::kFloat, at::kBFloat16}) {
    const auto init = make_params(dtype, 11);
    NamedParams on_gpu;
    for (const auto& [name, t] : init) on_gpu.emplace_back(name, t.detach().to(cuda).requires_grad_());
    AdamW ours(on_gpu, kConfig);
    Reference ref(init, kConfig);
    for (int s = 0; s < 5; ++s) {
      for (size_t i = 0; i < on_gpu.size(); ++i)
        on_gpu[i].second.mutable_grad() = grads[s][i].to(cuda, at::kBFloat16);
      ours.step(kLrs[s]);
      ref.step(grads[s], kLrs[s]);
    }
    const auto state = state_map(ours);
    for (size_t i = 0; i < on_gpu.size(); ++i) {
      const auto& [name, p] = on_gpu[i];
      const at::Tensor w = dtype == at::kFloat ? p : state.at("master." + name);
      EXPECT_LE(max_abs_diff(w.cpu(), ref.params[i]), 1e-6) << name;
      if (dtype != at::kFloat) {
        EXPECT_TRUE(at::equal(p, w.to(dtype))) << name;
      }
    }
  }
  // 3M elements, past the grid, of an odd count (one a thread) and of one in fours (four a thread),
  // with the gradients scaled by a clipping coefficient (a power of two: exact on both sides): the
  // GPU against the CPU's ATen sequence.
  at::manual_seed(13);
  const std::vector<int64_t> sizes = {3'000'017, 3'000'016};
  NamedParams big_cpu, big_gpu;
  for (size_t i = 0; i < sizes.size(); ++i) {
    const std::string name = i == 0 ? "w" : "u";
    big_cpu.emplace_back(name, at::randn({sizes[i]}).to(at::kBFloat16).requires_grad_());
    big_gpu.emplace_back(name, big_cpu.back().second.detach().to(cuda).requires_grad_());
  }
  AdamW cpu_opt(big_cpu, kConfig, {true, true}), gpu_opt(big_gpu, kConfig, {true, true});
  for (int s = 0; s < 3; ++s) {
    for (size_t i = 0; i < sizes.size(); ++i) {
      const auto g = at::randn({sizes[i]}).to(at::kBFloat16);
      big_cpu[i].second.mutable_grad() = g;
      big_gpu[i].second.mutable_grad() = g.to(cuda);
    }
    cpu_opt.step(kLrs[s], s == 1 ? 0.25 : 1.0);
    gpu_opt.step(kLrs[s], s == 1 ? 0.25 : 1.0);
  }
  const auto cpu_state = state_map(cpu_opt), gpu_state = state_map(gpu_opt);
  for (size_t i = 0; i < sizes.size(); ++i) {
    const std::string name = big_cpu[i].first;
    // A few float32 roundings apart (the kernel's fused multiply-adds), relative to the values.
    for (const std::string key : {"master.", "exp_avg.", "exp_avg_sq."})
      EXPECT_TRUE(at::allclose(gpu_state.at(key + name).cpu(), cpu_state.at(key + name), 1e-6, 1e-7))
          << key << name;
    // bf16 roundings of masters a rounding apart may differ by one bf16 step, rarely.
    const auto differ = (big_gpu[i].second.cpu() != big_cpu[i].second).sum().item<int64_t>();
    EXPECT_LE(differ, sizes[i] / 1000) << name << ": " << differ;
  }
}

TEST(AdamW, SaveLoadThroughSafetensorsResumesBitExactly) {
  auto mixed = [](uint64_t seed) {
    auto p = make_params(at::kBFloat16, seed);
    p[2].second = p[2].second.detach().to(at::kFloat).requires_grad_();
    p[3].second = p[3].second.detach().to(at::kFloat).requires_grad_();
    return p;
  };
  const auto grads = make_grads(6, 8);
  AdamWConfig cfg = kConfig;
  cfg.lr = 1e-3;

  const auto straight = mixed(7);
  AdamW a(straight, cfg);
  for (int s = 0; s < 6; ++s) {
    set_grads(straight, grads[s]);
    a.step(kLrs[s] / 10);
  }

  const auto first = mixed(7);
  AdamW b(first, cfg);
  for (int s = 0; s < 3; ++s) {
    set_grads(first, grads[s]);
    b.step(kLrs[s] / 10);
  }
  const fs::path path =
      fs::path(testing::TempDir()) / ("aligner_optimizer_" + std::to_string(getpid()) + ".safetensors");
  safetensors::save(path.string(), b.state());

  // A fresh process: model weights from the checkpoint, optimizer state from the file.
  const auto resumed = clone_params(first);
  AdamW c(resumed, cfg);
  const auto file = safetensors::File::open(path.string());
  NamedParams loaded;
  for (const auto& info : file.tensors()) loaded.emplace_back(info.name, file.get(info.name));
  c.load_state(loaded);
  fs::remove(path);
  EXPECT_EQ(c.step_count(), 3);
  for (int s = 3; s < 6; ++s) {
    set_grads(resumed, grads[s]);
    c.step(kLrs[s] / 10);
  }

  EXPECT_EQ(c.step_count(), 6);
  for (size_t i = 0; i < straight.size(); ++i)
    EXPECT_TRUE(at::equal(resumed[i].second, straight[i].second)) << straight[i].first;
  auto expected = state_map(a), actual = state_map(c);
  ASSERT_EQ(actual.size(), expected.size());
  for (const auto& [name, t] : expected) EXPECT_TRUE(at::equal(actual.at(name), t)) << name;
}

TEST(AdamW, LoadRejectsMismatchedStateAndChangesNothing) {
  const auto params = make_params(at::kBFloat16, 9);
  AdamW opt(params, kConfig);
  set_grads(params, make_grads(1, 10)[0]);
  opt.step();
  const auto before = opt.state();
  std::map<std::string, at::Tensor> snapshot;
  for (const auto& [name, t] : before) snapshot.emplace(name, t.clone());

  auto expect_error = [&](const NamedParams& state, const std::string& part) {
    try {
      opt.load_state(state);
      ADD_FAILURE() << "no error; expected one mentioning " << part;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
    }
  };
  // Zeroed state of the right layout, so that a partial copy before the error would show.
  NamedParams good;
  for (const auto& [name, t] : before) good.emplace_back(name, at::zeros_like(t));
  const std::string master = "master." + kSpecs[0].name;

  NamedParams missing;
  for (const auto& e : good)
    if (e.first != master) missing.push_back(e);
  expect_error(missing, master + "' is missing");

  NamedParams extra = good;
  extra.emplace_back("exp_avg.model.unknown.weight", at::zeros({2}));
  expect_error(extra, "exp_avg.model.unknown.weight");

  NamedParams reshaped = good;
  for (auto& [name, t] : reshaped)
    if (name == master) t = at::zeros({60});
  expect_error(reshaped, "expected Float [10, 6]");

  NamedParams retyped = good;
  for (auto& [name, t] : retyped)
    if (name == master) t = t.to(at::kBFloat16);
  expect_error(retyped, "BFloat16 [10, 6]");

  EXPECT_EQ(opt.step_count(), 1);
  for (const auto& [name, t] : opt.state()) EXPECT_TRUE(at::equal(t, snapshot.at(name))) << name;
}

TEST(AdamW, RejectsBadInput) {
  auto params = make_params(at::kFloat, 11);
  AdamW opt(params, kConfig);
  set_grads(params, make_grads(1, 12)[0]);
  params[4].second.mutable_grad() = at::Tensor();
  try {
    opt.step();
    ADD_FAILURE() << "step without a gradient did not throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(kSpecs[4].name), std::string::npos) << e.what();
  }
  EXPECT_EQ(opt.step_count(), 0);

  opt.zero_grad();
  for (const auto& [name, p] : params) EXPECT_FALSE(p.grad().defined()) << name;

  AdamWConfig bad = kConfig;
  bad.beta2 = 1.0;
  EXPECT_THROW(AdamW(params, bad), Error);
  NamedParams tied = {{"model.embed_tokens.weight", params[0].second}, {"lm_head.weight", params[0].second}};
  EXPECT_THROW(AdamW(tied, kConfig), Error);
  NamedParams twice = {{"w", params[0].second}, {"w", params[1].second}};
  EXPECT_THROW(AdamW(twice, kConfig), Error);
}

// The global norm over float32 and bf16 gradients against a direct float64 computation, summed
// over "ranks" through sum_over_ranks; and clipping's coefficient, which AdamW::step applies.
TEST(ClipGradNorm, NormMatchesDirectComputationAndCoefficientClips) {
  at::manual_seed(13);
  std::vector<at::Tensor> grads = {(at::randn({3, 4}) * 3), (at::randn({5}) * 3),
                                   (at::randn({7, 3}) * 3).to(at::kBFloat16)};
  double sum_sq = 0.0;
  for (const auto& g : grads) sum_sq += g.to(at::kDouble).pow(2).sum().item<double>();
  const auto alone = [](double x) { return x; };
  EXPECT_NEAR(grad_norm(grads, alone), std::sqrt(sum_sq), 1e-9 * std::sqrt(sum_sq));
  // Another rank holding the same squares: the total counts both.
  EXPECT_NEAR(grad_norm(grads, [](double x) { return 2 * x; }), std::sqrt(2 * sum_sq),
              1e-9 * std::sqrt(sum_sq));
  // Nothing to add up on this rank: its sum is still asked for (a collective every rank joins).
  bool asked = false;
  EXPECT_EQ(grad_norm({}, [&](double x) { return asked = true, x; }), 0.0);
  EXPECT_TRUE(asked);

  // 1 below the limit and for a NaN norm, 0 for an infinite one.
  EXPECT_EQ(clip_coefficient(3.0, 4.0), 1.0);
  EXPECT_DOUBLE_EQ(clip_coefficient(8.0, 4.0), 4.0 / (8.0 + 1e-6));
  EXPECT_EQ(clip_coefficient(NAN, 4.0), 1.0);
  EXPECT_EQ(clip_coefficient(INFINITY, 4.0), 0.0);
  EXPECT_THROW(clip_coefficient(1.0, 0.0), Error);
}

// AdamW's grad_scale is the clipping multiply done by the update: on the CPU the same as scaling
// the bf16 gradients first (as torch's clip_grad_norm_ does), bit for bit; on a GPU, inside the kernel, the
// same as scaling them in float32 first.
TEST(AdamW, GradScaleEqualsScalingTheGradients) {
  const auto init = make_params(at::kBFloat16, 21);
  const auto grads = make_grads(3, 22);
  std::vector<at::Device> devices = {at::kCPU};
  if (at::hasCUDA()) devices.emplace_back(at::kCUDA);
  for (const auto device : devices) {
    const bool cuda = device.is_cuda();
    NamedParams a, b;
    for (const auto& [name, t] : init) {
      a.emplace_back(name, t.detach().to(device).requires_grad_());
      b.emplace_back(name, t.detach().to(device).requires_grad_());
    }
    AdamW scaled_first(a, kConfig), scaled_inside(b, kConfig);
    for (int s = 0; s < 3; ++s) {
      std::vector<at::Tensor> first;
      for (size_t i = 0; i < a.size(); ++i) {
        const auto g = grads[s][i].to(device, at::kBFloat16);
        first.push_back(a[i].second.mutable_grad() = cuda ? g.to(at::kFloat) : g.clone());
        b[i].second.mutable_grad() = g;
      }
      at::_foreach_mul_(first, 0.3);
      scaled_first.step(kLrs[s]);
      scaled_inside.step(kLrs[s], 0.3);
    }
    const auto sa = state_map(scaled_first), sb = state_map(scaled_inside);
    for (size_t i = 0; i < a.size(); ++i) {
      const std::string& name = a[i].first;
      EXPECT_TRUE(at::equal(a[i].second, b[i].second)) << device << " " << name;
      EXPECT_TRUE(at::equal(sa.at("exp_avg." + name), sb.at("exp_avg." + name))) << device << " " << name;
    }
  }
}

TEST(Schedule, ValuesAtKeySteps) {
  Schedule s{ScheduleKind::kConstant, /*lr=*/1e-3, /*min_lr=*/1e-4, /*warmup_steps=*/10, /*max_steps=*/110};
  EXPECT_DOUBLE_EQ(schedule_lr(s, 0), 0.0);
  EXPECT_DOUBLE_EQ(schedule_lr(s, 5), 5e-4);
  EXPECT_DOUBLE_EQ(schedule_lr(s, 10), 1e-3);
  EXPECT_DOUBLE_EQ(schedule_lr(s, 1000), 1e-3);

  s.kind = ScheduleKind::kLinear;
  EXPECT_DOUBLE_EQ(schedule_lr(s, 0), 0.0);
  EXPECT_DOUBLE_EQ(schedule_lr(s, 9), 9e-4);
  EXPECT_DOUBLE_EQ(schedule_lr(s, 10), 1e-3);
  EXPECT_DOUBLE_EQ(schedule_lr(s, 60), 5.5e-4);
  EXPECT_DOUBLE_EQ(schedule_lr(s, 85), 3.25e-4);
  EXPECT_DOUBLE_EQ(schedule_lr(s, 110), 1e-4);
  EXPECT_DOUBLE_EQ(schedule_lr(s, 500), 1e-4);

  s.kind = ScheduleKind::kCosine;
  EXPECT_DOUBLE_EQ(schedule_lr(s, 0), 0.0);
  EXPECT_DOUBLE_EQ(schedule_lr(s, 10), 1e-3);
  EXPECT_NEAR(schedule_lr(s, 35), 1e-4 + 9e-4 * 0.5 * (1 + std::sqrt(0.5)), 1e-15);
  EXPECT_NEAR(schedule_lr(s, 60), 5.5e-4, 1e-15);
  EXPECT_NEAR(schedule_lr(s, 110), 1e-4, 1e-15);
  // transformers' cosine would rise again past max_steps; ours stays at the floor.
  EXPECT_NEAR(schedule_lr(s, 160), 1e-4, 1e-15);

  s.warmup_steps = 0;
  EXPECT_DOUBLE_EQ(schedule_lr(s, 0), 1e-3);
  s.min_lr = 0.0;
  EXPECT_NEAR(schedule_lr(s, 110), 0.0, 1e-15);
}

TEST(Schedule, ParsesNamesAndRejectsBadConfigs) {
  EXPECT_EQ(parse_schedule_kind("constant"), ScheduleKind::kConstant);
  EXPECT_EQ(parse_schedule_kind("linear"), ScheduleKind::kLinear);
  EXPECT_EQ(parse_schedule_kind("cosine"), ScheduleKind::kCosine);
  for (auto kind : {ScheduleKind::kConstant, ScheduleKind::kLinear, ScheduleKind::kCosine})
    EXPECT_EQ(parse_schedule_kind(schedule_kind_name(kind)), kind);
  try {
    parse_schedule_kind("cosin");
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'cosin'"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("constant, linear, cosine"), std::string::npos) << e.what();
  }

  const Schedule ok{ScheduleKind::kCosine, 1e-3, 1e-4, 10, 100};
  EXPECT_NO_THROW(check_schedule(ok));
  Schedule s = ok;
  s.min_lr = 2e-3;
  EXPECT_THROW(check_schedule(s), Error);
  s = ok;
  s.max_steps = 5;
  EXPECT_THROW(check_schedule(s), Error);
  s = ok;
  s.warmup_steps = -1;
  EXPECT_THROW(schedule_lr(s, 0), Error);
  EXPECT_THROW(schedule_lr(ok, -1), Error);
}

}  // namespace
