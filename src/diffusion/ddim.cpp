#include "diffusion/ddim.h"

#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <cstdlib>
#include <map>
#include <optional>

#include "core/error.h"
#include "core/json.h"
#include "io/jsonl.h"

namespace aligner {

namespace {

template <class E>
E enum_field(const nlohmann::json& json, const char* key, const std::string& where,
             const std::map<std::string, E>& values, E fallback) {
  auto text = get_optional_field<std::string>(json, key, where);
  if (!text) return fallback;
  auto it = values.find(*text);
  if (it != values.end()) return it->second;
  std::string known;
  for (const auto& [name, value] : values) known += (known.empty() ? "" : ", ") + name;
  fail("{}: field \"{}\": unknown value '{}' (known: {})", where, key, *text, known);
}

// diffusers' betas_for_alpha_bar with the cosine transform, in float64 and then float32, as there.
at::Tensor squaredcos_cap_v2_betas(int64_t steps) {
  const auto alpha_bar = [](double t) {
    const double c = std::cos((t + 0.008) / 1.008 * M_PI / 2);
    return c * c;
  };
  std::vector<float> betas(steps);
  for (int64_t i = 0; i < steps; ++i) {
    const double t1 = double(i) / double(steps), t2 = double(i + 1) / double(steps);
    betas[i] = float(std::min(1 - alpha_bar(t2) / alpha_bar(t1), 0.999));
  }
  return at::tensor(betas, at::kFloat);
}

// diffusers' rescale_zero_terminal_snr (Lin et al. 2023), op for op in float32: the last
// timestep's signal goes to exactly zero and the first keeps its value.
at::Tensor rescale_zero_terminal_snr(const at::Tensor& betas) {
  auto bar_sqrt = at::cumprod(1.0 - betas, 0).sqrt();
  const auto first = bar_sqrt[0].clone(), last = bar_sqrt[-1].clone();
  bar_sqrt -= last;
  bar_sqrt *= first / (first - last);
  const auto bar = bar_sqrt.pow(2);
  const auto alphas = at::cat({bar.slice(0, 0, 1), bar.slice(0, 1) / bar.slice(0, 0, -1)});
  return 1.0 - alphas;
}

// numpy's rounding: half to even (the default floating-point rounding mode).
int64_t round_half_even(double x) {
  return int64_t(std::nearbyint(x));
}

// sqrt(a_t) (or sqrt(1 - a_t)) per row of x, in its dtype and shaped to broadcast over it.
at::Tensor row_coefficient(const DdimScheduler& sched, const at::Tensor& x, const at::Tensor& timesteps,
                           bool complement) {
  if (timesteps.dim() != 1 || timesteps.size(0) != x.size(0))
    fail("add_noise: timesteps {} do not give one per row of samples {}", fmt::join(timesteps.sizes(), "x"),
         fmt::join(x.sizes(), "x"));
  const auto host = timesteps.to(at::kCPU, at::kLong);
  if (host.numel() == 0) fail("add_noise: no samples");
  const int64_t lo = host.min().item<int64_t>(), hi = host.max().item<int64_t>();
  if (lo < 0 || hi >= sched.config.num_train_timesteps)
    fail("add_noise: timesteps in [{}, {}] outside [0, {})", lo, hi, sched.config.num_train_timesteps);
  auto a = sched.alphas_cumprod.to(x.device(), x.scalar_type()).index_select(0, host.to(x.device()));
  if (complement) a = 1 - a;
  std::vector<int64_t> shape(x.dim(), 1);
  shape[0] = x.size(0);
  return a.pow(0.5).view(shape);
}

}  // namespace

DdimConfig parse_ddim_config(const nlohmann::json& json, const std::string& where) {
  if (!json.is_object()) fail("{}: expected a JSON object, got {}", where, json_type_name(json));
  const auto cls = get_field<std::string>(json, "_class_name", where);
  if (cls != "DDIMScheduler" && cls != "PNDMScheduler" && cls != "EulerDiscreteScheduler")
    fail(
        "{}: field \"_class_name\": '{}' is not a scheduler whose config DDIM can take (DDIMScheduler, "
        "PNDMScheduler, EulerDiscreteScheduler)",
        where, cls);
  DdimConfig c;
  // The defaults of the file's own class where they differ from DDIM's (see the header).
  if (cls == "PNDMScheduler") c.set_alpha_to_one = false;
  if (cls == "EulerDiscreteScheduler") c.timestep_spacing = TimestepSpacing::kLinspace;

  c.num_train_timesteps = get_optional_field<int64_t>(json, "num_train_timesteps", where).value_or(1000);
  // A million steps is far past any model (1000) and keeps the float32 tables small.
  if (c.num_train_timesteps < 1 || c.num_train_timesteps > 1000000)
    fail("{}: field \"num_train_timesteps\": {} is not in [1, 1000000]", where, c.num_train_timesteps);
  c.beta_start = get_optional_field<double>(json, "beta_start", where).value_or(c.beta_start);
  c.beta_end = get_optional_field<double>(json, "beta_end", where).value_or(c.beta_end);
  for (const auto& [key, value] : {std::pair{"beta_start", c.beta_start}, std::pair{"beta_end", c.beta_end}})
    if (!(value >= 0 && value < 1)) fail("{}: field \"{}\": {} is not in [0, 1)", where, key, value);
  c.beta_schedule = enum_field<BetaSchedule>(json, "beta_schedule", where,
                                             {{"linear", BetaSchedule::kLinear},
                                              {"scaled_linear", BetaSchedule::kScaledLinear},
                                              {"squaredcos_cap_v2", BetaSchedule::kSquaredCosCapV2}},
                                             c.beta_schedule);
  if (auto it = json.find("trained_betas"); it != json.end() && !it->is_null()) {
    if (!it->is_array() || int64_t(it->size()) != c.num_train_timesteps)
      fail("{}: field \"trained_betas\": expected an array of num_train_timesteps ({}) numbers", where,
           c.num_train_timesteps);
    for (const auto& b : *it) {
      if (!b.is_number() || !(b.get<double>() >= 0 && b.get<double>() <= 1))
        fail("{}: field \"trained_betas\": {} is not a number in [0, 1]", where, b.dump());
      c.trained_betas.push_back(b.get<double>());
    }
  }
  c.set_alpha_to_one = get_optional_field<bool>(json, "set_alpha_to_one", where).value_or(c.set_alpha_to_one);
  c.steps_offset = get_optional_field<int64_t>(json, "steps_offset", where).value_or(0);
  if (c.steps_offset < 0 || c.steps_offset >= c.num_train_timesteps)
    fail("{}: field \"steps_offset\": {} is not in [0, num_train_timesteps)", where, c.steps_offset);
  c.prediction_type = enum_field<PredictionType>(json, "prediction_type", where,
                                                 {{"epsilon", PredictionType::kEpsilon},
                                                  {"v_prediction", PredictionType::kVPrediction},
                                                  {"sample", PredictionType::kSample}},
                                                 c.prediction_type);
  c.timestep_spacing = enum_field<TimestepSpacing>(json, "timestep_spacing", where,
                                                   {{"leading", TimestepSpacing::kLeading},
                                                    {"trailing", TimestepSpacing::kTrailing},
                                                    {"linspace", TimestepSpacing::kLinspace}},
                                                   c.timestep_spacing);
  c.clip_sample = get_optional_field<bool>(json, "clip_sample", where).value_or(true);
  c.clip_sample_range = get_optional_field<double>(json, "clip_sample_range", where).value_or(1.0);
  if (!(c.clip_sample_range > 0 && std::isfinite(c.clip_sample_range)))
    fail("{}: field \"clip_sample_range\": {} is not a positive number", where, c.clip_sample_range);
  if (get_optional_field<bool>(json, "thresholding", where).value_or(false))
    fail("{}: field \"thresholding\": true is not supported (dynamic thresholding); set it to false", where);
  c.rescale_betas_zero_snr = get_optional_field<bool>(json, "rescale_betas_zero_snr", where).value_or(false);
  return c;
}

DdimConfig read_ddim_config(const std::string& path) {
  return parse_ddim_config(read_json_file(path), path);
}

DdimScheduler make_ddim_scheduler(const DdimConfig& config) {
  const int64_t n = config.num_train_timesteps;
  at::Tensor betas;
  if (!config.trained_betas.empty()) {
    if (int64_t(config.trained_betas.size()) != n)
      fail("scheduler: {} trained_betas for {} training timesteps", config.trained_betas.size(), n);
    betas = at::tensor(config.trained_betas, at::kDouble).to(at::kFloat);
  } else if (config.beta_schedule == BetaSchedule::kLinear) {
    betas = at::linspace(config.beta_start, config.beta_end, n, at::kFloat);
  } else if (config.beta_schedule == BetaSchedule::kScaledLinear) {
    betas =
        at::linspace(std::pow(config.beta_start, 0.5), std::pow(config.beta_end, 0.5), n, at::kFloat).pow(2);
  } else {
    betas = squaredcos_cap_v2_betas(n);
  }
  if (config.rescale_betas_zero_snr) betas = rescale_zero_terminal_snr(betas);
  DdimScheduler s;
  s.config = config;
  s.alphas_cumprod = at::cumprod(1.0 - betas, 0);
  s.final_alpha_cumprod = config.set_alpha_to_one ? 1.0 : s.alphas_cumprod[0].item<double>();
  return s;
}

double alpha_prod(const DdimScheduler& sched, int64_t t) {
  if (t >= sched.config.num_train_timesteps)
    fail("scheduler: timestep {} is past num_train_timesteps {}", t, sched.config.num_train_timesteps);
  return t >= 0 ? sched.alphas_cumprod[t].item<double>() : sched.final_alpha_cumprod;
}

std::vector<int64_t> ddim_timesteps(const DdimScheduler& sched, int64_t steps) {
  const int64_t T = sched.config.num_train_timesteps;
  if (steps < 1 || steps > T)
    fail("scheduler: {} inference steps is not in [1, num_train_timesteps {}]", steps, T);
  std::vector<int64_t> ts(steps);
  switch (sched.config.timestep_spacing) {
    case TimestepSpacing::kLeading: {
      const int64_t ratio = T / steps;
      for (int64_t i = 0; i < steps; ++i) ts[i] = (steps - 1 - i) * ratio + sched.config.steps_offset;
      if (ts[0] >= T)
        fail(
            "scheduler: {} leading steps with steps_offset {} reach timestep {}, past num_train_timesteps {}",
            steps, sched.config.steps_offset, ts[0], T);
      break;
    }
    case TimestepSpacing::kTrailing: {
      // np.arange(T, 0, -T / steps): the first two elements, then start + i * (second - start).
      const double start = double(T), second = start - double(T) / double(steps), delta = second - start;
      for (int64_t i = 0; i < steps; ++i)
        ts[i] = round_half_even(i == 0 ? start : i == 1 ? second : start + double(i) * delta) - 1;
      break;
    }
    case TimestepSpacing::kLinspace: {
      // np.linspace(0, T - 1, steps): i * step, the last exactly T - 1; then reversed.
      const double step = steps > 1 ? double(T - 1) / double(steps - 1) : 0;
      for (int64_t i = 0; i < steps; ++i)
        ts[steps - 1 - i] = i == steps - 1 && steps > 1 ? T - 1 : round_half_even(double(i) * step);
      break;
    }
  }
  return ts;
}

int64_t ddim_prev_timestep(const DdimScheduler& sched, int64_t t, int64_t steps) {
  return t - sched.config.num_train_timesteps / steps;
}

DdimStepResult ddim_step(const DdimScheduler& sched, const at::Tensor& model_output, int64_t t,
                         int64_t prev_t, const at::Tensor& sample, double eta, const at::Tensor& noise) {
  if (t < 0) fail("scheduler: step from negative timestep {}", t);
  if (!model_output.sizes().equals(sample.sizes()))
    fail("scheduler: model output {} is not shaped as the sample {}", fmt::join(model_output.sizes(), "x"),
         fmt::join(sample.sizes(), "x"));
  const double a_t = alpha_prod(sched, t), a_prev = alpha_prod(sched, prev_t), b_t = 1 - a_t;
  at::Tensor x0, eps;
  switch (sched.config.prediction_type) {
    case PredictionType::kEpsilon:
      x0 = (sample - std::sqrt(b_t) * model_output) / std::sqrt(a_t);
      eps = model_output;
      break;
    case PredictionType::kSample:
      x0 = model_output;
      eps = (sample - std::sqrt(a_t) * x0) / std::sqrt(b_t);
      break;
    case PredictionType::kVPrediction:
      x0 = std::sqrt(a_t) * sample - std::sqrt(b_t) * model_output;
      eps = std::sqrt(a_t) * model_output + std::sqrt(b_t) * sample;
      break;
  }
  // diffusers clips x_0 but, without use_clipped_model_output, keeps the unclipped epsilon.
  if (sched.config.clip_sample)
    x0 = x0.clamp(-sched.config.clip_sample_range, sched.config.clip_sample_range);
  const double variance = (1 - a_prev) / b_t * (1 - a_t / a_prev);
  const double std_dev = eta * std::sqrt(variance);
  auto prev = std::sqrt(a_prev) * x0 + std::sqrt(1 - a_prev - std_dev * std_dev) * eps;
  if (eta > 0) {
    if (!noise.defined() || !noise.sizes().equals(sample.sizes()))
      fail("scheduler: eta {} needs noise shaped as the sample {}", eta, fmt::join(sample.sizes(), "x"));
    prev = prev + std_dev * noise;
  }
  return {prev, x0};
}

at::Tensor add_noise(const DdimScheduler& sched, const at::Tensor& original, const at::Tensor& noise,
                     const at::Tensor& timesteps) {
  return row_coefficient(sched, original, timesteps, false) * original +
         row_coefficient(sched, original, timesteps, true) * noise;
}

at::Tensor velocity(const DdimScheduler& sched, const at::Tensor& original, const at::Tensor& noise,
                    const at::Tensor& timesteps) {
  return row_coefficient(sched, original, timesteps, false) * noise -
         row_coefficient(sched, original, timesteps, true) * original;
}

at::Tensor cfg_combine(const at::Tensor& uncond, const at::Tensor& cond, double scale) {
  return uncond + scale * (cond - uncond);
}

SampleResult ddim_sample(const DdimScheduler& sched, const SampleOptions& options, const EpsFn& eps_fn,
                         const at::Tensor& latents) {
  const auto timesteps = ddim_timesteps(sched, options.steps);
  const int64_t n = int64_t(timesteps.size());
  if (options.grad_last_k < 0 || options.grad_last_k > n)
    fail("ddim_sample: grad_last_k {} is not in [0, steps {}]", options.grad_last_k, n);
  if (options.eta < 0) fail("ddim_sample: eta {} is negative", options.eta);
  std::vector<at::Generator> gens;
  if (options.eta > 0) {
    if (latents.dim() < 1 || int64_t(options.seeds.size()) != latents.size(0))
      fail("ddim_sample: eta > 0 needs one seed per row of the latents ({}), got {}",
           latents.dim() < 1 ? 0 : latents.size(0), options.seeds.size());
    for (uint64_t s : options.seeds) gens.push_back(at::detail::createCPUGenerator(s));
  }

  SampleResult result;
  at::Tensor x = latents;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t = timesteps[i], prev_t = ddim_prev_timestep(sched, t, options.steps);
    // Drawn at every step whatever K is, so that K changes the gradient and never the sample.
    at::Tensor noise;
    if (!gens.empty()) {
      std::vector<at::Tensor> rows;
      for (auto& g : gens) rows.push_back(at::randn(x[0].sizes(), g, at::kFloat));
      noise = at::stack(rows).to(x.options());
    }
    const bool record = i >= n - options.grad_last_k;
    auto run = [&] {
      auto out = eps_fn(x, t, i);
      if (!out.sizes().equals(x.sizes()))
        fail("ddim_sample: the model's output {} is not shaped as the latents {}",
             fmt::join(out.sizes(), "x"), fmt::join(x.sizes(), "x"));
      auto step = ddim_step(sched, out, t, prev_t, x, options.eta, noise);
      if (record) result.recorded.push_back({i, t, x, out});
      result.pred_original = step.pred_original_sample;
      x = step.prev_sample;
    };
    if (record) {
      run();
    } else {
      at::NoGradGuard no_grad;
      run();
    }
  }
  result.latents = x;
  return result;
}

AigSchedule parse_aig_schedule(const std::string& text, const std::string& where) {
  using Kind = AigSchedule::Kind;
  if (text == "base") return {Kind::kBase, 0};
  if (text == "draft") return {Kind::kDraft, 0};
  if (text == "linear") return {Kind::kLinear, 0};
  const auto number_after = [&](const std::string& prefix, double& value) {
    if (text.rfind(prefix, 0) != 0 || text.size() == prefix.size()) return false;
    const char* begin = text.c_str() + prefix.size();
    char* end = nullptr;
    value = std::strtod(begin, &end);
    return *end == '\0' && std::isfinite(value);
  };
  double v = 0;
  if (number_after("power_", v) && v > 0) return {Kind::kPower, v};
  if (number_after("step_", v) && v >= 0 && v <= 1) return {Kind::kStep, v};
  fail(
      "{}: unknown annealed guidance schedule '{}' (base, draft, linear, power_<p> with p > 0, step_<s> with "
      "s in [0, 1])",
      where, text);
}

double aig_weight(const AigSchedule& schedule, int64_t step_index, int64_t steps) {
  const double frac = double(step_index) / double(steps);
  switch (schedule.kind) {
    case AigSchedule::Kind::kBase:
      return 0;
    case AigSchedule::Kind::kDraft:
      return 1;
    case AigSchedule::Kind::kLinear:
      return frac;
    case AigSchedule::Kind::kPower:
      return std::pow(frac, schedule.value);
    case AigSchedule::Kind::kStep:
      return frac >= schedule.value ? 1 : 0;
  }
  return 0;
}

at::Tensor aig_combine(const at::Tensor& eps_base, const at::Tensor& eps_finetuned, double w) {
  return w * eps_finetuned + (1 - w) * eps_base;
}

}  // namespace aligner
