// Constitutional AI (Bai et al. 2022, "Constitutional AI: Harmlessness from AI Feedback"): the two
// data-making stages, after which training is the usual sft, rm and ppo or dpo.
//
// `aligner cai critique` (supervised stage, configs/cai-critique.yaml): the model answers each
// prompt, critiques its answer by a critique request of a principle drawn at random from the
// constitution, then revises the answer by that principle's revision request, the few-shot
// exchanges shown before the critique. The revisions become SFT lines in NeMo's conversation
// layout.
//
// `aligner cai compare` (RL stage, configs/cai-compare.yaml): the model answers each prompt once
// per temperature; for each pair of its answers a judge is asked the multiple-choice question of a
// principle drawn at random, the two answers as options (A) and (B) in a random order. A judge
// model in this process answers by the log-probabilities of the two replies, normalised over the
// pair (the paper's method); an OpenAI-compatible chat endpoint by the log-probabilities of the
// tokens "A" and "B" at the first answer position whose top log-probs list one, else by the letter
// its text gives. The pairs are written as TRL preference lines, with the judge's probability of
// the chosen answer as the margin that aligner rm subtracts.
//
// Both append to --out as they go and continue what it holds (io/resumable_jsonl.h). Every draw
// comes from gen.seed: a prompt's principle and option order from the seed and the prompt's index,
// sampling from the seed and the index of its batch of prompts_per_batch prompts, so a continued
// run writes what an uninterrupted one writes.
#pragma once
#include <array>
#include <nlohmann/json.hpp>
#include <string>

#include "core/config.h"
#include "data/examples.h"
#include "text/chat_template.h"
#include "text/tokenizer.h"

namespace aligner {

void run_cai_critique(const Config& cfg);
void run_cai_compare(const Config& cfg);

// The conversation a prompt line gives, up to its last user turn: "prompt" (a string is one user
// turn, or a list of messages), "messages" or NeMo's "conversations". Errors name `where` and the
// field.
Conversation cai_prompt(const nlohmann::json& record, const std::string& where);

// The question put to the judge: the conversation, the principle's question, the two answers as
// options (A) and (B).
std::string judge_question(const Conversation& prompt, const std::string& comparison, const std::string& a,
                           const std::string& b);

// What a judge model scores for a question: the question as a user turn in its chat template, then
// the reply "The answer is: (A)", or "(B)", the loss mask on the reply. The judge prefers (A) with
// probability sigmoid(log p(reply A) - log p(reply B)).
std::array<Sequence, 2> judge_sequences(const ChatTemplate& tmpl, const Tokenizer& tok,
                                        const std::string& question);

}  // namespace aligner
