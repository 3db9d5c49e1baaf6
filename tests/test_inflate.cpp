// io/inflate's DEFLATE decoder against zlib's streams and hand-made ones zlib never writes, and
// decode_png on PNGs other programs write (tests/fixtures/png, made by Python's zlib from the pixel
// formulas below: see its README.md).
#include "io/inflate.h"

#include <functional>

#include "io/png.h"
#include "test_util.h"

namespace aligner {
namespace {

using test::error_of;
using test::from_hex;

void put_be32(std::string& out, uint32_t v) {
  for (int shift = 24; shift >= 0; shift -= 8) out += char(v >> shift);
}

// DEFLATE's bits, least significant first, for streams zlib never writes.
struct BitWriter {
  std::string out;
  uint32_t acc = 0;
  int n = 0;

  void put(uint32_t v, int bits) {
    for (int i = 0; i < bits; ++i) {
      acc |= ((v >> i) & 1u) << n;
      if (++n == 8) {
        out += char(acc);
        acc = 0;
        n = 0;
      }
    }
  }
  // A Huffman code goes most significant bit first.
  void code(uint32_t c, int len) {
    for (int i = len - 1; i >= 0; --i) put((c >> i) & 1u, 1);
  }
  // A literal/length symbol in the fixed code (RFC 1951 3.2.6).
  void fixed(int sym) {
    if (sym < 144)
      code(0x30 + sym, 8);
    else if (sym < 256)
      code(0x190 + sym - 144, 9);
    else if (sym < 280)
      code(sym - 256, 7);
    else
      code(0xc0 + sym - 280, 8);
  }
  std::string finish() {
    if (n) out += char(acc);
    return out;
  }
};

// A zlib stream of `deflate`, with the Adler-32 of `data`.
std::string zlib_wrap(const std::string& deflate, std::string_view data) {
  std::string z = "\x78\x01" + deflate;
  put_be32(z, adler32(data));
  return z;
}

// The 300 bytes of "ACGT" that Python's zlib compressed into dynamic-Huffman blocks below.
std::string acgt() {
  std::string s;
  uint64_t x = 1;
  for (int i = 0; i < 300; ++i) {
    x = (x * 1103515245 + 12345) % (uint64_t(1) << 31);
    s += "ACGT"[(x >> 16) & 3];
  }
  return s;
}

std::string quick_fox() {
  std::string s;
  for (int i = 0; i < 20; ++i) s += "The quick brown fox jumps over the lazy dog. ";
  for (int i = 0; i < 256; ++i) s += char(i);
  return s;
}

const std::string kAcgtLevel1 = from_hex(
    "78012590c111002108036b63f24803f45f8bbb38ea192184706d76b73bdc335956db0ba504c44dc61c605b30df6eae90ca58d1"
    "6183e090df0c2b8318798377ee812c4ce8b2d5a690f74044530a265050c01e5a904281ba88cb17625b120cb1037c331290662400"
    "415848388cca8c628e46b6f3be99357be31180a909ff89adb1714e1fc337548e");
const std::string kAcgtLevel9 = from_hex(
    "78da2590cb0dc0300c4267433eb000fbcf121e515ac5b5f9b9f62571d45bbaf4d85eebdc06b5efc4ac45ecd6017223967930ac"
    "3eadb2794e3da76a744e73ef3e2a5b64e1a0d1363e25e13e7c503e04f08006c4249db817a6eac687c4d42cf0c300a8b4b06a0be8"
    "7a152f4f48882c59f219b2161b99a42009c13fc9d6fa491fc337548e");
// zlib.compressobj(9, DEFLATED, 15, 9, Z_FIXED) of quick_fox().
const std::string kFoxFixed = from_hex(
    "78010bc94855282ccd4cce56482aca2fcf5348cbaf50c82acd2d2856c82f4b2d5228014ae72456552aa4e4a7eb29848c2a1e55"
    "3caa98da8a191899985958d9d83938b9b87978f9f8050485844544c5c42524a5a46564e5e4151495945554d5d43534b5b47574f5"
    "f40d0c8d8c4d4ccdcc2d2cadac6d6cedec1d1c9d9c5d5cdddc3d3cbdbc7d7cfdfc030283824342c3c22322a3a26362e3e2131293"
    "925352d3d23332b3b27372f3f20b0a8b8a4b4acbca2b2aabaa6b6aebea1b1a9b9a5b5adbda3b3abbba7b7afbfa274c9c3479cad4"
    "69d367cc9c357bcedc79f3172c5cb478c9d265cb57ac5cb57acdda75eb376cdcb479cbd66ddb77ecdcb57bcfde7dfb0f1c3c74f8"
    "c"
    "8d163c74f9c3c75faccd973e72f5cbc74f9cad56bd76fdcbc75fbcedd7bf71f3c7cf4f8c9d367cf5fbc7cf5facddb77ef3f7cfcf"
    "4f9cbd76fdf7ffcfcf5fbcfdf7fff011497c29c");
// zlib.compress(b"a" * 1000, 9): a literal, then matches of length 258 at distance 1.
const std::string kA1000 = from_hex("78da4b4c1c05a360140c770000f9d87af8");

TEST(Inflate, ZlibStreams) {
  EXPECT_EQ(zlib_inflate(kAcgtLevel1, 1 << 20, "z"), acgt());
  EXPECT_EQ(zlib_inflate(kAcgtLevel9, 1 << 20, "z"), acgt());
  EXPECT_EQ(zlib_inflate(kFoxFixed, 1 << 20, "z"), quick_fox());
  EXPECT_EQ(zlib_inflate(kA1000, 1000, "z"), std::string(1000, 'a'));
  EXPECT_EQ(zlib_inflate(from_hex("7801010d00f2ff68656c6c6f2c2073746f726564224a04f2"), 13, "z"),
            "hello, stored");
  // Bytes after the Adler-32 are not the stream's.
  EXPECT_EQ(zlib_inflate(kA1000 + "junk", 1000, "z"), std::string(1000, 'a'));
  // zlib.compress(b"") at levels 6 (an empty fixed block) and 0 (an empty stored block).
  EXPECT_EQ(zlib_inflate(from_hex("789c030000000001"), 0, "z"), "");
  EXPECT_EQ(zlib_inflate(from_hex("7801010000ffff00000001"), 0, "z"), "");
}

TEST(Inflate, LongestDistanceAndLength) {
  // A stored block of 32768 bytes, then a fixed block copying its first 258 bytes from 32768 back
  // (length code 285, distance code 29 with 13 extra bits of 8191) and 5 more from 32767 back.
  std::string data;
  for (int i = 0; i < 32768; ++i) data += char((i * 31 + i / 256) % 256);
  BitWriter bits;
  bits.put(0, 3);  // not final, stored
  bits.finish();
  std::string deflate = bits.out + std::string("\x00\x80\xff\x7f", 4) + data;
  BitWriter fixed;
  fixed.put(1, 1);
  fixed.put(1, 2);
  fixed.fixed(285);
  fixed.code(29, 5);
  fixed.put(8191, 13);
  fixed.fixed(259);  // length 5
  fixed.code(29, 5);
  fixed.put(8190, 13);
  fixed.fixed(256);
  deflate += fixed.finish();
  const std::string expected = data + data.substr(0, 258) + data.substr(259, 5);
  EXPECT_EQ(zlib_inflate(zlib_wrap(deflate, expected), expected.size(), "z"), expected);
}

// A dynamic block's header: 257 literal/length and 1 distance code lengths, and the code-length
// code's lengths in kCodeLengthOrder (16, 17, 18, 0, 8, ...).
BitWriter dynamic_header(const std::vector<int>& code_length_lengths) {
  BitWriter b;
  b.put(1, 1);
  b.put(2, 2);
  b.put(0, 5);
  b.put(0, 5);
  b.put(uint32_t(code_length_lengths.size() - 4), 4);
  for (int len : code_length_lengths) b.put(uint32_t(len), 3);
  return b;
}

TEST(Inflate, RejectsBadStreams) {
  auto error = [](const std::string& z, size_t max_out = 1 << 20) {
    return error_of([&] { zlib_inflate(z, max_out, "in.z"); });
  };
  auto has = [](const std::string& message, const std::string& part) {
    return message.rfind("in.z: ", 0) == 0 && message.find(part) != std::string::npos;
  };
  EXPECT_TRUE(has(error(""), "too short for a zlib header"));
  for (size_t cut = 0; cut < kAcgtLevel9.size(); ++cut)
    EXPECT_TRUE(has(error(kAcgtLevel9.substr(0, cut)), "")) << cut;
  EXPECT_TRUE(has(error(kAcgtLevel9.substr(0, 50)), "ends early"));
  EXPECT_TRUE(has(error(kAcgtLevel9.substr(0, kAcgtLevel9.size() - 2)), "ends early"));
  EXPECT_TRUE(has(error(from_hex("7801010d00f2ff68656c6c6f")), "ends inside a stored block"));
  EXPECT_TRUE(has(error(from_hex("789d030000000001")), "valid zlib header"));  // FCHECK
  EXPECT_TRUE(has(error(from_hex("7701030000000001")), "valid zlib header"));  // CM 7
  EXPECT_TRUE(has(error(from_hex("78bb030000000001")), "preset dictionary"));
  EXPECT_TRUE(has(error(from_hex("780107")), "invalid type 3"));
  EXPECT_TRUE(has(error(from_hex("7801010500000068656c6c6f")), "corrupt stored block length"));
  auto bad_adler = kAcgtLevel9;
  bad_adler.back() ^= 1;
  EXPECT_TRUE(has(error(bad_adler), "Adler-32"));

  // Output past max_out, and a bomb: a fixed block claiming 1 GiB in 6.5 MB (a literal, then
  // matches of 258 at distance 1) stops at its bound instead of allocating it.
  EXPECT_TRUE(has(error(kA1000, 999), "more than the 999 bytes expected"));
  BitWriter bomb;
  bomb.put(1, 1);
  bomb.put(1, 2);
  bomb.fixed(0);
  for (int i = 0; i < (1 << 30) / 258; ++i) {
    bomb.fixed(285);
    bomb.code(0, 5);
  }
  bomb.fixed(256);
  EXPECT_TRUE(has(error(zlib_wrap(bomb.finish(), ""), 1 << 20), "more than the 1048576 bytes"));

  // Many tiny dynamic blocks whose codes reach 15 bits: each asks for a 2^15-entry table, so the
  // stream costs hundreds of table writes per byte. A few decode (to nothing); many are refused.
  const auto tiny_blocks = [](int blocks) {
    BitWriter w;
    for (int b = 0; b < blocks; ++b) {
      w.put(b == blocks - 1, 1);
      w.put(2, 2);
      w.put(0, 5);   // 257 literal/length codes
      w.put(0, 5);   // 1 distance code
      w.put(15, 4);  // 19 code-length code lengths
      // Code-length symbols 0..15 all 4 bits long (codes 0..15); 16, 17, 18 unused.
      for (int sym : {16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15})
        w.put(sym < 16 ? 4 : 0, 3);
      // Literal lengths 1, 2, ..., 14 for symbols 0..13, 15 for 14 and for end-of-block: complete.
      for (int sym = 0; sym < 257; ++sym) w.code(sym < 14 ? sym + 1 : sym == 14 || sym == 256 ? 15 : 0, 4);
      w.code(1, 4);        // the one distance code, 1 bit
      w.code(0x7fff, 15);  // end of block: the last 15-bit code
    }
    return zlib_wrap(w.finish(), "");
  };
  EXPECT_EQ(zlib_inflate(tiny_blocks(8), 1 << 20, "in.z"), "");
  EXPECT_TRUE(has(error(tiny_blocks(400)), "Huffman tables out of all proportion to its size"));

  // Fixed blocks: a match before the start of the data; distance code 30 and length symbol 286,
  // which the fixed code has but DEFLATE does not use.
  BitWriter early;
  early.put(1, 1);
  early.put(1, 2);
  early.fixed('x');
  early.fixed(257);
  early.code(1, 5);  // distance 2
  early.fixed(256);
  EXPECT_TRUE(has(error(zlib_wrap(early.finish(), "")), "2 bytes back, before the start"));
  BitWriter dist30;
  dist30.put(1, 1);
  dist30.put(1, 2);
  dist30.fixed('x');
  dist30.fixed(257);
  dist30.code(30, 5);
  EXPECT_TRUE(has(error(zlib_wrap(dist30.finish(), "")), "invalid distance symbol 30"));
  BitWriter len286;
  len286.put(1, 1);
  len286.put(1, 2);
  len286.fixed(286);
  EXPECT_TRUE(has(error(zlib_wrap(len286.finish(), "")), "invalid literal/length symbol 286"));

  // Dynamic blocks' code lengths. 19 code-length codes of 1 bit, and one of 2 bits alone.
  EXPECT_TRUE(has(error(zlib_wrap(dynamic_header(std::vector<int>(19, 1)).finish(), "")),
                  "over-subscribed code-length code lengths"));
  EXPECT_TRUE(has(error(zlib_wrap(dynamic_header({0, 0, 0, 2}).finish(), "")),
                  "incomplete code-length code lengths"));
  // Code-length symbols 0 and 8 of one bit each (codes 0 and 1): 258 lengths of 8 over-subscribe
  // the literal/length code; only symbols 0 and 256 of length 8 leave it incomplete; none of 8 leave
  // it without an end-of-block code.
  auto lengths = [](const std::function<bool(int)>& eight) {
    BitWriter b = dynamic_header({0, 0, 0, 1, 1});
    for (int i = 0; i < 258; ++i) b.code(eight(i) ? 1 : 0, 1);
    return zlib_wrap(b.finish(), "");
  };
  EXPECT_TRUE(has(error(lengths([](int) { return true; })), "over-subscribed literal/length code lengths"));
  EXPECT_TRUE(has(error(lengths([](int i) { return i == 0 || i == 256; })),
                  "incomplete literal/length code lengths"));
  EXPECT_TRUE(has(error(lengths([](int) { return false; })), "without an end-of-block code"));
  // Code-length symbols 0 and 16 (repeat the previous length) of one bit: 16 first has nothing to repeat.
  BitWriter repeat = dynamic_header({1, 0, 0, 1});
  repeat.code(1, 1);
  EXPECT_TRUE(has(error(zlib_wrap(repeat.finish(), "")), "no previous length"));
}

// The fixtures' pixel formulas (the generator's, see tests/fixtures/png/README.md).
int s8(int64_t y, int64_t x, int64_t c) {
  return int((x * 7 + y * 13 + c * 50) % 256);
}
int rgb(int64_t y, int64_t x, int64_t c) {
  return (x + y) % 3 ? s8(y, x, c) : 0;
}
std::function<int(int64_t, int64_t, int64_t)> gray_bits(int depth) {
  return [depth](int64_t y, int64_t x, int64_t) {
    const int max = (1 << depth) - 1;
    return int((x + 2 * y) % (max + 1)) * 255 / max;
  };
}
// Palette entry i is (3i, 5i, 255 - i) mod 256, tRNS gives entries 0..9 alpha 25i.
std::function<int(int64_t, int64_t, int64_t)> palette(int n, bool trns) {
  return [n, trns](int64_t y, int64_t x, int64_t c) {
    const int i = int((x + 3 * y) % n);
    const int entry[4] = {i * 3 % 256, i * 5 % 256, 255 - i, trns && i < 10 ? i * 25 : 255};
    return entry[c];
  };
}

at::Tensor image_of(int64_t h, int64_t w, int64_t c, const std::function<int(int64_t, int64_t, int64_t)>& f) {
  auto t = at::empty({h, w, c}, at::kByte);
  auto a = t.accessor<uint8_t, 3>();
  for (int64_t y = 0; y < h; ++y)
    for (int64_t x = 0; x < w; ++x)
      for (int64_t k = 0; k < c; ++k) a[y][x][k] = uint8_t(f(y, x, k));
  return t;
}

TEST(InflatePng, ReadsFixtures) {
  struct Case {
    std::string file;
    int64_t h, w, c;
    std::function<int(int64_t, int64_t, int64_t)> pixel;
  };
  const std::vector<Case> cases = {
      {"rgb8_level0", 16, 24, 3, rgb},  // stored blocks
      {"rgb8_level1", 16, 24, 3, rgb},  // dynamic Huffman from here to level 9
      {"rgb8_level6", 16, 24, 3, rgb},
      {"rgb8_level9", 16, 24, 3, rgb},
      {"rgb8_fixed", 16, 24, 3, rgb},
      {"gray8", 16, 24, 1, s8},
      {"gray_alpha8", 16, 24, 2, s8},
      {"rgba8", 16, 24, 4, s8},
      {"rgb16", 16, 24, 3, s8},  // high bytes; the low ones are (x + y) % 256
      {"gray16", 16, 24, 1, s8},
      {"gray1", 7, 13, 1, gray_bits(1)},
      {"gray2", 7, 13, 1, gray_bits(2)},
      {"gray4", 7, 13, 1, gray_bits(4)},
      {"palette8", 16, 24, 3, palette(200, false)},
      {"palette8_trns", 16, 24, 4, palette(200, true)},
      {"palette1", 7, 13, 3, palette(2, false)},
      {"palette2", 7, 13, 3, palette(4, false)},
      {"palette4", 7, 13, 3, palette(16, false)},
      {"rgb8_adam7", 9, 11, 3, s8},
      {"palette2_adam7", 9, 11, 3, palette(4, false)},
      {"rgba16_adam7", 2, 3, 4, s8},
  };
  for (const auto& k : cases) {
    const auto image = read_png(test::kRoot + "/tests/fixtures/png/" + k.file + ".png");
    ASSERT_EQ(image.sizes(), (std::vector<int64_t>{k.h, k.w, k.c})) << k.file;
    EXPECT_TRUE(at::equal(image, image_of(k.h, k.w, k.c, k.pixel))) << k.file;
  }
}

TEST(InflatePng, ReadsPythonZlibPng) {
  // DiffusionSamplingPng.ReadsFiltersAndRejectsBadFiles' 3x5 RGB image, compressed by zlib
  // (level 9), which decode_png used to refuse.
  const auto compressed = from_hex(
      "89504e470d0a1a0a0000000d49484452000000030000000508020000000f13c1f50000003b4944415478da636038c1aab1"
      "8a35a0879581fd38abfe4aa1f06e7906be63ac662be4e3ba2c19448fb2da2ed749ed0c669039c2eab2cc32a723170059b90e"
      "d4e24ed4370000000049454e44ae426082");
  const std::vector<int> pixels = {0,  200, 5,  40,  170, 5,  80, 140, 5,  7,  199, 5,  47,  169, 18,
                                   87, 139, 31, 14,  198, 5,  54, 168, 31, 94, 138, 57, 21,  197, 5,
                                   61, 167, 44, 101, 137, 83, 28, 196, 5,  68, 166, 57, 108, 136, 109};
  EXPECT_TRUE(
      at::equal(decode_png(compressed, "c.png"), at::tensor(pixels, at::kInt).to(at::kByte).view({5, 3, 3})));
}

// A PNG of the given IHDR fields and chunks before the image data, `raw` (filter bytes included) in
// one stored block.
std::string make_png(uint32_t w, uint32_t h, int depth, int color, const std::string& raw,
                     const std::vector<std::pair<std::string, std::string>>& chunks = {}) {
  auto chunk = [](std::string& out, const std::string& type, const std::string& data) {
    put_be32(out, uint32_t(data.size()));
    out += type + data;
    put_be32(out, png_crc32(type + data));
  };
  std::string ihdr;
  put_be32(ihdr, w);
  put_be32(ihdr, h);
  ihdr += {char(depth), char(color), 0, 0, 0};
  std::string out("\x89PNG\r\n\x1a\n", 8);
  chunk(out, "IHDR", ihdr);
  for (const auto& [type, data] : chunks) chunk(out, type, data);
  const size_t n = raw.size();
  chunk(out, "IDAT",
        zlib_wrap(
            std::string{char(1), char(n & 0xff), char(n >> 8), char(~n & 0xff), char((~n >> 8) & 0xff)} + raw,
            raw));
  chunk(out, "IEND", "");
  return out;
}

TEST(InflatePng, RejectsBadImages) {
  auto error = [](const std::string& png) { return error_of([&] { decode_png(png, "bad.png"); }); };
  auto has = [](const std::string& message, const std::string& part) {
    return message.rfind("bad.png: ", 0) == 0 && message.find(part) != std::string::npos;
  };
  const std::string row(1 + 2, '\0');  // a 2-pixel gray or palette row, filter None
  ASSERT_TRUE(at::equal(decode_png(make_png(2, 1, 8, 0, row), "ok.png"), at::zeros({1, 2, 1}, at::kByte)));
  // A header of 100000 x 100000 RGBA with a few bytes of data: refused before any allocation.
  EXPECT_TRUE(has(error(make_png(100000, 100000, 8, 6, row)), "larger than aligner reads"));
  EXPECT_TRUE(has(error(make_png(2, 1, 4, 2, row)), "bit depth 4 is invalid for colour type 2"));
  EXPECT_TRUE(has(error(make_png(2, 1, 8, 5, row)), "unknown colour type 5"));
  EXPECT_TRUE(has(error(make_png(2, 1, 8, 3, row)), "without a PLTE chunk"));
  EXPECT_TRUE(has(error(make_png(2, 1, 8, 3, row + "\x01", {{"PLTE", std::string(3, 'x')}})),
                  "more than the 3 bytes expected"));
  EXPECT_TRUE(has(error(make_png(2, 2, 8, 3, row, {{"PLTE", std::string(3, 'x')}})),
                  "3 bytes of image data, the header's size needs 6"));
  EXPECT_TRUE(has(error(make_png(2, 1, 8, 3, std::string("\0\0\1", 3), {{"PLTE", std::string(3, 'x')}})),
                  "palette index 1, the palette has 1 entries"));
  EXPECT_TRUE(has(error(make_png(2, 1, 8, 3, row, {{"tRNS", "\x01"}, {"PLTE", std::string(3, 'x')}})),
                  "tRNS before PLTE"));
  EXPECT_TRUE(has(error(make_png(2, 1, 8, 0, std::string("\x05\0\0", 3))), "unknown filter type 5"));
}

}  // namespace
}  // namespace aligner
