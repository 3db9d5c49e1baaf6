// Runs a tokenizer that loaded from fuzzed bytes: loading is only half of the attack surface, since
// a vocabulary, merge list or added-token table that passes the loader's checks is then used.
#pragma once
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "text/tokenizer.h"

namespace aligner::fuzz {

inline void probe_tokenizer(const Tokenizer& tok) {
  static const std::vector<std::string> kTexts = {
      "",
      "Hello world! How are you?",
      "  leading and trailing spaces  \n\n\ttabs\r\n",
      "caf\xc3\xa9 na\xc3\xafve \xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e \xf0\x9f\x98\x80 \xe2\x96\x81",
      "invalid utf-8: \xff\xfe \xc3 \xe2\x82 \xf0\x9f\x98",
      "<s>[INST] <|begin_of_text|><|im_start|>user\n12345 6789<|im_end|></s>",
      "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
  };
  for (const std::string& text : kTexts) {
    for (bool add_special : {false, true}) {
      std::vector<int32_t> ids = tok.encode(text, add_special);
      for (int32_t id : ids) {
        if (id < 0 || id >= tok.vocab_size()) {
          std::fprintf(stderr, "encode gave id %d outside the vocabulary (%lld)\n", id,
                       static_cast<long long>(tok.vocab_size()));
          std::abort();
        }
      }
      tok.decode(ids, false);
      tok.decode(ids, true);
    }
  }
  // Every id, as decode and id_to_token see them; the tokenizers bound ids by their vocabulary.
  const int64_t n = std::min<int64_t>(tok.vocab_size(), 4096);
  std::vector<int32_t> all;
  for (int32_t id = 0; id < n; ++id) {
    all.push_back(id);
    tok.token_to_id(tok.id_to_token(id));
  }
  tok.decode(all, false);
  tok.decode(all, true);
}

}  // namespace aligner::fuzz
