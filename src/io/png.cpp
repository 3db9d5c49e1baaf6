#include "io/png.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "core/error.h"
#include "core/json.h"
#include "io/hf_checkpoint.h"

namespace aligner {

namespace {

constexpr std::string_view kSignature("\x89PNG\r\n\x1a\n", 8);
// The largest chunk length PNG allows; IDAT is split well below it.
constexpr uint32_t kMaxChunk = 0x7fffffffu;
constexpr size_t kIdatChunk = size_t(1) << 20;
constexpr size_t kMaxStoredBlock = 65535;

void put_be32(std::string& out, uint32_t v) {
  const char b[4] = {char(v >> 24), char(v >> 16), char(v >> 8), char(v)};
  out.append(b, 4);
}

uint32_t get_be32(std::string_view s, size_t at) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data() + at);
  return uint32_t(p[0]) << 24 | uint32_t(p[1]) << 16 | uint32_t(p[2]) << 8 | uint32_t(p[3]);
}

void put_chunk(std::string& out, std::string_view type, std::string_view data) {
  put_be32(out, uint32_t(data.size()));
  const size_t start = out.size();
  out.append(type);
  out.append(data);
  put_be32(out, png_crc32(std::string_view(out).substr(start)));
}

int paeth(int a, int b, int c) {
  const int p = a + b - c, pa = std::abs(p - a), pb = std::abs(p - b), pc = std::abs(p - c);
  return pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
}

// The zlib stream of the image data, which must hold only stored blocks, into `expected` bytes.
std::string inflate_stored(std::string_view z, size_t expected, const std::string& where) {
  if (z.size() < 2) fail("{}: image data too short for a zlib header", where);
  const auto cmf = uint8_t(z[0]), flg = uint8_t(z[1]);
  if ((cmf & 0x0f) != 8 || (cmf >> 4) > 7 || (cmf * 256 + flg) % 31 != 0 || (flg & 0x20))
    fail("{}: image data does not start with a valid zlib header", where);
  std::string out;
  size_t pos = 2;
  for (bool final = false; !final;) {
    if (pos >= z.size()) fail("{}: image data ends inside the deflate stream", where);
    const auto header = uint8_t(z[pos]);
    final = header & 1;
    if (((header >> 1) & 3) != 0)
      fail(
          "{}: compressed PNG image data; only PNGs stored without compression (as aligner writes them) "
          "can be read",
          where);
    if (pos + 5 > z.size()) fail("{}: image data ends inside a stored block header", where);
    const size_t len = uint8_t(z[pos + 1]) | size_t(uint8_t(z[pos + 2])) << 8;
    const size_t nlen = uint8_t(z[pos + 3]) | size_t(uint8_t(z[pos + 4])) << 8;
    if ((len ^ nlen) != 0xffff) fail("{}: corrupt stored block length", where);
    pos += 5;
    if (len > z.size() - pos) fail("{}: image data ends inside a stored block", where);
    if (len > expected - out.size()) fail("{}: more image data than the header's size needs", where);
    out.append(z.substr(pos, len));
    pos += len;
  }
  if (pos + 4 > z.size()) fail("{}: image data ends before its Adler-32 checksum", where);
  if (get_be32(z, pos) != adler32(out)) fail("{}: image data fails its Adler-32 checksum", where);
  if (out.size() != expected)
    fail("{}: {} bytes of image data, the header's size needs {}", where, out.size(), expected);
  return out;
}

}  // namespace

uint32_t png_crc32(std::string_view bytes, uint32_t crc) {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int bit = 0; bit < 8; ++bit) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
      t[i] = c;
    }
    return t;
  }();
  crc = ~crc;
  for (unsigned char b : bytes) crc = table[(crc ^ b) & 0xff] ^ (crc >> 8);
  return ~crc;
}

uint32_t adler32(std::string_view bytes, uint32_t adler) {
  constexpr uint32_t kMod = 65521;
  uint32_t a = adler & 0xffff, b = adler >> 16;
  // 5552 bytes is the most that cannot overflow b before the modulo (zlib's NMAX).
  for (size_t start = 0; start < bytes.size(); start += 5552) {
    const size_t end = std::min(bytes.size(), start + 5552);
    for (size_t i = start; i < end; ++i) {
      a += uint8_t(bytes[i]);
      b += a;
    }
    a %= kMod;
    b %= kMod;
  }
  return b << 16 | a;
}

std::string encode_png(const at::Tensor& image_in) {
  if (image_in.scalar_type() != at::kByte)
    fail("png: image must be uint8, got {}", c10::toString(image_in.scalar_type()));
  const auto image = (image_in.dim() == 2 ? image_in.unsqueeze(-1) : image_in).to(at::kCPU).contiguous();
  if (image.dim() != 3 || image.size(2) < 1 || image.size(2) > 4 || image.size(0) < 1 || image.size(1) < 1)
    fail("png: image must be [H, W, C] with C in 1..4 (or [H, W]), got [{}]",
         fmt::join(image_in.sizes(), ", "));
  const int64_t h = image.size(0), w = image.size(1), c = image.size(2);
  if (h > kMaxChunk || w > kMaxChunk) fail("png: image [{}, {}] is larger than PNG allows", h, w);
  static constexpr uint8_t kColorType[] = {0, 0, 4, 2, 6};

  std::string ihdr;
  put_be32(ihdr, uint32_t(w));
  put_be32(ihdr, uint32_t(h));
  ihdr +=
      {8, char(kColorType[c]), 0, 0, 0};  // bit depth, colour type, deflate, adaptive filters, no interlace

  // Filter type 0 (none) before every row: nothing to gain from filters without compression.
  const size_t row = size_t(w * c);
  std::string raw;
  raw.reserve(size_t(h) * (row + 1));
  const auto* pixels = reinterpret_cast<const char*>(image.data_ptr<uint8_t>());
  for (int64_t y = 0; y < h; ++y) {
    raw += '\0';
    raw.append(pixels + y * row, row);
  }

  std::string z = "\x78\x01";  // deflate, 32K window, no dictionary, "fastest" level
  for (size_t pos = 0; pos < raw.size(); pos += kMaxStoredBlock) {
    const size_t len = std::min(kMaxStoredBlock, raw.size() - pos);
    z += char(pos + len == raw.size() ? 1 : 0);  // BFINAL, BTYPE 00
    z += {char(len & 0xff), char(len >> 8), char(~len & 0xff), char((~len >> 8) & 0xff)};
    z.append(raw, pos, len);
  }
  put_be32(z, adler32(raw));

  std::string out(kSignature);
  put_chunk(out, "IHDR", ihdr);
  for (size_t pos = 0; pos < z.size(); pos += kIdatChunk)
    put_chunk(out, "IDAT", std::string_view(z).substr(pos, kIdatChunk));
  put_chunk(out, "IEND", {});
  return out;
}

void write_png(const std::string& path, const at::Tensor& image) {
  write_text_atomically(path, encode_png(image));
}

at::Tensor decode_png(std::string_view bytes, const std::string& where) {
  if (bytes.substr(0, kSignature.size()) != kSignature) fail("{}: not a PNG file (no PNG signature)", where);
  size_t pos = kSignature.size();
  int64_t w = 0, h = 0, c = 0;
  std::string z;
  bool header = false, end = false;
  while (!end) {
    if (bytes.size() - pos < 12) fail("{}: truncated PNG (no IEND chunk)", where);
    const uint32_t len = get_be32(bytes, pos);
    if (len > kMaxChunk || len > bytes.size() - pos - 12)
      fail("{}: truncated or corrupt chunk at byte {}", where, pos);
    const std::string_view type = bytes.substr(pos + 4, 4), data = bytes.substr(pos + 8, len);
    for (char ch : type)
      if (!std::isalpha(uint8_t(ch))) fail("{}: corrupt chunk type at byte {}", where, pos);
    if (get_be32(bytes, pos + 8 + len) != png_crc32(bytes.substr(pos + 4, 4 + size_t(len))))
      fail("{}: chunk {} at byte {} fails its CRC", where, type, pos);
    pos += 12 + size_t(len);

    if (!header && type != "IHDR") fail("{}: the first chunk is {}, not IHDR", where, type);
    if (type == "IHDR") {
      if (header) fail("{}: two IHDR chunks", where);
      if (len != 13) fail("{}: IHDR of {} bytes (13 expected)", where, len);
      header = true;
      w = get_be32(data, 0);
      h = get_be32(data, 4);
      if (w < 1 || h < 1 || w > kMaxChunk || h > kMaxChunk) fail("{}: invalid image size {}x{}", where, w, h);
      const auto depth = uint8_t(data[8]), color = uint8_t(data[9]);
      if (depth != 8) fail("{}: bit depth {}; only 8-bit PNGs can be read", where, depth);
      switch (color) {
        case 0:
          c = 1;
          break;
        case 4:
          c = 2;
          break;
        case 2:
          c = 3;
          break;
        case 6:
          c = 4;
          break;
        default:
          fail("{}: colour type {}; only gray, gray + alpha, RGB and RGBA PNGs can be read", where, color);
      }
      if (data[10] != 0 || data[11] != 0) fail("{}: unknown compression or filter method", where);
      if (data[12] != 0) fail("{}: interlaced PNGs cannot be read", where);
    } else if (type == "IDAT") {
      z.append(data);
    } else if (type == "IEND") {
      end = true;
    } else if (std::isupper(uint8_t(type[0])) && type != "PLTE") {
      // A critical chunk changes how the image reads; one not known here cannot be skipped.
      fail("{}: unknown critical chunk {}", where, type);
    }
  }

  // Both under 2^31, so neither product overflows 64 bits.
  // inflate_stored reads no more than the file holds and checks that it is `expected` bytes, before
  // anything of the header's size is allocated.
  const size_t row = size_t(w) * size_t(c), expected = size_t(h) * (row + 1);
  const std::string raw = inflate_stored(z, expected, where);

  auto image = at::empty({h, w, c}, at::kByte);
  uint8_t* out = image.data_ptr<uint8_t>();
  const auto* in = reinterpret_cast<const uint8_t*>(raw.data());
  for (int64_t y = 0; y < h; ++y) {
    const uint8_t filter = in[y * (row + 1)];
    const uint8_t* src = in + y * (row + 1) + 1;
    uint8_t* dst = out + y * row;
    const uint8_t* up = y > 0 ? dst - row : nullptr;
    for (size_t x = 0; x < row; ++x) {
      const int a = x >= size_t(c) ? dst[x - c] : 0, b = up ? up[x] : 0,
                d = x >= size_t(c) && up ? up[x - c] : 0;
      int pred = 0;
      switch (filter) {
        case 0:
          pred = 0;
          break;
        case 1:
          pred = a;
          break;
        case 2:
          pred = b;
          break;
        case 3:
          pred = (a + b) / 2;
          break;
        case 4:
          pred = paeth(a, b, d);
          break;
        default:
          fail("{}: row {} has unknown filter type {}", where, y, filter);
      }
      dst[x] = uint8_t(src[x] + pred);
    }
  }
  return image;
}

at::Tensor read_png(const std::string& path) {
  return decode_png(read_text_file(path), path);
}

at::Tensor image_grid(const at::Tensor& images, int64_t columns, bool minus_one_to_one) {
  if (images.dim() != 4 || images.size(0) < 1 || (images.size(1) != 1 && images.size(1) != 3))
    fail("image_grid: images must be [N, C, H, W] with N >= 1 and C 1 or 3, got [{}]",
         fmt::join(images.sizes(), ", "));
  if (columns < 1) fail("image_grid: {} columns", columns);
  auto pixels = images.detach().to(at::kCPU);
  if (pixels.scalar_type() != at::kByte) {
    if (!pixels.is_floating_point())
      fail("image_grid: images must be floating point or uint8, got {}", c10::toString(images.scalar_type()));
    pixels = pixels.to(at::kFloat);
    if (minus_one_to_one) pixels = pixels / 2 + 0.5;
    pixels = (pixels.clamp(0, 1) * 255).round().to(at::kByte);
  }
  const int64_t n = pixels.size(0), c = pixels.size(1), h = pixels.size(2), w = pixels.size(3);
  const int64_t cols = columns, rows = (n + cols - 1) / cols;
  auto grid = at::zeros({rows * h, cols * w, c}, at::kByte);
  for (int64_t i = 0; i < n; ++i)
    grid.narrow(0, (i / cols) * h, h).narrow(1, (i % cols) * w, w).copy_(pixels[i].permute({1, 2, 0}));
  return grid;
}

}  // namespace aligner
