// A reward model loaded for scoring rollouts: what the in-process reward (reward.h
// load_model_reward) and `aligner serve-reward` share, so that both give the same number for the
// same sequence.
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "data/common.h"
#include "model/transformer.h"
#include "reward/reward.h"
#include "text/tokenizer.h"

namespace aligner {

// 16 hex digits that differ between tokenizers whose ids mean different things: a hash of the
// vocabulary size, BOS and EOS, and the ids of a probe text with spaces, punctuation, digits and
// non-ASCII letters. Equal fingerprints let token ids go from one tokenizer's model to the other's
// as they are.
std::string tokenizer_fingerprint(const Tokenizer& tok);

struct RewardScorer {
  std::string path;
  Transformer model;
  std::unique_ptr<Tokenizer> tok;
  // Plain template with EOS after the response: how scoring_tokens (algo/rm.h) encodes a
  // {"prompt", "response"} record, so that texts are scored as `aligner rm` trained on them.
  Encoder encoder;
  std::string fingerprint;      // of tok
  std::vector<double> weights;  // one per label: reward = weights . outputs
  int64_t batch_size = 16;
  int32_t pad_id = 0;
  std::atomic<bool> warned_truncation{false};
};

struct RewardScores {
  std::vector<double> rewards;               // one per sequence
  std::vector<std::vector<double>> outputs;  // per sequence, the model's output for each label
};

// The model at opt.path (it must be a reward model) and its tokenizer, with opt.attribute_weights
// checked against its labels. Errors name the folder or the key reward.attribute_weights.
std::unique_ptr<RewardScorer> load_reward_scorer(const RewardModelOptions& opt);

// The ids scoring_tokens gives a {"prompt": prompt, "response": response} record.
std::vector<int32_t> encode_for_scoring(const RewardScorer& s, const std::string& prompt,
                                        const std::string& response);

// The scores of non-empty sequences of ids below the model's vocab_size, in order. They run in
// batches of similar lengths, of at most s.batch_size sequences and, when max_tokens > 0, at most
// max_tokens tokens with padding (a longer sequence gets a batch of its own). A sequence longer
// than the model's context keeps its last max_position_embeddings tokens, as a reply's end is what
// the reward model reads; the first such sequence is a warning.
RewardScores score_sequences(RewardScorer& s, std::vector<std::vector<int32_t>> seqs, int64_t max_tokens = 0);

}  // namespace aligner
