// SteerLM's attribute labelling (`aligner steerlm label`), as NeMo-Aligner's
// examples/nlp/data/steerlm/attribute_annotate.py does it: every assistant reply of an SFT file is
// scored by a regression reward model on the conversation up to and including that reply, and its
// "label" becomes the scores clamped to [0, 4] and rounded, "quality:4,toxicity:0,...", in the
// model's attribute order. `aligner sft data.template=steerlm` then trains on replies conditioned on
// their labels, and `aligner generate gen.attributes=...` asks for a reply with given ones.
//
// Lines are written in input order, a group at a time; a stopped run started again keeps the
// complete lines already written (a partial last line is dropped) and goes on from there.
// configs/steerlm-label.yaml is the schema.
#pragma once
#include <string>
#include <vector>

#include "core/config.h"

namespace aligner {

// NeMo-Aligner's default SteerLM system prompt, which its labelling and regression-data scripts
// write into every text they score, whatever the line's own "system" is.
extern const char* const kNemoSteerlmSystemPrompt;

// NeMo's label of one reply from the reward model's outputs, in `attributes` order: each clamped to
// [0, 4] and rounded half to even (Python's round), "quality:4,toxicity:0,...". A score that is not
// finite is an error.
std::string steerlm_label_of_scores(const std::vector<std::string>& attributes,
                                    const std::vector<double>& scores);

void run_steerlm_label(const Config& cfg);

}  // namespace aligner
