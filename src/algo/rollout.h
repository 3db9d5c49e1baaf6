// The rollout path that the online algorithms share (PPO now; REINFORCE, rejection sampling and
// SPIN next): prompts from a JSONL file in sampler order, responses generated on the live policy
// weights in this process, rewards, and the frozen reference's log-probs on them.
#pragma once
#include <ATen/ATen.h>

#include <memory>
#include <string>
#include <vector>

#include "core/config.h"
#include "data/prompt_data.h"
#include "data/sampler.h"
#include "gen/engine.h"
#include "model/transformer.h"
#include "reward/reward.h"

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
};

// Generates opt.num_samples responses to each prompt with `policy` as it is now, and scores them.
Rollout make_rollout(const Transformer& policy, const std::vector<PromptExample>& prompts,
                     const GenerationOptions& opt, const Tokenizer& tok, Reward& reward, int32_t pad_id);

// Rows [begin, begin + n) of a rollout's batch, as a training forward takes them, cut to the
// longest of those rows.
ForwardInput rollout_rows(const GenerationBatch& b, int64_t begin, int64_t n);
// The same rows of any [N, T] tensor of the rollout, cut as rollout_rows cuts them.
at::Tensor rollout_slice(const at::Tensor& t, const GenerationBatch& b, int64_t begin, int64_t n);

// log p(labels) of `m` at every position of `in` ([B, T] float32, 0 where labels < 0). Only the
// labelled positions go through the vocabulary projection. With `entropy`, the distribution's
// entropy at those positions too (0 elsewhere), from the same logits.
struct TokenLogprobs {
  at::Tensor logprobs, entropy;
};
TokenLogprobs labelled_logprobs(const Transformer& m, const ForwardInput& in, const at::Tensor& labels,
                                bool entropy);

// The most memory the run has had allocated on `device`'s GPU so far, in GB (0 on the CPU).
double peak_memory_gb(at::Device device);

// A critic's value at every position: its score head (one output) read on every hidden state,
// [B, T] float32.
at::Tensor token_values(const Transformer& critic, const ForwardInput& in);

// The policy's starting weights, frozen. offload=true keeps them in (pinned) host memory and swaps
// them into the policy's own tensors for each pass, as NeMo-Aligner does, so that the GPU never
// holds a second copy of the policy; offload=false keeps a copy on the policy's device.
class Reference {
 public:
  Reference(const Transformer& policy, bool offload);
  // Runs f(the reference model), without gradients. With offload the policy's tensors hold the
  // reference weights during `f` (one swap in and out for all its passes) and their own afterwards.
  template <class F>
  void with_model(Transformer& policy, F&& f) {
    at::NoGradGuard no_grad;
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

 private:
  void swap_in(Transformer& policy);
  void swap_out(Transformer& policy);

  bool offload_ = false;
  std::unique_ptr<Transformer> copy_;     // offload = false
  std::vector<at::Tensor> host_, stash_;  // offload = true: the reference, and the policy meanwhile
};

}  // namespace aligner
