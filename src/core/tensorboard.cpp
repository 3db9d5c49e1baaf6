#include "core/tensorboard.h"

#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <system_error>

#include "core/error.h"

namespace aligner {

namespace {

// Protobuf wire format, just the parts an Event with scalars needs. Fixed-width fields are
// little-endian whatever the host is, hence the byte-by-byte shifts.
enum WireType : uint32_t { kVarint = 0, kFixed64 = 1, kLengthDelimited = 2, kFixed32 = 5 };

void put_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out += static_cast<char>((v & 0x7F) | 0x80);
    v >>= 7;
  }
  out += static_cast<char>(v);
}

void put_key(std::string& out, uint32_t field, WireType type) {
  put_varint(out, (field << 3) | type);
}

void put_le(std::string& out, uint64_t bits, int bytes) {
  for (int i = 0; i < bytes; ++i) out += static_cast<char>((bits >> (8 * i)) & 0xFF);
}

void put_double(std::string& out, uint32_t field, double v) {
  uint64_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  put_key(out, field, kFixed64);
  put_le(out, bits, 8);
}

void put_float(std::string& out, uint32_t field, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  put_key(out, field, kFixed32);
  put_le(out, bits, 4);
}

void put_int64(std::string& out, uint32_t field, int64_t v) {
  put_key(out, field, kVarint);
  put_varint(out, static_cast<uint64_t>(v));  // int64 is encoded as its two's complement
}

void put_bytes(std::string& out, uint32_t field, std::string_view bytes) {
  put_key(out, field, kLengthDelimited);
  put_varint(out, bytes.size());
  out += bytes;
}

// Field numbers from tensorflow/core/util/event.proto and framework/summary.proto.
constexpr uint32_t kEventWallTime = 1, kEventStep = 2, kEventFileVersion = 3, kEventSummary = 5;
constexpr uint32_t kSummaryValue = 1;
constexpr uint32_t kValueTag = 1, kValueSimpleValue = 2, kValueImage = 4;
constexpr uint32_t kImageHeight = 1, kImageWidth = 2, kImageColorspace = 3, kImageEncoded = 4;

// An Event's common head. Step 0 is written out although proto3 encoders omit zero fields:
// decoders read either, and one code path serves every event.
std::string event_head(int64_t step) {
  double wall_time =
      std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  std::string event;
  put_double(event, kEventWallTime, wall_time);
  put_int64(event, kEventStep, step);
  return event;
}

std::string hostname() {
  char buf[256] = {};
  if (gethostname(buf, sizeof buf - 1) != 0 || buf[0] == '\0') return "localhost";
  return buf;
}

}  // namespace

uint32_t mask_crc32c(uint32_t crc) {
  return ((crc >> 15) | (crc << 17)) + 0xA282EAD8u;
}

TensorBoardWriter::TensorBoardWriter(const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) fail("{}: cannot create the TensorBoard directory: {}", dir, ec.message());
  path_ =
      (std::filesystem::path(dir) / fmt::format("events.out.tfevents.{}.{}", std::time(nullptr), hostname()))
          .string();
  // Appending: two writers started in the same second would otherwise truncate each other's file;
  // a second file-version event in the middle is harmless to readers.
  out_.open(path_, std::ios::binary | std::ios::app);
  if (!out_) fail("{}: cannot open for writing: {}", path_, std::strerror(errno));
  std::string event = event_head(0);
  put_bytes(event, kEventFileVersion, "brain.Event:2");
  write_record(event);
}

void TensorBoardWriter::add_scalars(int64_t step, const std::vector<std::pair<std::string, double>>& values) {
  if (values.empty()) return;
  std::string summary;
  for (const auto& [tag, value] : values) {
    std::string v;
    put_bytes(v, kValueTag, tag);
    put_float(v, kValueSimpleValue, static_cast<float>(value));
    put_bytes(summary, kSummaryValue, v);
  }
  std::string event = event_head(step);
  put_bytes(event, kEventSummary, summary);
  write_record(event);
}

void TensorBoardWriter::add_image(int64_t step, const std::string& tag, const std::string& png,
                                  int64_t height, int64_t width, int64_t channels) {
  std::string image;
  put_int64(image, kImageHeight, height);
  put_int64(image, kImageWidth, width);
  put_int64(image, kImageColorspace, channels);
  put_bytes(image, kImageEncoded, png);
  std::string v;
  put_bytes(v, kValueTag, tag);
  put_bytes(v, kValueImage, image);
  std::string summary;
  put_bytes(summary, kSummaryValue, v);
  std::string event = event_head(step);
  put_bytes(event, kEventSummary, summary);
  write_record(event);
}

// TFRecord framing: length, CRC of the length's bytes, data, CRC of the data.
void TensorBoardWriter::write_record(const std::string& data) {
  std::string record;
  put_le(record, data.size(), 8);
  std::string length_crc;
  put_le(length_crc, mask_crc32c(crc32c(record)), 4);
  record += length_crc;
  record += data;
  put_le(record, mask_crc32c(crc32c(data)), 4);
  out_.write(record.data(), static_cast<std::streamsize>(record.size()));
  out_.flush();
  if (!out_) fail("{}: write failed: {}", path_, std::strerror(errno));
}

}  // namespace aligner
