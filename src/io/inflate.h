// zlib streams (RFC 1950) of DEFLATE data (RFC 1951) decompressed without zlib, for reading PNG
// files that other programs wrote. The input is untrusted: every read is checked against its end,
// and the output never grows past a caller's bound, so a decompression bomb fails cleanly.
#pragma once
#include <cstddef>
#include <string>
#include <string_view>

namespace aligner {

// The data of the zlib stream at the start of `in` (any bytes after its Adler-32 are ignored, as PNG
// readers do). A stream that is malformed (bad header, preset dictionary, bad block type, bad
// Huffman code lengths, a distance before the start of the output, a bad Adler-32), ends early, or
// would produce more than `max_out` bytes is a one-line error that starts with `where`.
std::string zlib_inflate(std::string_view in, size_t max_out, const std::string& where);

}  // namespace aligner
