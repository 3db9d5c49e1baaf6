// A Hugging Face tokenizer.json (BPE model: byte-level or SentencePiece-style) loaded from arbitrary
// bytes and, when accepted, used.
#include "core/error.h"
#include "fuzz_util.h"
#include "text/bpe_tokenizer.h"
#include "tokenizer_probe.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string path = aligner::fuzz::write_scratch("tokenizer.json", data, size);
  try {
    auto tok = aligner::load_bpe_tokenizer(path);
    aligner::fuzz::probe_tokenizer(*tok);
  } catch (const aligner::Error&) {
  }
  return 0;
}
