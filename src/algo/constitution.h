// The files that steer Constitutional AI (Bai et al. 2022): the constitution and the few-shot
// exchanges shown before a critique.
//
// The constitution is read in NeMo-Aligner's layout (its examples/nlp/cai
// CritiqueRevisionInstructions.json, Anthropic's own): a JSON object of named principles,
//   {"NAME": {"prompt": ["critique request", ...], "edit_request": "revision request"}, ...}
// with, ours and optional, "compare": the multiple-choice question `aligner cai compare` asks the
// judge under that principle. Anthropic's wrapping of the requests ("\n\nCritiqueRequest: ...
// \n\nCritique:", "\n\nRevisionRequest: ...\n\nRevision:") is cut off, as NeMo-Aligner's script
// cuts it, leaving the request itself.
#pragma once
#include <string>
#include <vector>

#include "text/chat_template.h"

namespace aligner {

struct Principle {
  std::string name;
  std::vector<std::string> critique_requests;  // "prompt": one is drawn for each critique
  std::string revision_request;                // "edit_request"
  // "compare"; without it: which response would need fewer changes to satisfy the revision request.
  std::string comparison;
};

// The principles in file order. A file that is not such an object, a principle without critique
// requests or a revision request, or with an empty one, is an error naming the file, the principle
// and the key.
std::vector<Principle> read_constitution(const std::string& path);

// Few-shot critiques and revisions: JSONL, each line one exchange {"messages": [prompt, response,
// critique request, critique, revision request, revision]}, user and assistant turns in turn. All of
// them, one after the other; a line of another shape is an error naming its line and field.
std::vector<Message> read_few_shot(const std::string& path);

}  // namespace aligner
