// Text generation on a model's live weights (no copy, no reload), for `aligner generate` and for
// online training (PPO, REINFORCE, rejection sampling), which generates with the policy it trains.
//
// Sequences are decoded together in a fixed number of slots of a preallocated KV cache. Prompts
// are prefilled in right-padded batches (nothing attends to padding, so causal attention needs no
// mask and only the padding itself is wasted), each decoding step runs every live slot at its own
// position, and when a sequence finishes the next waiting prompt is prefilled into its slot
// (continuous batching). The cached forward computes what forward_hidden + lm_logits compute for
// the whole sequence, with the same building blocks (model/layers.h).
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/progress.h"
#include "gen/kv_cache.h"
#include "gen/sampling.h"
#include "model/transformer.h"
#include "text/tokenizer.h"

namespace aligner {

// The longest sequence (prompt + generated) generated with a model: max_position_embeddings; for
// dynamic rope its original context, past which transformers rescales every position with the
// length, which keys cached at earlier lengths cannot follow.
int64_t context_length(const ModelConfig& cfg);

// Runs prompts through the model and caches their keys/values: prompt i goes into each slot of
// slots[i] (several when it is sampled several times; it is computed once) and those slots'
// lengths become its length. Returns the logits at the last prompt token, one row per slot, in
// the order of `slots` flattened: [slots, vocab].
at::Tensor prefill(const Transformer& m, KvCache& cache, const std::vector<std::vector<int32_t>>& prompts,
                   const std::vector<std::vector<int64_t>>& slots);
// One decoding step of slots [0, n): tokens [n] int64 (on the model's device) go in at each slot's
// length, their keys/values are cached there, and the lengths advance (clamped to the cache, so
// that a slot holding no sequence, whose output nobody reads, stays in bounds). Attention reads
// cached positions [0, span) masked to each slot's own past (and sliding window); span must exceed
// every live slot's length. Returns logits [n, vocab].
at::Tensor decode_step(const Transformer& m, KvCache& cache, const at::Tensor& tokens, int64_t span);

enum class FinishReason {
  kStop,    // an EOS id, a stop id or a stop string
  kLength,  // max_new_tokens, or the model's context
};
std::string finish_reason_name(FinishReason r);  // "stop" | "length"

// What generate() keeps between calls when the caller passes one (online training generates every
// step with the same shapes): the KV cache and, on CUDA, the decoder with its captured graphs,
// reused while the model object, the slots, the cache length and the sampling settings stay the
// same. The graphs read the weights where they are, so training them in place between calls is
// fine. Not for calls from several threads at once.
struct DecodeSession;
std::shared_ptr<DecodeSession> make_decode_session();

struct GenerationOptions {
  int64_t max_new_tokens = 256;
  SamplingParams sampling;
  int64_t num_samples = 1;  // completions per prompt
  // The draws of one call depend on the seed and on the schedule (batch_size, prefill_tokens,
  // the prompts): callers that want new samples for the same prompts pass a new seed.
  uint64_t seed = 0;
  int64_t batch_size = 0;          // sequences decoded together (KV cache slots); 0: all at once
  int64_t prefill_tokens = 16384;  // padded prompt tokens per prefill batch (at least one prompt)
  // Stop at the model's eos_token_ids and, when `tokenizer` is given, the tokenizer's EOS.
  bool stop_at_eos = true;
  std::vector<int64_t> stop_ids;
  // Stop once the decoded response contains one of these (the token that completes it is kept;
  // response_text cuts the text there).
  std::vector<std::string> stop_strings;
  const Tokenizer* tokenizer = nullptr;  // needed for stop_strings; not owned
  // On CUDA, decode with the captured graph and fused kernels of gen/cuda_decoder.h where the
  // model allows; false: the ATen step everywhere (the reference that tests compare them with).
  bool cuda_kernels = true;
  // Kept from one call to the next (see DecodeSession); nullptr: made for this call only.
  std::shared_ptr<DecodeSession> session;
  // Called after every step with the sequences finished and the tokens generated so far.
  std::function<void(int64_t finished, int64_t generated_tokens)> on_step;
};

struct GeneratedSequence {
  int64_t prompt_index = 0, sample_index = 0;
  std::vector<int32_t> tokens;  // the response; ends with the stop id when stopped by one
  // log p(token | everything before it) under the model's own distribution (log_softmax of the
  // logits at temperature 1, before any filtering): what a policy-gradient loss compares with
  // the training forward, whatever the sampling settings were.
  std::vector<float> logprobs;
  FinishReason finish = FinishReason::kLength;
};

// A response as `aligner generate` reports it: its text, decoded without special tokens, and the
// number of its leading tokens that make that text. A response ended by a stop string is cut before
// the stop string (after it with include_stop; the one that completed first, when several are in
// the text); the tokens kept are the fewest whose text covers what is left, so a token that the cut
// falls inside stays and the tokens wholly past the cut go. Others: the whole text and all tokens.
struct ResponseText {
  std::string text;
  size_t tokens = 0;
};
ResponseText response_text(const GeneratedSequence& s, const Tokenizer& tok,
                           const std::vector<std::string>& stop_strings, bool include_stop);

struct GenerationResult {
  std::vector<GeneratedSequence> sequences;  // prompt-major: prompt * num_samples + sample
  int64_t generated_tokens = 0;
};

// "generated 12/64 completions, 3,456 tokens, 1,234 tok/s, ETA 3s" in the log through `progress`
// (every 10 s, and with `always`): what on_step reports, for a job of `total` completions.
void report_generation(JobProgress& progress, int64_t finished, int64_t total, int64_t tokens, bool always);

// Errors name the option and the value given; generate() calls it first.
void check_generation_options(const GenerationOptions& opt);

// Generates num_samples responses to each prompt under NoGradGuard, with the model's dtype and
// device. An empty prompt, a prompt that leaves no room in context_length, a token outside the
// vocabulary and bad options are errors naming the prompt index or the option.
GenerationResult generate(const Transformer& m, const std::vector<std::vector<int32_t>>& prompts,
                          const GenerationOptions& opt);

// Prompt + response per row, right-padded, on `device`, laid out as the training forward and
// token_logprobs take them: token_logprobs(m, forward_hidden(m, {input_ids, attention_mask,
// position_ids}), labels) gives the current policy's log-probs at the same places as `logprobs`.
struct GenerationBatch {
  at::Tensor input_ids;       // [N, T] int64, pad_id after the response
  at::Tensor attention_mask;  // [N, T] int64
  at::Tensor position_ids;    // [N, T] int64, 0 on padding
  at::Tensor labels;          // [N, T] int64: the next token where it is a response token, else -100
  at::Tensor response_mask;   // [N, T] float32: 1 where labels is a response token
  at::Tensor logprobs;        // [N, T] float32: the generation-time log-prob of labels, 0 elsewhere
};
GenerationBatch collate_generations(const std::vector<std::vector<int32_t>>& prompts,
                                    const GenerationResult& result, int32_t pad_id, at::Device device);

}  // namespace aligner
