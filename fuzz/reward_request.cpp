// A POST /score body of arbitrary bytes parsed as `aligner serve-reward` parses what a client sends
// (parse_score_request): token ids checked against the vocabulary, or prompts and responses encoded
// with a real tokenizer. The scorer has the tokenizer, its encoder and a config but no weights:
// parsing reads none, and a request that did would crash here.
#include "core/error.h"
#include "reward/reward_server.h"
#include "text/chat_template.h"

namespace {

using namespace aligner;

const RewardScorer& scorer() {
  static const std::unique_ptr<RewardScorer> s = [] {
    auto s = std::make_unique<RewardScorer>();
    s->path = "fuzz";
    s->tok = load_tokenizer(ALIGNER_SOURCE_DIR "/tests/fixtures/tokenizers/llama3-style-bpe6k");
    // As load_reward_scorer sets them up, from a reward model of that vocabulary.
    s->model.cfg.vocab_size = 6000;
    s->model.cfg.max_position_embeddings = 64;
    s->model.cfg.num_labels = 1;
    s->encoder = Encoder{s->tok.get(), resolve_chat_template("plain", *s->tok), true};
    s->fingerprint = tokenizer_fingerprint(*s->tok);
    s->weights = {1.0};
    return s;
  }();
  return *s;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const RewardScorer& s = scorer();
  // A small limit on sequences, so that the fuzzer reaches it too.
  RewardServerOptions opt;
  opt.max_request_sequences = 8;
  try {
    const auto seqs = parse_score_request(std::string(reinterpret_cast<const char*>(data), size), s, opt);
    // What the server goes on to rely on.
    if (int64_t(seqs.size()) > opt.max_request_sequences) std::abort();
    for (const auto& ids : seqs) {
      if (ids.empty()) std::abort();
      for (const int32_t id : ids)
        if (id < 0 || id >= s.model.cfg.vocab_size) std::abort();
    }
  } catch (const Error&) {
  }
  return 0;
}
