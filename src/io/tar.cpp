#include "io/tar.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <optional>
#include <string_view>

#include "core/error.h"
#include "io/file_io.h"

namespace aligner::tar {

namespace {

constexpr uint64_t kBlock = 512;
// GNU long names and pax headers are read into memory: a real one is a few hundred bytes.
constexpr uint64_t kMaxExtendedHeader = 1 << 20;
constexpr uint64_t kMaxSize = uint64_t(1) << 62;

using Block = std::array<char, kBlock>;

// Header fields (offset, length) of the ustar layout.
constexpr size_t kNameAt = 0, kNameLen = 100;
constexpr size_t kSizeAt = 124, kSizeLen = 12;
constexpr size_t kChecksumAt = 148, kChecksumLen = 8;
constexpr size_t kTypeAt = 156;
constexpr size_t kMagicAt = 257;
constexpr size_t kPrefixAt = 345, kPrefixLen = 155;

// A NUL-terminated field (or one that fills its bytes).
std::string field_string(const Block& b, size_t at, size_t len) {
  const char* p = b.data() + at;
  return std::string(p, std::find(p, p + len, '\0'));
}

// A numeric field: octal digits between optional leading spaces and trailing NULs or spaces (all of
// them NUL reads 0, as tar does), or GNU's base-256 (first byte 0x80, then big-endian) for sizes of
// 8 GiB and more.
uint64_t field_number(const Block& b, size_t at, size_t len, const char* what, const std::string& path,
                      uint64_t offset) {
  const auto* p = reinterpret_cast<const unsigned char*>(b.data() + at);
  if (p[0] & 0x80) {
    if (p[0] != 0x80)
      fail("{}: header at offset {}: negative or malformed base-256 {} field", path, offset, what);
    uint64_t v = 0;
    for (size_t i = 1; i < len; ++i) {
      if (v > (kMaxSize >> 8)) fail("{}: header at offset {}: {} field too large", path, offset, what);
      v = (v << 8) | p[i];
    }
    return v;
  }
  size_t i = 0;
  while (i < len && p[i] == ' ') ++i;
  uint64_t v = 0;
  for (; i < len && p[i] >= '0' && p[i] <= '7'; ++i) v = (v << 3) | uint64_t(p[i] - '0');
  for (; i < len; ++i) {
    if (p[i] != '\0' && p[i] != ' ') {
      std::string shown;  // printable, so that the error stays one line
      for (size_t k = 0; k < len; ++k)
        shown += p[k] >= 0x20 && p[k] < 0x7f ? std::string(1, char(p[k])) : fmt::format("\\x{:02x}", p[k]);
      fail("{}: header at offset {}: {} field is not octal: \"{}\"", path, offset, what, shown);
    }
  }
  return v;
}

bool all_zero(const Block& b) {
  return std::all_of(b.begin(), b.end(), [](char c) { return c == '\0'; });
}

// The checksum covers the header with its own field read as spaces; old writers summed signed
// chars, which tar and Python's tarfile still accept.
void check_checksum(const Block& b, const std::string& path, uint64_t offset) {
  // A compressed shard, told by its magic bytes before any field of it is read as a header's.
  const auto* u = reinterpret_cast<const unsigned char*>(b.data());
  if (offset == 0 && ((u[0] == 0x1f && u[1] == 0x8b) || (u[0] == 'B' && u[1] == 'Z' && u[2] == 'h') ||
                      (u[0] == 0xfd && u[1] == '7' && u[2] == 'z') ||
                      (u[0] == 0x28 && u[1] == 0xb5 && u[2] == 0x2f && u[3] == 0xfd)))
    fail(
        "{}: a compressed file, not a tar archive: decompress it first (webdataset shards here are plain "
        ".tar)",
        path);
  const uint64_t stored = field_number(b, kChecksumAt, kChecksumLen, "checksum", path, offset);
  int64_t unsigned_sum = 0, signed_sum = 0;
  for (size_t i = 0; i < kBlock; ++i) {
    const bool in_field = i >= kChecksumAt && i < kChecksumAt + kChecksumLen;
    unsigned_sum += in_field ? ' ' : static_cast<unsigned char>(b[i]);
    signed_sum += in_field ? ' ' : static_cast<signed char>(b[i]);
  }
  if (int64_t(stored) != unsigned_sum && int64_t(stored) != signed_sum) {
    fail(
        "{}: header at offset {}: checksum {} does not match the header's ({}): not a tar file, or a corrupt "
        "one",
        path, offset, stored, unsigned_sum);
  }
}

// Records "LENGTH key=value\n", LENGTH counting the whole record; only path and size matter here.
void parse_pax(const std::string& data, std::optional<std::string>& path_out,
               std::optional<uint64_t>& size_out, const std::string& path, uint64_t offset) {
  size_t pos = 0;
  while (pos < data.size()) {
    // Writers pad the header's data with NULs after the last record.
    if (data[pos] == '\0') break;
    size_t i = pos;
    uint64_t len = 0;
    while (i < data.size() && data[i] >= '0' && data[i] <= '9' && len <= data.size()) {
      len = len * 10 + uint64_t(data[i] - '0');
      ++i;
    }
    if (i == pos || i >= data.size() || data[i] != ' ' || len > data.size() - pos || len < i - pos + 3 ||
        data[pos + len - 1] != '\n') {
      fail("{}: pax header at offset {}: malformed record at byte {}", path, offset, pos);
    }
    const std::string_view record(data.data() + i + 1, pos + len - 1 - (i + 1));
    const size_t eq = record.find('=');
    if (eq == std::string_view::npos || eq == 0) {
      fail("{}: pax header at offset {}: record at byte {} has no key=value", path, offset, pos);
    }
    const std::string_view key = record.substr(0, eq), value = record.substr(eq + 1);
    if (key == "path") {
      if (value.empty() || value.find('\0') != std::string_view::npos) {
        fail("{}: pax header at offset {}: empty path or a path with a NUL byte", path, offset);
      }
      path_out = std::string(value);
    } else if (key == "size") {
      uint64_t v = 0;
      if (value.empty() || value.size() > 18 ||
          !std::all_of(value.begin(), value.end(), [](char c) { return c >= '0' && c <= '9'; })) {
        fail("{}: pax header at offset {}: size \"{}\" is not a decimal number", path, offset, value);
      }
      for (char c : value) v = v * 10 + uint64_t(c - '0');
      size_out = v;
    }
    pos += len;
  }
}

}  // namespace

File::File(std::string path) : path_(std::move(path)) {
  fd_ = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) fail_errno("open", path_);
  // The destructor does not run when a constructor throws: a rejected file must not keep its descriptor.
  try {
    index();
  } catch (...) {
    ::close(fd_);
    fd_ = -1;
    throw;
  }
}

void File::index() {
  struct stat st {};
  if (::fstat(fd_, &st) != 0) fail_errno("stat", path_);
  if (!S_ISREG(st.st_mode)) fail("{}: not a regular file", path_);
  size_ = uint64_t(st.st_size);

  // What GNU long-name and pax headers say about the member whose header follows them.
  std::optional<std::string> long_name, pax_path;
  std::optional<uint64_t> pax_size;
  std::optional<uint64_t> first_header;  // offset of the first of those headers
  uint64_t offset = 0;
  Block b{};
  for (;;) {
    if (offset > size_ || size_ - offset < kBlock) {
      fail("{}: truncated: ends at offset {} without the two zero blocks that close a tar archive", path_,
           size_);
    }
    pread_exact(fd_, b.data(), kBlock, offset, path_);
    if (all_zero(b)) {
      if (first_header) {
        fail("{}: extended header at offset {} is followed by the end of the archive, not a member", path_,
             *first_header);
      }
      if (size_ - offset < 2 * kBlock) {
        fail("{}: truncated: one zero block at offset {} but not the second that closes a tar archive", path_,
             offset);
      }
      pread_exact(fd_, b.data(), kBlock, offset + kBlock, path_);
      if (!all_zero(b)) fail("{}: a lone zero block at offset {} inside the archive", path_, offset);
      break;
    }
    check_checksum(b, path_, offset);
    const char type = b[kTypeAt];
    const uint64_t header_size = field_number(b, kSizeAt, kSizeLen, "size", path_, offset);
    const uint64_t data_offset = offset + kBlock;
    const bool regular = type == '0' || type == '\0' || type == '7';
    // A pax size replaces the header's for the member it describes (GNU and pax both allow > 8 GiB).
    // GCC 13 sees pax_size's value read uninitialised through the optional (a false positive).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
    const uint64_t size = regular && pax_size ? *pax_size : header_size;
    if (size > size_ - data_offset) {
      fail("{}: member at offset {}: size {} runs past the end of the file ({} bytes)", path_,
           first_header.value_or(offset), size, size_);
    }
#pragma GCC diagnostic pop
    const uint64_t padded = (size + kBlock - 1) / kBlock * kBlock;
    // Links, devices, directories and FIFOs have no data blocks whatever their size field says, as
    // Python's tarfile reads them.
    const bool has_data = !(type >= '1' && type <= '6');
    const uint64_t next = data_offset + (has_data ? padded : 0);

    if (type == 'L' || type == 'x') {
      if (size > kMaxExtendedHeader) {
        fail("{}: extended header at offset {}: {} bytes (more than {})", path_, offset, size,
             kMaxExtendedHeader);
      }
      std::string data(size, '\0');
      pread_exact(fd_, data.data(), size, data_offset, path_);
      if (type == 'L') {
        data.resize(std::find(data.begin(), data.end(), '\0') - data.begin());
        if (data.empty()) fail("{}: GNU long name at offset {} is empty", path_, offset);
        long_name = std::move(data);
      } else {
        parse_pax(data, pax_path, pax_size, path_, offset);
      }
      if (!first_header) first_header = offset;
    } else if (type == 'K' || type == 'g') {
      // A GNU long link name, or pax global defaults: neither names a regular file.
      if (!first_header && type == 'K') first_header = offset;
    } else if (type == 'S') {
      fail("{}: member at offset {}: GNU sparse files are not read", path_, first_header.value_or(offset));
    } else {
      std::string name;
      if (pax_path) {
        name = *pax_path;
      } else if (long_name) {
        name = *long_name;
      } else {
        name = field_string(b, kNameAt, kNameLen);
        // Only POSIX ustar headers have a prefix; GNU ones keep other fields at its place.
        const std::string_view magic(b.data() + kMagicAt, 6);
        const std::string prefix = field_string(b, kPrefixAt, kPrefixLen);
        if (magic == std::string_view("ustar\0", 6) && !prefix.empty()) name = prefix + "/" + name;
      }
      // Old archivers mark directories as regular files whose name ends in '/'.
      if (regular && !(type == '\0' && !name.empty() && name.back() == '/')) {
        if (name.empty()) fail("{}: member at offset {} has no name", path_, first_header.value_or(offset));
        members_.push_back({std::move(name), first_header.value_or(offset), data_offset, size});
      }
      long_name.reset(), pax_path.reset(), pax_size.reset(), first_header.reset();
    }
    offset = next;
  }
}

File::~File() {
  if (fd_ >= 0) ::close(fd_);
}

File::File(File&& other) noexcept
    : path_(std::move(other.path_)), fd_(other.fd_), size_(other.size_), members_(std::move(other.members_)) {
  other.fd_ = -1;
}

File& File::operator=(File&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    path_ = std::move(other.path_);
    fd_ = other.fd_;
    size_ = other.size_;
    members_ = std::move(other.members_);
    other.fd_ = -1;
  }
  return *this;
}

std::string File::read(const Member& member) const {
  if (member.data_offset > size_ || member.size > size_ - member.data_offset) {
    fail("{}: member '{}' at offset {} lies past the end of the file", path_, member.name, member.offset);
  }
  std::string out(member.size, '\0');
  pread_exact(fd_, out.data(), member.size, member.data_offset, path_);
  return out;
}

}  // namespace aligner::tar
