#include "io/png.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string_view>
#include <vector>

#include "core/error.h"
#include "core/json.h"
#include "io/hf_checkpoint.h"
#include "io/inflate.h"

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

const std::array<uint8_t, 4>& palette_entry(const std::vector<std::array<uint8_t, 4>>& palette, int index,
                                            const std::string& where) {
  if (size_t(index) >= palette.size())
    fail("{}: pixel of palette index {}, the palette has {} entries", where, index, palette.size());
  return palette[size_t(index)];
}

// Adam7's seven passes (first column, first row, column step, row step), and the one "pass" of a
// non-interlaced image.
struct Pass {
  int64_t x0, y0, dx, dy;
};
constexpr Pass kAdam7[7] = {{0, 0, 8, 8}, {4, 0, 8, 8}, {0, 4, 4, 8}, {2, 0, 4, 4},
                            {0, 2, 2, 4}, {1, 0, 2, 2}, {0, 1, 1, 2}};
constexpr Pass kWhole[1] = {{0, 0, 1, 1}};

// The largest image aligner reads, decoded and as filtered image data (16384 x 16384 RGBA): a header
// cannot make it allocate more, whatever the compressed data would inflate to.
constexpr size_t kMaxImageBytes = size_t(1) << 30;

// Undoes the row filters of `rows` rows of `row_bytes` bytes, each after its filter-type byte, in
// place; `bpp` is the filters' byte distance to the pixel on the left (at least 1).
void unfilter(uint8_t* data, int64_t rows, size_t row_bytes, size_t bpp, const std::string& where) {
  const std::vector<uint8_t> zeros(row_bytes);
  for (int64_t y = 0; y < rows; ++y) {
    uint8_t* cur = data + size_t(y) * (row_bytes + 1) + 1;
    const uint8_t* up = y > 0 ? cur - (row_bytes + 1) : zeros.data();
    const size_t left = std::min(bpp, row_bytes);
    switch (cur[-1]) {
      case 0:
        break;
      case 1:
        for (size_t x = bpp; x < row_bytes; ++x) cur[x] = uint8_t(cur[x] + cur[x - bpp]);
        break;
      case 2:
        for (size_t x = 0; x < row_bytes; ++x) cur[x] = uint8_t(cur[x] + up[x]);
        break;
      case 3:
        for (size_t x = 0; x < left; ++x) cur[x] = uint8_t(cur[x] + up[x] / 2);
        for (size_t x = bpp; x < row_bytes; ++x) cur[x] = uint8_t(cur[x] + (cur[x - bpp] + up[x]) / 2);
        break;
      case 4:
        for (size_t x = 0; x < left; ++x) cur[x] = uint8_t(cur[x] + up[x]);
        for (size_t x = bpp; x < row_bytes; ++x)
          cur[x] = uint8_t(cur[x] + paeth(cur[x - bpp], up[x], up[x - bpp]));
        break;
      default:
        fail("{}: row {} has unknown filter type {}", where, y, cur[-1]);
    }
  }
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
  int64_t w = 0, h = 0;
  int depth = 0, color = 0, samples = 0;  // samples per pixel in the file
  bool interlaced = false;
  // Palette entries as RGBA, the alpha from tRNS (opaque where it has none).
  std::vector<std::array<uint8_t, 4>> palette;
  bool transparent_palette = false;
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
      depth = uint8_t(data[8]);
      color = uint8_t(data[9]);
      // Each colour type's samples per pixel, and the bit depths PNG allows for it as a bit set.
      static const std::map<int, std::pair<int, unsigned>> kColorTypes = {
          {0, {1, 1u << 1 | 1u << 2 | 1u << 4 | 1u << 8 | 1u << 16}},
          {2, {3, 1u << 8 | 1u << 16}},
          {3, {1, 1u << 1 | 1u << 2 | 1u << 4 | 1u << 8}},
          {4, {2, 1u << 8 | 1u << 16}},
          {6, {4, 1u << 8 | 1u << 16}}};
      const auto it = kColorTypes.find(color);
      if (it == kColorTypes.end()) fail("{}: unknown colour type {}", where, color);
      if (depth > 16 || !(it->second.second >> depth & 1))
        fail("{}: bit depth {} is invalid for colour type {}", where, depth, color);
      samples = it->second.first;
      if (data[10] != 0 || data[11] != 0) fail("{}: unknown compression or filter method", where);
      if (uint8_t(data[12]) > 1) fail("{}: unknown interlace method {}", where, uint8_t(data[12]));
      interlaced = data[12] == 1;
    } else if (type == "PLTE") {
      if (!palette.empty()) fail("{}: two PLTE chunks", where);
      if (!z.empty()) fail("{}: PLTE after image data", where);
      if (len == 0 || len % 3 != 0 || len > 3 * 256) fail("{}: PLTE of {} bytes", where, len);
      for (size_t i = 0; i < len; i += 3)
        palette.push_back({uint8_t(data[i]), uint8_t(data[i + 1]), uint8_t(data[i + 2]), 255});
    } else if (type == "tRNS" && color == 3) {
      // Other colour types' single transparent colour is ignored: their pixels are read as they are.
      if (palette.empty()) fail("{}: tRNS before PLTE", where);
      if (len > palette.size())
        fail("{}: tRNS of {} entries for a palette of {}", where, len, palette.size());
      for (size_t i = 0; i < len; ++i) palette[i][3] = uint8_t(data[i]);
      transparent_palette = true;
    } else if (type == "IDAT") {
      z.append(data);
    } else if (type == "IEND") {
      end = true;
    } else if (std::isupper(uint8_t(type[0]))) {
      // A critical chunk changes how the image reads; one not known here cannot be skipped.
      fail("{}: unknown critical chunk {}", where, type);
    }
  }
  if (color == 3 && palette.empty()) fail("{}: palette image without a PLTE chunk", where);
  if (z.empty()) fail("{}: no image data (IDAT)", where);

  // Palette images become RGB (RGBA with tRNS); 16-bit samples keep their high byte, gray of 1, 2
  // or 4 bits is scaled to 0..255.
  const int64_t c = color == 3 ? (transparent_palette ? 4 : 3) : samples;
  if (size_t(w) * size_t(h) > kMaxImageBytes / size_t(c))
    fail("{}: image of {}x{} pixels is larger than aligner reads ({} bytes)", where, w, h, kMaxImageBytes);
  const size_t bits_per_pixel = size_t(samples) * size_t(depth),
               bpp = std::max<size_t>(1, bits_per_pixel / 8);
  const Pass* const passes = interlaced ? kAdam7 : kWhole;
  const int num_passes = interlaced ? 7 : 1;
  // Each pass's size in pixels and its filtered data's row length; passes without pixels hold no data.
  auto pass_size = [&](const Pass& p) {
    const int64_t pw = w > p.x0 ? (w - p.x0 + p.dx - 1) / p.dx : 0,
                  ph = h > p.y0 ? (h - p.y0 + p.dy - 1) / p.dy : 0;
    return std::array<int64_t, 3>{pw, ph, int64_t((size_t(pw) * bits_per_pixel + 7) / 8)};
  };
  size_t expected = 0;  // under 2^30 pixels of at most 8 bytes: no overflow
  for (int i = 0; i < num_passes; ++i) {
    const auto [pw, ph, row_bytes] = pass_size(passes[i]);
    if (pw > 0) expected += size_t(ph) * size_t(row_bytes + 1);
  }
  if (expected > kMaxImageBytes)
    fail("{}: image of {}x{} pixels is larger than aligner reads ({} bytes)", where, w, h, kMaxImageBytes);
  std::string raw = zlib_inflate(z, expected, where);
  if (raw.size() != expected)
    fail("{}: {} bytes of image data, the header's size needs {}", where, raw.size(), expected);

  auto image = at::empty({h, w, c}, at::kByte);
  uint8_t* out = image.data_ptr<uint8_t>();
  auto* data = reinterpret_cast<uint8_t*>(raw.data());
  const int max_sample = (1 << std::min(depth, 8)) - 1;
  for (int pass = 0; pass < num_passes; ++pass) {
    const Pass& p = passes[pass];
    const auto [pw, ph, row_bytes] = pass_size(p);
    if (pw == 0 || ph == 0) continue;
    unfilter(data, ph, size_t(row_bytes), bpp, where);
    for (int64_t r = 0; r < ph; ++r, data += row_bytes + 1) {
      const uint8_t* row = data + 1;
      uint8_t* dst_row = out + size_t((p.y0 + r * p.dy) * w) * size_t(c);
      if (depth == 8 && color != 3 && !interlaced) {
        std::memcpy(dst_row, row, size_t(row_bytes));
        continue;
      }
      for (int64_t i = 0; i < pw; ++i) {
        uint8_t* dst = dst_row + size_t(p.x0 + i * p.dx) * size_t(c);
        if (depth >= 8) {
          // A 16-bit sample's high byte comes first.
          const uint8_t* src = row + size_t(i) * size_t(samples) * size_t(depth / 8);
          for (int k = 0; k < samples; ++k) {
            const uint8_t v = src[k * (depth / 8)];
            if (color == 3)
              for (int j = 0; j < c; ++j) dst[j] = palette_entry(palette, v, where)[j];
            else
              dst[k] = v;
          }
          continue;
        }
        const size_t bit = size_t(i) * size_t(depth);
        const int v = row[bit / 8] >> (8 - depth - int(bit % 8)) & max_sample;
        if (color == 3)
          for (int j = 0; j < c; ++j) dst[j] = palette_entry(palette, v, where)[j];
        else
          dst[0] = uint8_t(v * 255 / max_sample);
      }
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
