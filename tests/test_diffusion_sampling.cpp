// DDIM as diffusers computes it (timesteps, alphas, one step, the forward process), the truncated
// sampler's gradient, annealed guidance weights, PNG files and the synthetic shapes data.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "core/json.h"
#include "diffusion/ddim.h"
#include "diffusion/shapes_data.h"
#include "io/png.h"
#include "test_util.h"

namespace aligner {
namespace {

using test::error_of;
using test::from_hex;

// runwayml/stable-diffusion-v1-5's scheduler/scheduler_config.json.
const char* kSd15Config = R"({
  "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
  "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
  "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1, "trained_betas": null,
  "clip_sample": false})";

DdimScheduler sd15(const std::string& overrides = "{}") {
  auto json = nlohmann::json::parse(kSd15Config);
  json.update(nlohmann::json::parse(overrides));
  return make_ddim_scheduler(parse_ddim_config(json, "scheduler_config.json"));
}

std::vector<int64_t> arithmetic(int64_t first, int64_t step, int64_t n) {
  std::vector<int64_t> v;
  for (int64_t i = 0; i < n; ++i) v.push_back(first + i * step);
  return v;
}

// ---- the noise schedule ----

TEST(DiffusionSamplingSchedule, ScaledLinearAlphasCumprod) {
  const auto s = sd15();
  ASSERT_EQ(s.alphas_cumprod.numel(), 1000);
  EXPECT_EQ(s.alphas_cumprod.scalar_type(), at::kFloat);
  // betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2, the product of 1 - beta, in float64 here.
  const double b0 = std::sqrt(0.00085), b1 = std::sqrt(0.012);
  double prod = 1;
  for (int i = 0; i < 1000; ++i) {
    const double beta = std::pow(b0 + (b1 - b0) * i / 999.0, 2);
    prod *= 1 - beta;
    EXPECT_NEAR(s.alphas_cumprod[i].item<double>(), prod, 1e-4 * prod) << i;
  }
  EXPECT_NEAR(s.alphas_cumprod[0].item<double>(), 0.99915, 1e-7);
  EXPECT_NEAR(s.alphas_cumprod[999].item<double>(), 0.0046601, 2e-7);
  // set_alpha_to_one false: past the end is alphas_cumprod[0].
  EXPECT_DOUBLE_EQ(alpha_prod(s, -1), s.alphas_cumprod[0].item<double>());
  EXPECT_DOUBLE_EQ(alpha_prod(sd15(R"({"set_alpha_to_one": true})"), -1), 1.0);
}

TEST(DiffusionSamplingSchedule, LinearCosineAndZeroSnr) {
  const auto linear = sd15(R"({"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02})");
  double prod = 1;
  for (int i = 0; i < 1000; ++i) {
    prod *= 1 - (0.0001 + (0.02 - 0.0001) * i / 999.0);
    EXPECT_NEAR(linear.alphas_cumprod[i].item<double>(), prod, 1e-4 * prod) << i;
  }
  // squaredcos_cap_v2: alphas_cumprod[t] = f(t + 1) / f(0), f(t) = cos((t / T + 0.008) / 1.008 pi / 2)^2,
  // while no beta reaches its cap of 0.999 (the cap first acts at the very last step).
  const auto cosine = sd15(R"({"beta_schedule": "squaredcos_cap_v2"})");
  const auto f = [](double t) { return std::pow(std::cos((t / 1000 + 0.008) / 1.008 * M_PI / 2), 2); };
  for (int t : {0, 1, 100, 500, 900, 990})
    EXPECT_NEAR(cosine.alphas_cumprod[t].item<double>(), f(t + 1) / f(0), 1e-5) << t;

  const auto zsnr = sd15(R"({"rescale_betas_zero_snr": true})");
  EXPECT_EQ(zsnr.alphas_cumprod[999].item<double>(), 0.0);
  EXPECT_NEAR(zsnr.alphas_cumprod[0].item<double>(), 0.99915, 1e-6);
  // sqrt(alphas_cumprod) is an affine map of the original's: check the middle against it.
  const auto orig = sd15().alphas_cumprod.to(at::kDouble).sqrt();
  const double a0 = orig[0].item<double>(), aT = orig[999].item<double>();
  const double mid = (orig[500].item<double>() - aT) * a0 / (a0 - aT);
  EXPECT_NEAR(zsnr.alphas_cumprod[500].item<double>(), mid * mid, 1e-5);
}

TEST(DiffusionSamplingSchedule, TimestepsAsDiffusers) {
  const auto leading = sd15();
  EXPECT_EQ(ddim_timesteps(leading, 50), arithmetic(981, -20, 50));
  EXPECT_EQ(ddim_timesteps(leading, 10), arithmetic(901, -100, 10));
  EXPECT_EQ(ddim_timesteps(sd15(R"({"steps_offset": 0})"), 50), arithmetic(980, -20, 50));
  EXPECT_EQ(ddim_timesteps(leading, 1), std::vector<int64_t>{1});

  const auto trailing = sd15(R"({"timestep_spacing": "trailing"})");
  EXPECT_EQ(ddim_timesteps(trailing, 50), arithmetic(999, -20, 50));
  EXPECT_EQ(ddim_timesteps(trailing, 10), arithmetic(999, -100, 10));
  EXPECT_EQ(ddim_timesteps(trailing, 3), (std::vector<int64_t>{999, 666, 332}));
  EXPECT_EQ(ddim_timesteps(trailing, 7), (std::vector<int64_t>{999, 856, 713, 570, 428, 285, 142}));
  // numpy's arange yields 62 elements here, the last -1; the 61 real ones are kept.
  const auto t61 = ddim_timesteps(trailing, 61);
  EXPECT_EQ(t61.size(), 61u);
  EXPECT_EQ(t61.back(), 15);

  const auto linspace = sd15(R"({"timestep_spacing": "linspace"})");
  // np.linspace(0, 999, 50).round()[::-1], halves to even.
  EXPECT_EQ(ddim_timesteps(linspace, 50),
            (std::vector<int64_t>{999, 979, 958, 938, 917, 897, 877, 856, 836, 816, 795, 775, 754,
                                  734, 714, 693, 673, 652, 632, 612, 591, 571, 550, 530, 510, 489,
                                  469, 449, 428, 408, 387, 367, 347, 326, 306, 285, 265, 245, 224,
                                  204, 183, 163, 143, 122, 102, 82,  61,  41,  20,  0}));
  EXPECT_EQ(ddim_timesteps(linspace, 10), arithmetic(999, -111, 10));
  EXPECT_EQ(ddim_timesteps(linspace, 3), (std::vector<int64_t>{999, 500, 0}));  // 499.5 -> 500
  EXPECT_EQ(ddim_timesteps(linspace, 1), std::vector<int64_t>{0});

  EXPECT_EQ(ddim_prev_timestep(leading, 981, 50), 961);
  EXPECT_EQ(ddim_prev_timestep(leading, 1, 50), -19);
  EXPECT_EQ(ddim_prev_timestep(trailing, 666, 3), 333);  // as diffusers' step, not the next timestep 332

  EXPECT_NE(error_of([&] { ddim_timesteps(leading, 0); }).find("0 inference steps"), std::string::npos);
  EXPECT_NE(error_of([&] { ddim_timesteps(leading, 1001); }).find("1001"), std::string::npos);
  // 1000 leading steps with steps_offset 1 reach timestep 1000.
  EXPECT_NE(error_of([&] { ddim_timesteps(leading, 1000); }).find("past num_train_timesteps"),
            std::string::npos);
}

// ---- one step ----

TEST(DiffusionSamplingStep, MatchesHandComputation) {
  const auto x = at::tensor({0.3, -1.2, 2.0, 0.7}, at::kDouble);
  const auto out = at::tensor({0.5, 0.1, -0.9, 1.5}, at::kDouble);
  const auto noise = at::tensor({-0.4, 1.1, 0.2, -2.0}, at::kDouble);
  for (const char* type : {"epsilon", "v_prediction", "sample"}) {
    const auto s = sd15(fmt::format(R"({{"prediction_type": "{}"}})", type));
    for (auto [t, prev] : {std::pair<int64_t, int64_t>{981, 961}, {1, -19}}) {
      const double a = s.alphas_cumprod[t].item<double>();
      const double ap =
          prev >= 0 ? s.alphas_cumprod[prev].item<double>() : s.alphas_cumprod[0].item<double>();
      for (double eta : {0.0, 1.0}) {
        for (int64_t i = 0; i < 4; ++i) {
          const double xi = x[i].item<double>(), o = out[i].item<double>(), n = noise[i].item<double>();
          double x0, eps;
          if (std::string(type) == "epsilon") {
            x0 = (xi - std::sqrt(1 - a) * o) / std::sqrt(a), eps = o;
          } else if (std::string(type) == "sample") {
            x0 = o, eps = (xi - std::sqrt(a) * o) / std::sqrt(1 - a);
          } else {
            x0 = std::sqrt(a) * xi - std::sqrt(1 - a) * o, eps = std::sqrt(a) * o + std::sqrt(1 - a) * xi;
          }
          const double var = (1 - ap) / (1 - a) * (1 - a / ap), sd = eta * std::sqrt(var);
          const double expect = std::sqrt(ap) * x0 + std::sqrt(1 - ap - sd * sd) * eps + sd * n;
          const auto r = ddim_step(s, out, t, prev, x, eta, noise);
          EXPECT_NEAR(r.prev_sample[i].item<double>(), expect, 1e-12) << type << " t " << t << " eta " << eta;
          EXPECT_NEAR(r.pred_original_sample[i].item<double>(), x0, 1e-12);
        }
      }
    }
  }
  // clip_sample clamps x_0 to the range but keeps the unclipped epsilon for the direction.
  const auto clipped = sd15(R"({"clip_sample": true, "clip_sample_range": 0.5})");
  const auto r = ddim_step(clipped, out, 981, 961, x * 10, 0.0);
  EXPECT_LE(r.pred_original_sample.abs().max().item<double>(), 0.5);
  const double ap = clipped.alphas_cumprod[961].item<double>();
  const auto expect = std::sqrt(ap) * r.pred_original_sample + std::sqrt(1 - ap) * out;
  EXPECT_TRUE(at::allclose(r.prev_sample, expect, 1e-12, 1e-12));

  EXPECT_NE(error_of([&] { ddim_step(sd15(), out, 981, 961, x, 0.5); }).find("needs noise"),
            std::string::npos);
  EXPECT_NE(error_of([&] { ddim_step(sd15(), out, 1000, 980, x, 0.0); }).find("timestep 1000"),
            std::string::npos);
}

TEST(DiffusionSamplingStep, ForwardProcessInverts) {
  const auto s = sd15();
  auto gen = at::detail::createCPUGenerator(3);
  const auto x0 = at::randn({3, 2, 4}, gen, at::kDouble);
  const auto noise = at::randn({3, 2, 4}, gen, at::kDouble);
  const auto ts = at::tensor({5L, 500L, 981L});
  const auto xt = add_noise(s, x0, noise, ts);
  const auto v = velocity(s, x0, noise, ts);
  for (int64_t b = 0; b < 3; ++b) {
    const int64_t t = ts[b].item<int64_t>();
    const double a = s.alphas_cumprod[t].item<double>();
    EXPECT_TRUE(at::allclose(xt[b], std::sqrt(a) * x0[b] + std::sqrt(1 - a) * noise[b], 1e-12, 1e-12));
    EXPECT_TRUE(at::allclose(v[b], std::sqrt(a) * noise[b] - std::sqrt(1 - a) * x0[b], 1e-12, 1e-12));
    // Each prediction type, given its true target, predicts x_0 back.
    const std::pair<const char*, at::Tensor> targets[] = {
        {"epsilon", noise[b]}, {"v_prediction", v[b]}, {"sample", x0[b]}};
    for (const auto& [type, target] : targets) {
      const auto st = sd15(fmt::format(R"({{"prediction_type": "{}"}})", type));
      const auto r = ddim_step(st, target, t, t - 20, xt[b], 0.0);
      EXPECT_TRUE(at::allclose(r.pred_original_sample, x0[b], 1e-9, 1e-9)) << type;
    }
  }
  EXPECT_NE(error_of([&] {
              add_noise(s, x0, noise, at::tensor({0L, 1L, 1000L}));
            }).find("outside [0, 1000)"),
            std::string::npos);
}

TEST(DiffusionSamplingStep, GuidanceCombinations) {
  const auto u = at::tensor({1.0, 2.0}), c = at::tensor({3.0, -2.0});
  EXPECT_TRUE(at::allclose(cfg_combine(u, c, 7.5), at::tensor({16.0, -28.0})));
  EXPECT_TRUE(at::allclose(cfg_combine(u, c, 1.0), c));
  EXPECT_TRUE(at::allclose(aig_combine(u, c, 0.25), at::tensor({1.5, 1.0})));
}

// ---- the truncated sampler ----

// eps = theta x makes each DDIM step (eta 0) x <- c_i(theta) x with
// c_i = sqrt(a_prev / a_t) (1 - sqrt(1 - a_t) theta) + sqrt(1 - a_prev) theta, so the final latents are
// prod c_i x_T, and the gradient through the last K steps only is
// (prod of the first steps' c) d/dtheta (prod of the last K) x_T.
TEST(DiffusionSamplingSampler, GradientReachesExactlyTheLastKSteps) {
  const auto s = sd15();
  const int64_t steps = 10;
  const double theta0 = 0.3;
  const auto x_T = at::tensor({0.8, -1.3}, at::kDouble);
  const auto ts = ddim_timesteps(s, steps);
  std::vector<double> c(steps), dc(steps);
  for (int64_t i = 0; i < steps; ++i) {
    const double a = alpha_prod(s, ts[i]), ap = alpha_prod(s, ts[i] - 100);
    c[i] = std::sqrt(ap / a) * (1 - std::sqrt(1 - a) * theta0) + std::sqrt(1 - ap) * theta0;
    dc[i] = -std::sqrt(ap / a) * std::sqrt(1 - a) + std::sqrt(1 - ap);
  }
  const auto run = [&](int64_t k, double theta_value, at::Tensor* grad) {
    auto theta = at::tensor(theta_value, at::kDouble).requires_grad_(true);
    SampleOptions o;
    o.steps = steps;
    o.grad_last_k = k;
    auto r = ddim_sample(
        s, o, [&](const at::Tensor& x, int64_t, int64_t) { return theta * x; }, x_T);
    if (grad) {
      if (k > 0) r.latents.sum().backward();
      *grad = theta.grad();
    }
    return r;
  };
  at::Tensor full_latents;
  for (int64_t k : {0, 1, 3, 10}) {
    at::Tensor grad;
    const auto r = run(k, theta0, &grad);
    double prod = 1, dprod = 0;  // d/dtheta of the product over the last k steps, by the product rule
    for (int64_t i = 0; i < steps; ++i) {
      if (i >= steps - k) dprod = dprod * c[i] + prod * dc[i];
      prod *= c[i];
      if (i < steps - k) dprod *= c[i];
    }
    const double expect_latent0 = prod * 0.8, expect_grad = dprod * (0.8 - 1.3);
    EXPECT_NEAR(r.latents[0].item<double>(), expect_latent0, 1e-12) << k;
    ASSERT_EQ(int64_t(r.recorded.size()), k);
    for (int64_t j = 0; j < k; ++j) {
      EXPECT_EQ(r.recorded[j].index, steps - k + j);
      EXPECT_EQ(r.recorded[j].t, ts[steps - k + j]);
      EXPECT_TRUE(r.recorded[j].model_output.requires_grad());
    }
    if (k == 0) {
      EXPECT_FALSE(r.latents.requires_grad());
      continue;
    }
    ASSERT_TRUE(grad.defined());
    EXPECT_NEAR(grad.item<double>(), expect_grad, 1e-10 * std::abs(expect_grad) + 1e-14) << k;
    if (k == steps) {
      // The whole chain: the finite difference of the sampled latents.
      const double h = 1e-6;
      const double fd = (run(0, theta0 + h, nullptr).latents.sum().item<double>() -
                         run(0, theta0 - h, nullptr).latents.sum().item<double>()) /
                        (2 * h);
      EXPECT_NEAR(grad.item<double>(), fd, 1e-6 * std::abs(fd));
    }
    // The last recorded step's input is the latents after the steps before it.
    double before = 1;
    for (int64_t i = 0; i < steps - k; ++i) before *= c[i];
    EXPECT_NEAR(r.recorded[0].latents_in[0].item<double>(), before * 0.8, 1e-12);
  }
}

TEST(DiffusionSamplingSampler, NoiseAndPredictedOriginal) {
  const auto s = sd15(R"({"set_alpha_to_one": true})");
  const auto x_T = at::tensor({0.5, -0.25, 1.0}, at::kFloat);
  std::vector<int64_t> seen;
  const auto eps = [&](const at::Tensor& x, int64_t t, int64_t index) {
    seen.push_back(index);
    return 0.1 * x + 0.01 * double(t) / 1000;
  };
  SampleOptions o;
  o.steps = 5;
  o.eta = 1.0;
  o.seeds = {42, 7, 9};
  const auto a = ddim_sample(s, o, eps, x_T);
  EXPECT_EQ(seen, (std::vector<int64_t>{0, 1, 2, 3, 4}));
  o.grad_last_k = 5;
  const auto b = ddim_sample(s, o, eps, x_T);
  // K changes what is recorded, never the sample; the seed fixes the noise.
  EXPECT_TRUE(at::equal(a.latents, b.latents));
  o.seeds = {43, 7, 9};
  const auto c = ddim_sample(s, o, eps, x_T);
  EXPECT_NE(c.latents[0].item<double>(), a.latents[0].item<double>());
  EXPECT_EQ(c.latents[1].item<double>(), a.latents[1].item<double>());  // a row's noise is its own
  o.seeds = {1};
  EXPECT_NE(error_of([&] { ddim_sample(s, o, eps, x_T); }).find("one seed per row of the latents (3), got 1"),
            std::string::npos);
  o.seeds = {43, 7, 9};
  // With alpha 1 past the end, the last step lands on its own x_0 (no noise variance left).
  EXPECT_TRUE(at::allclose(a.latents, a.pred_original, 1e-6, 1e-6));

  EXPECT_NE(error_of([&] {
              o.grad_last_k = 6;
              ddim_sample(s, o, eps, x_T);
            }).find("grad_last_k 6"),
            std::string::npos);
}

// ---- annealed importance guidance ----

TEST(DiffusionSamplingAig, SchedulesAndWeights) {
  const auto linear = parse_aig_schedule("linear", "aig.schedule");
  EXPECT_DOUBLE_EQ(aig_weight(linear, 0, 50), 0.0);
  EXPECT_DOUBLE_EQ(aig_weight(linear, 25, 50), 0.5);
  EXPECT_DOUBLE_EQ(aig_weight(linear, 49, 50), 0.98);
  const auto power = parse_aig_schedule("power_2", "aig.schedule");
  EXPECT_EQ(power.kind, AigSchedule::Kind::kPower);
  EXPECT_DOUBLE_EQ(aig_weight(power, 25, 50), 0.25);
  EXPECT_DOUBLE_EQ(aig_weight(parse_aig_schedule("power_0.5", "k"), 16, 64), 0.5);
  const auto step = parse_aig_schedule("step_0.6", "aig.schedule");
  EXPECT_DOUBLE_EQ(aig_weight(step, 29, 50), 0.0);
  EXPECT_DOUBLE_EQ(aig_weight(step, 30, 50), 1.0);
  EXPECT_DOUBLE_EQ(aig_weight(parse_aig_schedule("base", "k"), 40, 50), 0.0);
  EXPECT_DOUBLE_EQ(aig_weight(parse_aig_schedule("draft", "k"), 0, 50), 1.0);
  for (const char* bad :
       {"cosine", "power_", "power_x", "power_-1", "power_2x", "step_1.5", "step_", "Linear"}) {
    const auto msg = error_of([&] { parse_aig_schedule(bad, "aig.schedule"); });
    EXPECT_NE(msg.find("aig.schedule"), std::string::npos) << bad;
    EXPECT_NE(msg.find(std::string("'") + bad + "'"), std::string::npos) << msg;
  }
}

// ---- config files ----

TEST(DiffusionSamplingConfig, ReadsDiffusersConfigs) {
  const auto path = test::write_temp("scheduler_config.json", kSd15Config);
  const auto c = read_ddim_config(path);
  EXPECT_EQ(c.beta_schedule, BetaSchedule::kScaledLinear);
  EXPECT_DOUBLE_EQ(c.beta_start, 0.00085);
  EXPECT_DOUBLE_EQ(c.beta_end, 0.012);
  EXPECT_FALSE(c.set_alpha_to_one);
  EXPECT_EQ(c.steps_offset, 1);
  EXPECT_FALSE(c.clip_sample);
  EXPECT_EQ(c.prediction_type, PredictionType::kEpsilon);
  EXPECT_EQ(c.timestep_spacing, TimestepSpacing::kLeading);

  const auto ddim = parse_ddim_config(nlohmann::json::parse(R"({"_class_name": "DDIMScheduler"})"), "f");
  EXPECT_TRUE(ddim.set_alpha_to_one);
  EXPECT_TRUE(ddim.clip_sample);
  EXPECT_EQ(ddim.beta_schedule, BetaSchedule::kLinear);
  EXPECT_EQ(ddim.steps_offset, 0);
  // PNDM's own default for set_alpha_to_one, Euler's for the spacing.
  EXPECT_FALSE(
      parse_ddim_config(nlohmann::json::parse(R"({"_class_name": "PNDMScheduler"})"), "f").set_alpha_to_one);
  const auto euler = parse_ddim_config(
      nlohmann::json::parse(
          R"({"_class_name": "EulerDiscreteScheduler", "prediction_type": "v_prediction"})"),
      "f");
  EXPECT_EQ(euler.timestep_spacing, TimestepSpacing::kLinspace);
  EXPECT_EQ(euler.prediction_type, PredictionType::kVPrediction);
  const auto trained = parse_ddim_config(
      nlohmann::json::parse(
          R"({"_class_name": "DDIMScheduler", "num_train_timesteps": 3, "trained_betas": [0.1, 0.2, 0.5]})"),
      "f");
  EXPECT_NEAR(make_ddim_scheduler(trained).alphas_cumprod[2].item<double>(), 0.9 * 0.8 * 0.5, 1e-7);

  const std::pair<const char*, const char*> bad[] = {
      {R"({"beta_start": 0.1})", "\"_class_name\""},
      {R"({"_class_name": "LMSDiscreteScheduler"})", "LMSDiscreteScheduler"},
      {R"({"_class_name": "DDIMScheduler", "beta_schedule": "sigmoid"})",
       "\"beta_schedule\": unknown value 'sigmoid'"},
      {R"({"_class_name": "DDIMScheduler", "prediction_type": "x0"})",
       "\"prediction_type\": unknown value 'x0'"},
      {R"({"_class_name": "DDIMScheduler", "timestep_spacing": "even"})", "\"timestep_spacing\""},
      {R"({"_class_name": "DDIMScheduler", "thresholding": true})", "\"thresholding\""},
      {R"({"_class_name": "DDIMScheduler", "beta_start": "0.1"})", "\"beta_start\": expected a number"},
      {R"({"_class_name": "DDIMScheduler", "beta_end": 1.5})", "\"beta_end\""},
      {R"({"_class_name": "DDIMScheduler", "clip_sample": 1})", "\"clip_sample\": expected a boolean"},
      {R"({"_class_name": "DDIMScheduler", "num_train_timesteps": 0})", "\"num_train_timesteps\""},
      {R"({"_class_name": "DDIMScheduler", "steps_offset": -1})", "\"steps_offset\""},
      {R"({"_class_name": "DDIMScheduler", "trained_betas": [0.1]})", "\"trained_betas\""},
      {R"([1, 2])", "expected a JSON object"},
  };
  for (const auto& [text, needle] : bad) {
    const auto file = test::write_temp("bad_scheduler.json", text);
    const auto msg = error_of([&] { read_ddim_config(file); });
    EXPECT_EQ(msg.rfind(file, 0), 0u) << msg;
    EXPECT_NE(msg.find(needle), std::string::npos) << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  }
}

// ---- PNG ----

TEST(DiffusionSamplingPng, ChecksumsAndBytes) {
  // Constants from Python's zlib.crc32 and zlib.adler32.
  EXPECT_EQ(png_crc32("123456789"), 0xCBF43926u);
  EXPECT_EQ(png_crc32("IEND"), 0xAE426082u);
  EXPECT_EQ(png_crc32("6789", png_crc32("12345")), 0xCBF43926u);
  EXPECT_EQ(adler32("Wikipedia"), 0x11E60398u);
  EXPECT_EQ(adler32("pedia", adler32("Wiki")), 0x11E60398u);
  // A 2x1 RGB image, the file built in Python with zlib's checksums (and the stream checked by
  // zlib.decompress).
  const auto image = at::tensor({1, 2, 3, 4, 5, 6}, at::kByte).view({1, 2, 3});
  EXPECT_EQ(
      encode_png(image),
      from_hex("89504e470d0a1a0a0000000d49484452000000020000000108020000007b40e8dd000000124944415478010107"
               "00f8ff00010203040506003f001668415f8d0000000049454e44ae426082"));
}

TEST(DiffusionSamplingPng, WriteReadRoundTrip) {
  const auto dir = test::temp_dir("png");
  auto gen = at::detail::createCPUGenerator(7);
  for (auto shape : {std::vector<int64_t>{5, 7, 3}, {4, 9}, {3, 2, 4}, {6, 1, 2}, {600, 700, 3}}) {
    const auto image = at::randint(0, 256, shape, gen, at::kByte);
    const auto path = (dir / "x.png").string();
    write_png(path, image);
    EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));
    const auto back = read_png(path);
    EXPECT_TRUE(at::equal(back, image.dim() == 2 ? image.unsqueeze(-1) : image)) << image.sizes();
  }
  EXPECT_NE(error_of([&] { encode_png(at::zeros({2, 2, 3})); }).find("uint8"), std::string::npos);
  EXPECT_NE(error_of([&] {
              encode_png(at::zeros({2, 2, 5}, at::kByte));
            }).find("[H, W, C]"),
            std::string::npos);
}

TEST(DiffusionSamplingPng, ReadsFiltersAndRejectsBadFiles) {
  // 3x5 RGB, stored blocks, rows filtered None, Sub, Up, Average, Paeth (made with Python's zlib).
  const auto filtered = from_hex(
      "89504e470d0a1a0a0000000d49484452000000030000000508020000000f13c1f50000003d494441547801013200cdff0000c8"
      "05"
      "28aa05508c050107c70528e20d28e20d0207ff0007ff0d07ff1a030e620318f11a18f1210407ff0007ff0d07ff1a622f0ec313"
      "7a"
      "7acd0000000049454e44ae426082");
  const std::vector<int> pixels = {0,  200, 5,  40,  170, 5,  80, 140, 5,  7,  199, 5,  47,  169, 18,
                                   87, 139, 31, 14,  198, 5,  54, 168, 31, 94, 138, 57, 21,  197, 5,
                                   61, 167, 44, 101, 137, 83, 28, 196, 5,  68, 166, 57, 108, 136, 109};
  const auto image = decode_png(filtered, "f.png");
  ASSERT_EQ(image.sizes(), (std::vector<int64_t>{5, 3, 3}));
  EXPECT_TRUE(at::equal(image, at::tensor(pixels, at::kInt).to(at::kByte).view({5, 3, 3})));

  const auto compressed = from_hex(
      "89504e470d0a1a0a0000000d49484452000000030000000508020000000f13c1f50000003b4944415478da636038c1aab18a35"
      "a0"
      "879581fd38abfe4aa1f06e7906be63ac662be4e3ba2c19448fb2da2ed749ed0c669039c2eab2cc32a723170059b90ed4e24ed4"
      "37"
      "0000000049454e44ae426082");
  // The same pixels deflate-compressed (zlib level 9): what most PNG writers make.
  EXPECT_TRUE(
      at::equal(decode_png(compressed, "c.png"), at::tensor(pixels, at::kInt).to(at::kByte).view({5, 3, 3})));

  const auto good = encode_png(at::arange(12, at::kByte).view({2, 2, 3}));
  auto bad_crc = good;
  bad_crc[20] ^= 1;  // inside IHDR's width
  EXPECT_NE(error_of([&] { decode_png(bad_crc, "b.png"); }).find("fails its CRC"), std::string::npos);
  for (size_t cut : {size_t(0), size_t(8), size_t(20), good.size() - 13, good.size() - 1})
    EXPECT_NE(error_of([&] { decode_png(good.substr(0, cut), "t.png"); }).find("t.png: "), std::string::npos)
        << cut;
  auto huge = good;  // a chunk length far past the end of the file
  huge[8] = char(0x7f);
  EXPECT_NE(error_of([&] { decode_png(huge, "h.png"); }).find("truncated or corrupt chunk"),
            std::string::npos);
}

TEST(DiffusionSamplingPng, ImageGrid) {
  auto images = at::zeros({5, 3, 4, 6});
  images[0].fill_(-1);
  images[1].fill_(1);
  images[4].fill_(0.5);
  const auto grid = image_grid(images, 2, /*minus_one_to_one=*/true);
  EXPECT_EQ(grid.sizes(), (std::vector<int64_t>{12, 12, 3}));
  EXPECT_EQ(grid.scalar_type(), at::kByte);
  EXPECT_EQ(grid[0][0][0].item<int>(), 0);
  EXPECT_EQ(grid[0][6][0].item<int>(), 255);                          // image 1: row 0, column 1
  EXPECT_EQ(grid[4][0][1].item<int>(), 128);                          // image 2 is 0: 127.5 rounds to even
  EXPECT_EQ(grid[8][0][2].item<int>(), 191);                          // image 4: 0.75 * 255 = 191.25
  EXPECT_EQ(grid[8][6][0].item<int>(), 0);                            // no sixth image: black
  EXPECT_EQ(image_grid(images, 3, false)[0][6][0].item<int>(), 255);  // [0, 1]: image 1 clamped
  EXPECT_EQ(image_grid(images, 3, false).sizes(), (std::vector<int64_t>{8, 18, 3}));
  const auto bytes = at::full({1, 1, 2, 2}, 77, at::kByte);
  EXPECT_EQ(image_grid(bytes, 1, true)[1][1][0].item<int>(), 77);
  EXPECT_NE(error_of([&] {
              image_grid(at::zeros({3, 4, 4}), 2, true);
            }).find("[N, C, H, W]"),
            std::string::npos);
}

// ---- the shapes data ----

TEST(DiffusionSamplingShapes, DeterministicAndCaptionsMatchPixels) {
  const auto a = make_shape_samples(40, 48, 11), b = make_shape_samples(40, 48, 11),
             c = make_shape_samples(40, 48, 12);
  int differ = 0, shapes[kNumShapes] = {}, blended = 0;
  for (int i = 0; i < 40; ++i) {
    EXPECT_TRUE(at::equal(a[i].image, b[i].image));
    EXPECT_EQ(a[i].caption, b[i].caption);
    differ += a[i].caption != c[i].caption;
    const auto& s = a[i].spec;
    ++shapes[int(s.shape)];
    EXPECT_NE(s.colour, s.background);
    EXPECT_EQ(a[i].caption, fmt::format("a {} {} on a {} background", colour_name(s.colour),
                                        shape_name(s.shape), colour_name(s.background)));
    EXPECT_EQ(a[i].image.sizes(), (std::vector<int64_t>{48, 48, 3}));
    const auto pixel = [&](int64_t y, int64_t x) {
      return std::array<uint8_t, 3>{a[i].image[y][x][0].item<uint8_t>(), a[i].image[y][x][1].item<uint8_t>(),
                                    a[i].image[y][x][2].item<uint8_t>()};
    };
    EXPECT_EQ(pixel(int64_t(s.cy * 48), int64_t(s.cx * 48)), colour_rgb(s.colour)) << a[i].caption;
    EXPECT_EQ(pixel(0, 0), colour_rgb(s.background)) << a[i].caption;
    EXPECT_EQ(pixel(47, 47), colour_rgb(s.background)) << a[i].caption;
    // Anti-aliased edges: some pixels are neither colour.
    const auto fg =
        at::tensor({colour_rgb(s.colour)[0], colour_rgb(s.colour)[1], colour_rgb(s.colour)[2]}, at::kByte);
    const auto bg = at::tensor(
        {colour_rgb(s.background)[0], colour_rgb(s.background)[1], colour_rgb(s.background)[2]}, at::kByte);
    const auto is_fg = a[i].image.eq(fg).all(-1), is_bg = a[i].image.eq(bg).all(-1);
    blended += (~(is_fg | is_bg)).any().item<bool>();
    // The shape's area (pi r^2, 4 r^2 or the triangle's 3 sqrt(3) / 4 r^2) lies between the pixels
    // wholly inside it and those that are not wholly background.
    const double r = s.radius * 48, area[] = {M_PI * r * r, 4 * r * r, 3 * std::sqrt(3.0) / 4 * r * r};
    EXPECT_LT(is_fg.sum().item<double>(), area[int(s.shape)]) << a[i].caption;
    EXPECT_GT((~is_bg).sum().item<double>(), area[int(s.shape)]) << a[i].caption;
  }
  EXPECT_GT(differ, 20);
  for (int n : shapes) EXPECT_GT(n, 3);
  EXPECT_EQ(blended, 40);
  EXPECT_NE(error_of([&] { make_shape_image(ShapeSpec{}, 8); }).find("below 16"), std::string::npos);
}

TEST(DiffusionSamplingShapes, WritesTheFolder) {
  const auto dir = test::temp_dir("shapes");
  write_shapes_dataset(dir.string(), 4, 32, 5);
  const auto samples = make_shape_samples(4, 32, 5);
  std::ifstream captions(dir / "captions.jsonl"), prompts(dir / "prompts.jsonl");
  std::string line;
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(std::getline(captions, line));
    const auto j = nlohmann::json::parse(line);
    EXPECT_EQ(j.at("image"), fmt::format("images/{:05d}.png", i));
    EXPECT_EQ(j.at("caption"), samples[i].caption);
    EXPECT_TRUE(at::equal(read_png((dir / j.at("image").get<std::string>()).string()), samples[i].image));
    ASSERT_TRUE(std::getline(prompts, line));
    EXPECT_EQ(nlohmann::json::parse(line).at("prompt"), samples[i].caption);
  }
  EXPECT_FALSE(std::getline(captions, line));
  EXPECT_FALSE(std::filesystem::exists(dir / "captions.jsonl.tmp"));
  EXPECT_NE(error_of([&] { write_shapes_dataset(dir.string(), 0, 32, 5); }).find("0 images"),
            std::string::npos);
}

TEST(DiffusionSamplingShapes, RednessReward) {
  auto images = at::zeros({3, 3, 4, 4});
  images[0][0].fill_(1);                  // pure red
  images[1][1].fill_(1);                  // pure green
  images[2][0].narrow(0, 0, 2).fill_(1);  // half red, half black
  images.requires_grad_(true);
  const auto r = redness_reward(images);
  EXPECT_TRUE(at::allclose(r, at::tensor({1.0f, -0.5f, 0.5f})));
  r.sum().backward();
  EXPECT_TRUE(at::allclose(images.grad()[0][0], at::full({4, 4}, 1.0f / 16)));
  EXPECT_TRUE(at::allclose(images.grad()[0][2], at::full({4, 4}, -0.5f / 16)));
}

}  // namespace
}  // namespace aligner
