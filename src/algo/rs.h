// Rejection sampling, as NeMo-Aligner has it: sample several responses to each prompt from the live
// policy, score them with the reward, keep each prompt's best, and fine-tune on those with the SFT
// loss (the mean negative log-likelihood of the kept responses' tokens, the prompt masked).
//
// One trainer step is one rollout of rollout.prompts_per_step prompts (shared by the ranks) x
// rollout.samples_per_prompt responses and one optimizer update on the rs.top_n best responses of
// each prompt. The kept set is always prompts x top_n, so that the micro-batches of a step are the
// same on every rank and known before any forward pass; rs.min_reward only takes the weight (and the
// loss tokens) away from kept responses below it. A step where no response of any rank reaches it
// still makes its update, with a zero gradient: AdamW's momentum and weight decay alone move the
// weights then. configs/rs.yaml lists every key.
//
// Metrics per step: reward_mean, reward_max, response_length and ended_fraction over every sample;
// reward_kept_mean and kept_fraction (of the samples) over the responses trained on; loss (per
// trained token); time_generation and time_reward.
//
// With rs.generate_only (`aligner rs --generate-only`) nothing trains: every prompt of data.train
// is sampled and scored once, in one process, and the kept responses are written to
// OUTPUT_DIR/selected.jsonl as {"input", "output", "reward", "prompt_index"} lines, which `aligner
// sft` reads with the same data.template as the same prompt followed by the response, the loss on
// the response alone. input is the prompt line's text, or its messages up to the last user turn
// (NeMo's VALUE_TO_TEXT lines then need data.template=steerlm in sft). The response is the text the
// reward scored, re-tokenized by sft; an empty one is left out, as sft refuses it.
#pragma once
#include <cstdint>
#include <vector>

#include "core/config.h"

namespace aligner {

// The whole `aligner rs` run described by `cfg`.
void run_rs(const Config& cfg);

// For rewards laid out prompt-major (`group` consecutive samples per prompt), the positions of each
// prompt's top_n highest rewards, best first, prompt after prompt. Of equal rewards the earlier
// sample wins; NaN ranks below every number.
std::vector<int64_t> select_top_n(const std::vector<double>& rewards, int64_t group, int64_t top_n);

}  // namespace aligner
