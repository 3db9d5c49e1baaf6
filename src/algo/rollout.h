// The rollout path that the online algorithms share (ppo, reinforce, rs; spin uses its reference
// and step seeds): prompts from a JSONL file in sampler order, responses generated on the live
// policy weights in this process, rewards, and the frozen reference's log-probs on them.
#pragma once
#include <ATen/ATen.h>

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/device_memory.h"
#include "data/prompt_data.h"
#include "data/sampler.h"
#include "dist/process_group.h"
#include "gen/engine.h"
#include "model/transformer.h"
#include "reward/reward.h"
#include "train/trainer.h"

namespace aligner {

// A prompt file read as `aligner generate` reads it (data.template, data.max_length,
// data.truncation, data.skip_bad_lines), checked line by line before training starts.
PromptDataset open_rollout_prompts(const Config& cfg, const std::string& key, const Tokenizer& tok,
                                   const ModelConfig& model, int64_t max_new_tokens);

// What a rollout is made of: the generated sequences as the training forward takes them, on the
// policy's device, and per sequence what the losses and metrics need.
struct Rollout {
  GenerationBatch batch;       // [N, T]; response positions are where labels >= 0
  std::vector<double> scores;  // the reward of each sequence
  std::vector<bool> ended;     // finished by EOS / a stop id or string within the limit
  std::vector<int64_t> response_length;
  std::vector<int64_t> prompt_index;  // into the prompts the rollout was made from
  int64_t generated_tokens = 0;
  double generation_seconds = 0, reward_seconds = 0;
  int64_t dropped_groups = 0;  // dynamic sampling: groups generated and left out
};

// Dynamic sampling (DAPO): a prompt's group of samples that `keep` refuses (e.g. all rewards equal:
// nothing to learn) is dropped and more() prompts are sampled in its place, for at most max_rounds
// rounds of generation; dropped groups then fill whatever is still missing.
struct GroupFilter {
  std::function<bool(const std::vector<double>& group_scores)> keep;
  std::function<std::vector<PromptExample>()> more;  // empty once the data is done
  int64_t max_rounds = 1;
};

// An online algorithm's prompts: data.train (and data.validation) read as rollouts read them, and
// this rank's order over data.train, `per_rank` prompts a step.
struct OnlinePrompts {
  std::unique_ptr<PromptDataset> train, val;
  Sampler sampler;
  int64_t max_epochs = 1;  // data_epochs
  int64_t per_rank = 0;

  // This rank's next prompts; empty once the data is done.
  std::vector<PromptExample> next();
  // Where this rank's order stands, for checkpoints.
  int64_t position() const { return sampler.position; }
};

// How a step's responses are trained on: `per_prompt` of each prompt's responses (the key that
// sets it named in errors), in `updates` optimizer updates (`updates_key`).
struct StepShape {
  int64_t per_prompt = 1;
  std::string per_prompt_key = "rollout.samples_per_prompt";
  int64_t updates = 1;
  std::string updates_key;
};

// Checks that rollout.prompts_per_step shares out over the ranks and that each rank's trained
// responses cut into the updates' whole micro-batches; errors name the keys.
OnlinePrompts open_online_prompts(const Config& cfg, const Tokenizer& tok, const ModelConfig& model,
                                  int64_t max_new_tokens, const StepShape& shape, const dist::Dist& dist);

// Generates opt.num_samples responses to each prompt with `policy` as it is now, and scores them.
// With `filter`, the rollout holds as many groups as there are prompts, each kept or filling in.
// Sequences are prompt-major (prompt * num_samples + sample); prompt_index numbers the groups.
Rollout make_rollout(const Transformer& policy, const std::vector<PromptExample>& prompts,
                     const GenerationOptions& opt, const Tokenizer& tok, Reward& reward, int32_t pad_id,
                     const GroupFilter* filter = nullptr);

// A seed for one rank's draws at one step: the same when the run resumes, different across steps,
// ranks and uses (salt).
uint64_t step_seed(uint64_t seed, int64_t step, int64_t rank, int64_t salt);

// The micro-batches of one step's updates over a rollout of N sequences: each of `epochs` passes
// visits the rows in a fresh order drawn from `seed`, cut into micro-batches of `micro` rows (N a
// multiple of micro). Row indices, int64 on the CPU.
std::vector<at::Tensor> plan_micro_batches(int64_t N, int64_t epochs, int64_t micro, uint64_t seed);

// The rows' sequences of a rollout's batch, cut to the longest of them.
ForwardInput gather_rows(const GenerationBatch& b, const at::Tensor& rows);
// The same rows of any [N, T] tensor of the rollout, cut to in's length.
at::Tensor take_rows(const at::Tensor& t, const at::Tensor& rows, const ForwardInput& in);

// log p(labels) of `m` at every position of `in` ([B, T] float32, 0 where labels < 0). Only the
// labelled positions go through the vocabulary projection. With `entropy`, the distribution's
// entropy at those positions too (0 elsewhere), from the same logits.
struct TokenLogprobs {
  at::Tensor logprobs, entropy;
};
TokenLogprobs labelled_logprobs(const Transformer& m, const ForwardInput& in, const at::Tensor& labels,
                                bool entropy);

// log p(labels) of `m` at every position of the rollout ([N, T] float32, 0 off the responses),
// without gradients, one pass per micro-batch (rows) given: batched as the first update will batch
// them, its forward repeats these numbers exactly.
at::Tensor rollout_logprobs(const Transformer& m, const GenerationBatch& b,
                            const std::vector<at::Tensor>& micro_batches);

// A critic's value at every position: its score head (one output) read on every hidden state,
// [B, T] float32.
at::Tensor token_values(const Transformer& critic, const ForwardInput& in);

// reference.offload: true, false, or nullopt for auto (offload on CUDA); other values are errors.
std::optional<bool> read_reference_offload(const Config& cfg);

// The policy's starting weights, frozen. offload=true keeps them in (pinned) host memory and swaps
// them into the policy's own tensors for each pass, as NeMo-Aligner does, so that the GPU never
// holds a second copy of the policy; offload=false keeps a copy on the policy's device.
class Reference {
 public:
  // A policy with adapters (LoRA) needs no copy: its reference is the base with the adapters off.
  Reference(const Transformer& policy, bool offload);
  // Runs f(the reference model), without gradients. With offload the policy's tensors hold the
  // reference weights during `f` (one swap in and out for all its passes) and their own afterwards.
  template <class F>
  void with_model(Transformer& policy, F&& f) {
    at::NoGradGuard no_grad;
    if (adapters_) return f(static_cast<const Transformer&>(adapted_reference(policy)));
    if (!offload_) return f(static_cast<const Transformer&>(*copy_));
    swap_in(policy);
    try {
      f(static_cast<const Transformer&>(policy));
    } catch (...) {
      swap_out(policy);
      throw;
    }
    swap_out(policy);
  }
  // Replaces the reference with `weights`, named_parameters(policy)'s tensors in its order (with
  // adapters: adapter_parameters(policy)'s), from any device: SPIN's reference becomes the policy as
  // it is at the end of each iteration.
  void assign(const std::vector<std::pair<std::string, at::Tensor>>& weights);

 private:
  void swap_in(Transformer& policy);
  void swap_out(Transformer& policy);
  // The policy's base with the assigned adapters, or none.
  Transformer adapted_reference(const Transformer& policy) const;

  bool adapters_ = false;
  std::vector<std::pair<std::string, at::Tensor>> assigned_adapters_;
  bool offload_ = false;
  std::unique_ptr<Transformer> copy_;     // offload = false
  std::vector<at::Tensor> host_, stash_;  // offload = true: the reference, and the policy meanwhile
};

using NamedValues = std::vector<std::pair<std::string, double>>;

// The rollout's metrics over every rank, the same on each: reward_mean, reward_std, kl (the summed
// per-token log-ratio to the reference, per response; left out when kl_per_sequence is undefined),
// response_length, ended_fraction.
NamedValues rollout_metrics(dist::Dist& dist, const Rollout& r, const at::Tensor& kl_per_sequence);
// This rank's side of the step: time_generation, time_inference (everything between generation and
// the updates: reward, reference and old log-probs, critic), time_reward, gen_tokens_per_s,
// peak_memory_gb.
NamedValues rank_metrics(const Rollout& r, double inference_seconds, at::Device device);
// Adds step-level values to micro-batch i's metrics: counted once per rank (in micro-batch 0), so
// that the trainer's mean over the global batch is their mean over the ranks.
void add_step_metrics(std::vector<Metric>& out, const NamedValues& values, int64_t i);

// What an online algorithm reports on its held-out prompts: this rank's share generated (greedy
// with `greedy`) from the policy as it is, scored, and compared with the reference: the mean
// reward, kl (summed log-ratio per response), response_length and ended_fraction.
struct PolicyValidation {
  PromptDataset* prompts = nullptr;  // none: nothing to report
  GenerationOptions gen;
  bool greedy = true;
  int64_t micro_batch_size = 1;
  int32_t pad_id = 0;
};
ValidationSums validate_policy(const PolicyValidation& v, Transformer& policy, Reference* reference,
                               const Tokenizer& tok, Reward& reward, dist::Dist& dist);

// What the online algorithms (ppo, reinforce, rs) have in common, on top of which each adds its
// losses: the policy that generates and trains, its prompts (prompts_per_step a step over the ranks),
// the generation options, the reward, the step count, held-out validation and the data position
// in checkpoints.
class OnlineAlgorithm : public Algorithm {
 public:
  // `reference`, when given, is what validation measures the KL to.
  OnlineAlgorithm(const Config& cfg, const GenerationOptions& gen, const StepShape& shape,
                  const Tokenizer& tok, Transformer& policy, Reward& reward, Reference* reference,
                  dist::Dist& dist);

  int64_t train_examples() const override { return dataset_size(*prompts_.train); }
  StepExamples examples_per_step(int64_t) const override {
    return {prompts_per_step_, "rollout.prompts_per_step"};
  }
  void after_optimizer_step(int64_t step) override { step_ = step; }
  bool generates() const override { return true; }
  ValidationSums validate() override;
  nlohmann::json state() const override;
  void load_state(const nlohmann::json& s) override;

 protected:
  // This rank's next rollout into rollout_, drawn from a seed of the step; false once the data is done.
  bool next_rollout(const GroupFilter* filter = nullptr);

  const Tokenizer& tok_;
  Transformer& policy_;
  Reward& reward_;
  Reference* reference_;
  dist::Dist& dist_;
  GenerationOptions gen_;
  uint64_t seed_ = 0;  // trainer.seed
  int64_t prompts_per_step_ = 0, micro_batch_size_ = 1, step_ = 0;
  int64_t checkpointed_layers_ = 0;
  bool val_greedy_ = true;
  int32_t pad_id_ = 0;
  OnlinePrompts prompts_;
  Rollout rollout_;
  std::shared_ptr<DecodeSession> val_session_;
};

}  // namespace aligner
