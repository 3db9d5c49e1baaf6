// read_prompts on arbitrary bytes as one webdataset shard: tar::File checks every header and size
// against the file, then each sample's txt member is read and checked; nothing may read past the end.
#include "core/error.h"
#include "fuzz_util.h"
#include "io/prompt_source.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string path = aligner::fuzz::write_scratch("shard.tar", data, size);
  try {
    size_t bytes = 0;
    for (const auto& prompt : aligner::read_prompts(path, "prompt")) bytes += prompt.size();
    // Keeps the reads from being optimised away.
    volatile size_t sink = bytes;
    (void)sink;
  } catch (const aligner::Error&) {
  }
  return 0;
}
