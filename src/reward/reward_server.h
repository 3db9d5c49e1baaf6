// `aligner serve-reward`: a reward model behind HTTP, so that several training jobs (or one on
// other GPUs) share it. README.md "Reward server API" is the protocol:
//   GET  /health  the model, its labels, vocab_size, context and tokenizer fingerprint
//   POST /score   {"input_ids": [[...], ...]} or {"prompts": [...], "responses": [...]}
//                 -> {"rewards": [...]} (+ "scores": [[per label]] for several labels)
// A bad request is a 4xx with {"error": "..."} naming the field and index; nothing a client sends
// stops the server. HTTP threads parse requests and queue their sequences; one worker thread owns
// the model and scores whatever is queued together, so concurrent requests share forward passes.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "reward/reward_model.h"

namespace aligner {

struct RewardServerOptions {
  // The worker takes queued requests up to this many tokens (at least one request) and runs them
  // in forward passes of at most scorer.batch_size sequences and this many tokens with padding.
  int64_t max_tokens_per_batch = 16384;
  // Bounds on one request: together with the model's context they bound its tokens too.
  int64_t max_request_sequences = 4096;
  int64_t max_request_bytes = int64_t(64) << 20;
  int threads = 8;  // HTTP connections served at once
};

// The sequences of token ids a POST /score body asks to score, in order: {"input_ids": [[id, ...],
// ...]} as given (each non-empty, every id in [0, s.model.cfg.vocab_size)), or {"prompts": [...],
// "responses": [...]} (strings, as many of each) encoded by encode_for_scoring. At most
// opt.max_request_sequences of them; an empty list gives none. Reads only s.encoder (and the
// tokenizer it points to) and s.model.cfg.vocab_size, never the model's weights. Every bad body (not JSON, not an object, an unknown or
// missing field, a wrong type, an id outside the vocabulary, an empty sequence, too many
// sequences) is an aligner::Error naming the field and index ("request body: field
// \"input_ids[1][0]\": ..."), which the server answers with a 400; nothing else is thrown.
std::vector<std::vector<int32_t>> parse_score_request(const std::string& body, const RewardScorer& s,
                                                      const RewardServerOptions& opt);

class RewardServer {
 public:
  RewardServer(std::unique_ptr<RewardScorer> scorer, RewardServerOptions opt);
  ~RewardServer();  // stop()
  RewardServer(const RewardServer&) = delete;
  RewardServer& operator=(const RewardServer&) = delete;

  // Binds host:port (port 0: a free one, see port()) and serves on background threads until
  // stop(). An address that cannot be bound is an error naming it.
  void start(const std::string& host, int port);
  int port() const;
  // Stops accepting connections, answers the requests under way, and joins every thread. Safe to
  // call more than once.
  void stop();

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace aligner
