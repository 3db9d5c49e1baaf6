// decode_png on arbitrary bytes: chunk parsing, the zlib stream through io/inflate's DEFLATE
// decoder, row filters, palettes and Adam7; a header must never make it allocate more than the data
// decodes to. The same bytes also go to zlib_inflate as a zlib stream, since chunk CRCs keep most
// mutations of a PNG from reaching the decoder.
#include "io/png.h"
#include "io/inflate.h"

#include <string_view>

#include "core/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const at::Tensor image =
        aligner::decode_png(std::string_view(reinterpret_cast<const char*>(data), size), "fuzz.png");
    const auto* pixels = image.data_ptr<uint8_t>();
    uint8_t checksum = 0;
    for (int64_t i = 0; i < image.numel(); ++i) checksum ^= pixels[i];
    // Keeps the reads from being optimised away.
    volatile uint8_t sink = checksum;
    (void)sink;
  } catch (const aligner::Error&) {
  }
  try {
    aligner::zlib_inflate(std::string_view(reinterpret_cast<const char*>(data), size), size_t(1) << 22,
                          "fuzz.z");
  } catch (const aligner::Error&) {
  }
  return 0;
}
