// A SentencePiece tokenizer.model (protobuf) loaded from arbitrary bytes and, when accepted, used.
#include "core/error.h"
#include "fuzz_util.h"
#include "text/sentencepiece_tokenizer.h"
#include "tokenizer_probe.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string path = aligner::fuzz::write_scratch("tokenizer.model", data, size);
  try {
    auto tok = aligner::load_sentencepiece_tokenizer(path);
    aligner::fuzz::probe_tokenizer(*tok);
  } catch (const aligner::Error&) {
  }
  return 0;
}
