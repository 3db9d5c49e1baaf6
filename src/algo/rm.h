// Reward models: the transformer with a score head read at each sequence's last token
// (model/transformer.h sequence_scores), trained one of two ways (rm.type):
//   pairwise    Bradley-Terry on chosen/rejected pairs: -log sigmoid(r_chosen - r_rejected - margin),
//               the margin from the data when a pair has one; averaged over the pairs.
//   regression  one output per named attribute (HelpSteer, NeMo's regression reward models), the
//               squared error of each labelled attribute, averaged over the labels present in
//               the global batch (missing labels are masked out, not counted as zeros).
// configs/rm.yaml is the schema. The result is a Hugging Face XxxForSequenceClassification folder.
#pragma once
#include <nlohmann/json.hpp>

#include <string>
#include <vector>

#include "core/config.h"
#include "data/common.h"
#include "data/packing.h"
#include "model/transformer.h"

namespace aligner {

// The whole `aligner rm` run described by `cfg`.
void run_rm(const Config& cfg);

// -log sigmoid(chosen - rejected - margin), per pair: [B].
at::Tensor bradley_terry_loss(const at::Tensor& chosen, const at::Tensor& rejected, const at::Tensor& margin);

// The model's outputs for right-padded rows on the model's device: [B, num_labels].
at::Tensor score_batch(const Transformer& m, const Batch& b, int64_t checkpointed_layers = 0);

// The model's outputs for each of `seqs`, in order, as doubles ([num_labels] each): batches of at
// most batch_size sequences of similar lengths, so that little is spent on padding.
std::vector<std::vector<double>> score_token_sequences(const Transformer& m,
                                                       const std::vector<std::vector<int32_t>>& seqs,
                                                       int64_t batch_size, int32_t pad_id);

// The tokens `aligner rm-score` scores for a record: "text" (+ EOS with enc.add_eos), "prompt" +
// "response", or a whole chat in "messages" or NeMo's "conversations" — encoded as the training
// data readers encode them (data/attribute_data.h, data/preference_data.h), so that a model is
// scored on what it was trained on.
std::vector<int32_t> scoring_tokens(const nlohmann::json& record, const std::string& where,
                                    const Encoder& enc);

}  // namespace aligner
