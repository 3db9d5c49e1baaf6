// CRC-32C (Castagnoli): TensorBoard's record framing and the checksums of training checkpoints.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>

namespace aligner {

// The CRC of `bytes`, continuing from `crc` (the CRC of what came before, 0 for nothing), so that
// a large file can be checked in pieces. The CPU's CRC32 instruction where it has one (SSE 4.2):
// gigabytes of checkpoint per second rather than a few hundred megabytes.
uint32_t crc32c(std::string_view bytes, uint32_t crc = 0);

// The CRC and size of a whole file, read in pieces; an aligner::Error naming it if it cannot be read.
struct FileDigest {
  uint64_t bytes = 0;
  uint32_t crc32c = 0;
};
FileDigest file_digest(const std::string& path);

}  // namespace aligner
