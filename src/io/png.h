// PNG files without zlib: written with "stored" (uncompressed) deflate blocks, which every PNG
// reader accepts (the images are small: samples, a synthetic data set, so the missing compression
// costs little disk), and read whatever wrote them, through io/inflate's own DEFLATE decoder.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <string_view>

namespace aligner {

// PNG's (and zlib's, gzip's) CRC-32: the reflected polynomial 0xEDB88320, not core/crc32c's
// Castagnoli one. `crc` continues a CRC over earlier bytes (0 for none).
uint32_t png_crc32(std::string_view bytes, uint32_t crc = 0);
// zlib's Adler-32 checksum of the uncompressed data, continuing from `adler` (1 for none).
uint32_t adler32(std::string_view bytes, uint32_t adler = 1);

// The PNG file of a uint8 image [H, W, C] (C = 1 gray, 2 gray + alpha, 3 RGB, 4 RGBA) or [H, W]
// (gray), on any device. A non-uint8 tensor or another shape is an error.
std::string encode_png(const at::Tensor& image);
// encode_png written to "<path>.tmp" and renamed onto `path`, so a crash never leaves a
// half-written image under its name.
void write_png(const std::string& path, const at::Tensor& image);

// A PNG as a uint8 CPU tensor [H, W, C]: C = 1 gray, 2 gray + alpha, 3 RGB, 4 RGBA, palette images
// as RGB (RGBA when tRNS gives the palette alpha; other colour types' tRNS is ignored). Every bit
// depth and Adam7 interlacing are read: 16-bit samples keep their high byte, 1, 2 and 4-bit gray is
// scaled to 0..255. Everything is checked against the file's size (chunk lengths, CRCs, the zlib
// stream, row filters, palette indices) and an image over 1 GiB decoded is refused before anything
// of its size is allocated; any of these is a one-line error that starts with `where`.
at::Tensor decode_png(std::string_view bytes, const std::string& where);
at::Tensor read_png(const std::string& path);

// images [N, C, H, W] (C = 1 or 3) as one uint8 image [rows H, columns W, C], row by row, the
// cells after the last image black. Floating-point images are in [-1, 1] when `minus_one_to_one`
// (a VAE's output), else [0, 1]; they are clamped and rounded to 0..255 as diffusers' numpy_to_pil
// does. uint8 images are taken as they are.
at::Tensor image_grid(const at::Tensor& images, int64_t columns, bool minus_one_to_one);

}  // namespace aligner
