#include "io/inflate.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <vector>

#include "core/error.h"
#include "io/png.h"

namespace aligner {

namespace {

constexpr int kMaxBits = 15;  // the longest Huffman code DEFLATE allows

// RFC 1951 3.2.5: the base and extra bits of length codes 257..285 and distance codes 0..29.
constexpr std::array<uint16_t, 29> kLengthBase = {3,  4,  5,  6,   7,   8,   9,   10,  11, 13,
                                                  15, 17, 19, 23,  27,  31,  35,  43,  51, 59,
                                                  67, 83, 99, 115, 131, 163, 195, 227, 258};
constexpr std::array<uint8_t, 29> kLengthExtra = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2,
                                                  2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0};
constexpr std::array<uint16_t, 30> kDistBase = {
    1,   2,   3,   4,   5,   7,    9,    13,   17,   25,   33,   49,   65,    97,    129,
    193, 257, 385, 513, 769, 1025, 1537, 2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577};
constexpr std::array<uint8_t, 30> kDistExtra = {0, 0, 0, 0, 1, 1, 2, 2,  3,  3,  4,  4,  5,  5,  6,
                                                6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13};
// The order in which a dynamic block sends the code lengths of the code-length alphabet.
constexpr std::array<uint8_t, 19> kCodeLengthOrder = {16, 17, 18, 0, 8,  7, 9,  6, 10, 5,
                                                      11, 4,  12, 3, 13, 2, 14, 1, 15};

// LSB-first bits of the stream. Bits past the end of the input read as zeros so a short code near
// the end can be looked up in a table of longer codes, but consuming them is an error.
struct BitReader {
  const uint8_t* data;
  size_t size;
  const std::string& where;
  size_t pos = 0;     // next byte not yet in `bits`
  uint64_t bits = 0;  // the next `count` bits of the stream, the rest zero
  int count = 0;

  void refill() {
    while (count <= 56 && pos < size) {
      bits |= uint64_t(data[pos++]) << count;
      count += 8;
    }
  }
  uint32_t peek(int n) {
    if (count < n) refill();
    return uint32_t(bits & ((uint64_t(1) << n) - 1));
  }
  void consume(int n) {
    if (n > count) fail("{}: compressed data ends early", where);
    bits >>= n;
    count -= n;
  }
  uint32_t take(int n) {
    const uint32_t v = peek(n);
    consume(n);
    return v;
  }
  void align_to_byte() { consume(count % 8); }
};

// A canonical Huffman code as one table indexed by the next `bits` stream bits; each entry is
// symbol << 4 | code length, 0 where no code starts with those bits.
struct Huffman {
  std::vector<uint16_t> table;
  int bits = 0;
};

// RFC 1951 3.2.2's codes from code lengths. An over-subscribed set is an error; an incomplete one
// too, except a single code of length 1 (RFC 1951 allows one distance code, and zlib writes one
// literal/length code that way), whose unused half stays 0 and fails if it is ever read.
Huffman build_huffman(const uint8_t* lengths, int n, bool allow_single, const char* what,
                      const std::string& where) {
  std::array<int, kMaxBits + 1> count{};
  for (int i = 0; i < n; ++i) ++count[lengths[i]];
  count[0] = 0;
  int max_len = 0, left = 1;
  for (int len = 1; len <= kMaxBits; ++len) {
    left = left * 2 - count[len];
    if (left < 0) fail("{}: over-subscribed {} code lengths", where, what);
    if (count[len]) max_len = len;
  }
  if (left > 0 && max_len > 0 && !(allow_single && max_len == 1))
    fail("{}: incomplete {} code lengths", where, what);

  Huffman h;
  h.bits = max_len;
  h.table.assign(size_t(1) << max_len, 0);
  std::array<uint32_t, kMaxBits + 2> next{};
  for (int len = 1, code = 0; len <= kMaxBits; ++len) {
    code = (code + count[len - 1]) << 1;
    next[len] = uint32_t(code);
  }
  for (int sym = 0; sym < n; ++sym) {
    const int len = lengths[sym];
    if (!len) continue;
    // Codes are sent most significant bit first, the table is indexed least significant first.
    uint32_t code = next[len]++, reversed = 0;
    for (int b = 0; b < len; ++b) reversed |= ((code >> b) & 1u) << (len - 1 - b);
    for (size_t i = reversed; i < h.table.size(); i += size_t(1) << len)
      h.table[i] = uint16_t(sym << 4 | len);
  }
  return h;
}

int decode(BitReader& in, const Huffman& h, const char* what) {
  const uint16_t entry = h.table[in.peek(h.bits)];
  if (!entry) fail("{}: invalid {} code in compressed data", in.where, what);
  in.consume(entry & 15);
  return entry >> 4;
}

// The output so far, grown as data arrives (never to more than max_out), so the allocation
// follows what the stream really produces, not what a header claims.
struct Output {
  std::string buf;
  size_t size = 0;
  size_t max_out;
  const std::string& where;

  uint8_t* reserve(size_t n) {
    if (n > max_out - size) fail("{}: compressed data holds more than the {} bytes expected", where, max_out);
    if (size + n > buf.size())
      buf.resize(std::min(max_out, std::max({size + n, buf.size() * 2, size_t(1) << 16})));
    return reinterpret_cast<uint8_t*>(buf.data()) + size;
  }
};

void inflate_stored(BitReader& in, Output& out) {
  in.align_to_byte();
  const uint32_t len = in.take(16), nlen = in.take(16);
  if ((len ^ nlen) != 0xffff) fail("{}: corrupt stored block length", in.where);
  uint8_t* dst = out.reserve(len);
  size_t done = 0;
  // Whole bytes still in the bit buffer come first, then the rest straight from the input.
  for (; done < len && in.count > 0; ++done) dst[done] = uint8_t(in.take(8));
  if (len - done > in.size - in.pos) fail("{}: compressed data ends inside a stored block", in.where);
  std::memcpy(dst + done, in.data + in.pos, len - done);
  in.pos += len - done;
  out.size += len;
}

void inflate_huffman(BitReader& in, Output& out, const Huffman& litlen, const Huffman& dist) {
  for (;;) {
    const int sym = decode(in, litlen, "literal/length");
    if (sym < 256) {
      *out.reserve(1) = uint8_t(sym);
      ++out.size;
      continue;
    }
    if (sym == 256) return;
    if (sym > 285) fail("{}: invalid literal/length symbol {}", in.where, sym);
    const size_t length = kLengthBase[sym - 257] + in.take(kLengthExtra[sym - 257]);
    const int dsym = decode(in, dist, "distance");
    if (dsym > 29) fail("{}: invalid distance symbol {}", in.where, dsym);
    const size_t distance = kDistBase[dsym] + in.take(kDistExtra[dsym]);
    if (distance > out.size)
      fail("{}: a match reaches {} bytes back, before the start of the data ({} bytes so far)", in.where,
           distance, out.size);
    uint8_t* dst = out.reserve(length);
    const uint8_t* src = dst - distance;
    // An overlapping match repeats the bytes it has just written, so it copies one at a time.
    if (distance >= length)
      std::memcpy(dst, src, length);
    else
      for (size_t i = 0; i < length; ++i) dst[i] = src[i];
    out.size += length;
  }
}

void fixed_tables(Huffman& litlen, Huffman& dist, const std::string& where) {
  std::array<uint8_t, 288> ll{};
  std::fill(ll.begin(), ll.begin() + 144, 8);
  std::fill(ll.begin() + 144, ll.begin() + 256, 9);
  std::fill(ll.begin() + 256, ll.begin() + 280, 7);
  std::fill(ll.begin() + 280, ll.end(), 8);
  std::array<uint8_t, 32> d{};
  d.fill(5);
  litlen = build_huffman(ll.data(), 288, false, "literal/length", where);
  dist = build_huffman(d.data(), 32, false, "distance", where);
}

void dynamic_tables(BitReader& in, Huffman& litlen, Huffman& dist) {
  const int hlit = int(in.take(5)) + 257, hdist = int(in.take(5)) + 1, hclen = int(in.take(4)) + 4;
  if (hlit > 286 || hdist > 30)
    fail("{}: dynamic block with {} literal/length and {} distance codes (at most 286 and 30)", in.where,
         hlit, hdist);
  std::array<uint8_t, 19> cl{};
  for (int i = 0; i < hclen; ++i) cl[kCodeLengthOrder[i]] = uint8_t(in.take(3));
  const Huffman clcode = build_huffman(cl.data(), 19, false, "code-length", in.where);

  // Literal/length and distance lengths form one sequence: a repeat may run from one into the other.
  std::array<uint8_t, 286 + 30> lengths{};
  for (int i = 0; i < hlit + hdist;) {
    const int sym = decode(in, clcode, "code-length");
    if (sym < 16) {
      lengths[i++] = uint8_t(sym);
      continue;
    }
    uint8_t value = 0;
    int repeat = 0;
    if (sym == 16) {
      if (i == 0) fail("{}: code length repeat with no previous length", in.where);
      value = lengths[i - 1];
      repeat = 3 + int(in.take(2));
    } else if (sym == 17) {
      repeat = 3 + int(in.take(3));
    } else {
      repeat = 11 + int(in.take(7));
    }
    if (repeat > hlit + hdist - i) fail("{}: code length repeat past the end of the code lengths", in.where);
    std::fill_n(lengths.begin() + i, repeat, value);
    i += repeat;
  }
  if (lengths[256] == 0) fail("{}: dynamic block without an end-of-block code", in.where);
  litlen = build_huffman(lengths.data(), hlit, true, "literal/length", in.where);
  dist = build_huffman(lengths.data() + hlit, hdist, true, "distance", in.where);
}

}  // namespace

std::string zlib_inflate(std::string_view z, size_t max_out, const std::string& where) {
  if (z.size() < 2) fail("{}: compressed data too short for a zlib header", where);
  const auto cmf = uint8_t(z[0]), flg = uint8_t(z[1]);
  if ((cmf & 0x0f) != 8 || (cmf >> 4) > 7 || (cmf * 256 + flg) % 31 != 0)
    fail("{}: compressed data does not start with a valid zlib header", where);
  if (flg & 0x20) fail("{}: zlib stream needs a preset dictionary", where);

  BitReader in{reinterpret_cast<const uint8_t*>(z.data()), z.size(), where, 2};
  Output out{{}, 0, max_out, where};
  Huffman fixed_litlen, fixed_dist, litlen, dist;
  // Table entries built for dynamic blocks. A block of a few bytes can ask for tables of 2^15
  // entries each, so a hostile stream of many such blocks would cost thousands of writes per input
  // byte; real streams, whose blocks hold thousands of symbols, stay far below this budget.
  const uint64_t table_budget = (uint64_t(1) << 20) + 64 * uint64_t(z.size());
  uint64_t table_work = 0;
  for (bool final = false; !final;) {
    final = in.take(1);
    switch (in.take(2)) {
      case 0:
        inflate_stored(in, out);
        break;
      case 1:
        if (fixed_litlen.table.empty()) fixed_tables(fixed_litlen, fixed_dist, where);
        inflate_huffman(in, out, fixed_litlen, fixed_dist);
        break;
      case 2:
        dynamic_tables(in, litlen, dist);
        table_work += litlen.table.size() + dist.table.size();
        if (table_work > table_budget)
          fail(
              "{}: compressed data builds Huffman tables out of all proportion to its size (a hostile "
              "stream?)",
              where);
        inflate_huffman(in, out, litlen, dist);
        break;
      default:
        fail("{}: compressed data has a block of invalid type 3", where);
    }
  }
  in.align_to_byte();
  uint32_t adler = 0;
  for (int i = 0; i < 4; ++i) adler = adler << 8 | in.take(8);
  out.buf.resize(out.size);
  if (adler != adler32(out.buf)) fail("{}: decompressed data fails its Adler-32 checksum", where);
  return std::move(out.buf);
}

}  // namespace aligner
