// Batches as the model takes them (model/transformer.h ForwardInput), either one example per row
// or several examples packed into each row. In a packed row every example has its own position ids
// from 0 and its own segment id, so attention stays inside it, and no label crosses from one
// example into the next: a packed batch gives the same per-token losses as the padded one.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "data/examples.h"
#include "text/tokenizer.h"

namespace aligner {

constexpr int64_t kIgnoreIndex = -100;

struct Batch {
  at::Tensor input_ids;       // [B, T] int64
  at::Tensor labels;          // [B, T] int64: the next token where it is trained on, else kIgnoreIndex
  at::Tensor position_ids;    // [B, T] int64; 0 on padding
  at::Tensor segment_ids;     // [B, T] int64, packed rows only: 1, 2, ... per example, 0 on padding
  at::Tensor attention_mask;  // [B, T] int64: 1 token, 0 padding
  // Packed rows only: the index, in the collated list, of the sequence each token belongs to; -1 on
  // padding. What sums a packed batch's per-token values per sequence (response_logprobs).
  at::Tensor source_index;  // [B, T] int64
};

// The id padding is written with: the tokenizer's pad token, else EOS, else 0. Padding is masked
// out, so its value only has to be a valid id.
int32_t pad_id_for(const Tokenizer& tok);

// One sequence per row, right-padded to the longest.
Batch collate_padded(const std::vector<Sequence>& seqs, int32_t pad_id);

// Greedy first-fit: each sequence, in order, goes into the first row with room for it. Returns the
// rows as lists of sequence indices. A sequence longer than max_length is an error.
std::vector<std::vector<int64_t>> plan_packing(const std::vector<int64_t>& lengths, int64_t max_length);
// The planned rows, padded to the longest row; segment_ids set.
Batch collate_packed(const std::vector<Sequence>& seqs, const std::vector<std::vector<int64_t>>& rows,
                     int32_t pad_id);
Batch pack_sequences(const std::vector<Sequence>& seqs, int64_t max_length, int32_t pad_id);

struct PreferenceBatch {
  // Sequences [0, B) the chosen responses, [B, 2B) the rejected ones: one per row, or packed into
  // rows (source_index says which tokens are which sequence's).
  Batch seqs;
  at::Tensor prompt_lengths;  // [B] int64
  // [B] float32; undefined unless every pair of the batch has one.
  at::Tensor chosen_rewards, rejected_rewards, margins;
};
// pack_length > 0: the 2B sequences packed (plan_packing) into rows of at most pack_length tokens.
PreferenceBatch collate_preferences(const std::vector<PreferenceExample>& pairs, int32_t pad_id,
                                    int64_t pack_length = 0);

// Left-padded so that every prompt ends at the last column, where generation continues; labels
// undefined.
Batch collate_prompts(const std::vector<PromptExample>& prompts, int32_t pad_id);

struct AttributeBatch {
  Batch seqs;          // right-padded; labels undefined (the model reads each row's last token)
  at::Tensor values;   // [B, A] float32
  at::Tensor present;  // [B, A] float32, 1 where the value is given
};
AttributeBatch collate_attributes(const std::vector<AttributeExample>& examples, int32_t pad_id);

}  // namespace aligner
