// A tokenizer_config.json of arbitrary bytes beside a small valid tokenizer.json, loaded as a model
// folder's tokenizer is (special tokens, chat template).
#include <filesystem>

#include "core/error.h"
#include "fuzz_util.h"
#include "tokenizer_probe.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const bool copied = [] {
    std::filesystem::copy_file(ALIGNER_SOURCE_DIR "/fuzz/corpus/tokenizer_json/byte_level.json",
                               aligner::fuzz::scratch_dir() / "tokenizer.json");
    return true;
  }();
  (void)copied;
  aligner::fuzz::write_scratch("tokenizer_config.json", data, size);
  try {
    auto tok = aligner::load_tokenizer(aligner::fuzz::scratch_dir().string());
    aligner::fuzz::probe_tokenizer(*tok);
  } catch (const aligner::Error&) {
  }
  return 0;
}
