// safetensors::File::open on arbitrary bytes, then every tensor it accepts read in full: a header
// that passes validation must never let a read leave the mapping.
#include "io/safetensors.h"

#include "core/error.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string path = aligner::fuzz::write_scratch("model.safetensors", data, size);
  try {
    auto file = aligner::safetensors::File::open(path);
    uint8_t checksum = 0;
    for (const auto& info : file.tensors()) {
      at::Tensor t = file.get(info.name);
      const auto* bytes = static_cast<const uint8_t*>(t.data_ptr());
      for (size_t i = 0; i < t.nbytes(); ++i) checksum ^= bytes[i];
    }
    // Keeps the reads from being optimised away.
    volatile uint8_t sink = checksum;
    (void)sink;
  } catch (const aligner::Error&) {
  }
  return 0;
}
