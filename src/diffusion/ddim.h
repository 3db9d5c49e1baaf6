// DDIM sampling as diffusers' DDIMScheduler computes it, the sampler that DRaFT+ differentiates
// through (gradients kept for the last K steps only), classifier-free guidance, and NeMo-Aligner's
// annealed importance guidance (AIG) between a fine-tuned and a base model at inference.
#pragma once
#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace aligner {

enum class BetaSchedule { kLinear, kScaledLinear, kSquaredCosCapV2 };
enum class PredictionType { kEpsilon, kVPrediction, kSample };
enum class TimestepSpacing { kLeading, kTrailing, kLinspace };

// The fields of a diffusers scheduler_config.json that DDIM reads. Stable Diffusion folders ship
// PNDM's (SD 1.5) or Euler's (SDXL) config; diffusers users sample with DDIM by
// DDIMScheduler.from_config(pipe.scheduler.config), which carries every key the file holds, so
// that is what is read here whatever the class. The defaults are those that from_config gives a
// key the file lacks (see read_ddim_config).
struct DdimConfig {
  int64_t num_train_timesteps = 1000;
  double beta_start = 0.0001;
  double beta_end = 0.02;
  BetaSchedule beta_schedule = BetaSchedule::kLinear;
  std::vector<double> trained_betas;  // empty: from the schedule
  bool set_alpha_to_one = true;
  int64_t steps_offset = 0;
  PredictionType prediction_type = PredictionType::kEpsilon;
  TimestepSpacing timestep_spacing = TimestepSpacing::kLeading;
  bool clip_sample = true;
  double clip_sample_range = 1.0;
  bool rescale_betas_zero_snr = false;
};

// `path` is a scheduler_config.json of class DDIMScheduler, PNDMScheduler or EulerDiscreteScheduler.
// Keys the file lacks take the default that diffusers' from_config leaves them: the file's own
// class's default where that class has the key (pipe.scheduler.config holds all of its
// parameters), else DDIMScheduler's. So PNDM's set_alpha_to_one is false and Euler's
// timestep_spacing linspace. thresholding must be false; keys DDIM does not have are ignored.
// Wrong types and unknown values are one-line errors naming the file and the key.
DdimConfig read_ddim_config(const std::string& path);
DdimConfig parse_ddim_config(const nlohmann::json& json, const std::string& where);

struct DdimScheduler {
  DdimConfig config;
  at::Tensor alphas_cumprod;       // float32 [num_train_timesteps], CPU, as diffusers computes it
  double final_alpha_cumprod = 1;  // "alpha_prod_t_prev" past the first training step
};

// Betas, their zero-terminal-SNR rescaling and the cumulative product, in float32 and in
// diffusers' order of operations. An invalid config (betas outside [0, 1), a trained_betas of the
// wrong length) is an error.
DdimScheduler make_ddim_scheduler(const DdimConfig& config);

// alphas_cumprod[t] for 0 <= t < T; final_alpha_cumprod for t < 0 (the step past the end).
double alpha_prod(const DdimScheduler& sched, int64_t t);

// The timesteps of DDIMScheduler.set_timesteps(steps), first (noisiest) to last: leading
// (multiples of T / steps, plus steps_offset: SD's 50 steps give 981, 961, ..., 1), trailing
// (round(T - i T / steps) - 1: 999, 979, ..., 19) and linspace (round(linspace(0, T - 1, steps))
// reversed), rounding halves to even as numpy does. For trailing, numpy's float arange gives one
// element too many for a few step counts (61 of 1000: 1000 / (1000 / 61) > 61), a last timestep
// of -1; that element is left out here. 1 <= steps <= T, else an error.
std::vector<int64_t> ddim_timesteps(const DdimScheduler& sched, int64_t steps);
// The timestep DDIMScheduler.step goes to from t: t - T / steps (integer division), for every
// spacing (so with trailing or linspace spacing it need not be the next timestep of the list, as
// in diffusers); negative past the end.
int64_t ddim_prev_timestep(const DdimScheduler& sched, int64_t t, int64_t steps);

struct DdimStepResult {
  at::Tensor prev_sample;           // x_{prev_t}
  at::Tensor pred_original_sample;  // the model's x_0, clipped where the config clips it
};

// One DDIMScheduler.step from t to prev_t: x_0 and epsilon from the model output (epsilon,
// v_prediction or sample), x_0 clipped to clip_sample_range when clip_sample, then
// sqrt(a_prev) x_0 + sqrt(1 - a_prev - std^2) eps + std noise with
// std = eta sqrt((1 - a_prev) / (1 - a_t) (1 - a_t / a_prev)). `noise` (shaped as sample) is
// needed only when eta > 0. Differentiable in model_output and sample.
DdimStepResult ddim_step(const DdimScheduler& sched, const at::Tensor& model_output, int64_t t,
                         int64_t prev_t, const at::Tensor& sample, double eta, const at::Tensor& noise = {});

// The forward process for training: sqrt(a_t) x_0 + sqrt(1 - a_t) noise, per batch row with
// timesteps [B] (int64); and the v_prediction target sqrt(a_t) noise - sqrt(1 - a_t) x_0.
// The coefficients are taken in the sample's dtype, as diffusers' add_noise and get_velocity do.
at::Tensor add_noise(const DdimScheduler& sched, const at::Tensor& original, const at::Tensor& noise,
                     const at::Tensor& timesteps);
at::Tensor velocity(const DdimScheduler& sched, const at::Tensor& original, const at::Tensor& noise,
                    const at::Tensor& timesteps);

// Classifier-free guidance: uncond + scale (cond - uncond).
at::Tensor cfg_combine(const at::Tensor& uncond, const at::Tensor& cond, double scale);

// The model's output at (latents, t): the guided prediction, in the config's prediction type.
// `index` is the step's place in the schedule (0 for the noisiest), which annealed guidance weighs by.
using EpsFn = std::function<at::Tensor(const at::Tensor& latents, int64_t t, int64_t index)>;

struct SampleOptions {
  int64_t steps = 50;
  double eta = 0;
  // eta's noise: row r of the latents draws its own from seeds[r] on the CPU, so that an image's
  // draws depend neither on the batch it is in nor on the device. One per row when eta > 0.
  std::vector<uint64_t> seeds;
  int64_t grad_last_k = 0;  // steps at the end that record gradients (DRaFT's truncation K)
};

// A step that recorded gradients: the KL term of DRaFT+ evaluates the frozen model on latents_in
// at t (with the same guidance) and compares it with model_output.
struct RecordedStep {
  int64_t index = 0;  // 0 for the first (noisiest) step
  int64_t t = 0;
  at::Tensor latents_in;    // the step's input (carries the graph of the recorded steps before it)
  at::Tensor model_output;  // eps_fn's output, with its graph
};

struct SampleResult {
  at::Tensor latents;                  // after the last step
  at::Tensor pred_original;            // the last step's x_0, which NeMo-Aligner's DRaFT+ decodes
  std::vector<RecordedStep> recorded;  // the last grad_last_k steps, in order
};

// DDIM from `latents` (x_T, already noise: DDIM's init_noise_sigma is 1) over ddim_timesteps.
// The first steps - grad_last_k steps run under at::NoGradGuard, so the gradient of anything
// computed from the result reaches the parameters inside eps_fn through the last grad_last_k
// steps only (DRaFT's truncated backpropagation); with grad_last_k = 0 nothing is recorded.
// grad_last_k outside [0, steps] is an error.
SampleResult ddim_sample(const DdimScheduler& sched, const SampleOptions& options, const EpsFn& eps_fn,
                         const at::Tensor& latents);

// Annealed importance guidance (NeMo-Aligner's DRaFT+ inference, examples/mm/stable_diffusion/
// anneal_sd.py and MegatronSDDRaFTPModel.annealed_guidance): at step i of T (i = 0 the noisiest)
// eps = w eps_finetuned + (1 - w) eps_base, with w by schedule:
//   base: 0; draft: 1; linear: i / T; power_<p>: (i / T)^p; step_<s>: 1 if i / T >= s else 0.
// So w never reaches 1 at the last step under linear or power (it is (T - 1) / T), as there.
struct AigSchedule {
  enum class Kind { kBase, kDraft, kLinear, kPower, kStep } kind = Kind::kLinear;
  double value = 0;  // p or s
};
// "base", "draft", "linear", "power_2", "step_0.6", ...; anything else (p not a positive number,
// s outside [0, 1]) is an error naming `where` (the config key).
AigSchedule parse_aig_schedule(const std::string& text, const std::string& where);
double aig_weight(const AigSchedule& schedule, int64_t step_index, int64_t steps);
// w eps_finetuned + (1 - w) eps_base.
at::Tensor aig_combine(const at::Tensor& eps_base, const at::Tensor& eps_finetuned, double w);

}  // namespace aligner
