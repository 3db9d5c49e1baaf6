// Uncompressed tar archives (POSIX ustar, GNU, pax), as webdataset shards are: the regular files they
// hold, with their full names and where their bytes lie. Every header is checked (checksum, octal
// fields, sizes against the file's length, the two zero blocks that close the archive) before
// anything is read from it.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace aligner::tar {

struct Member {
  // The ustar prefix, a GNU long name ('L') or a pax path applied.
  std::string name;
  // Of the member's first header block (its GNU or pax extended headers included): errors name it.
  uint64_t offset = 0;
  uint64_t data_offset = 0;
  uint64_t size = 0;
};

class File {
 public:
  // Reads every header. Directories, links, devices, FIFOs and other non-regular members are
  // skipped; a missing file, a bad header, a size past the end or a missing end marker is an error
  // naming the file and the offset of the header at fault.
  explicit File(std::string path);
  ~File();
  File(File&& other) noexcept;
  File& operator=(File&& other) noexcept;
  File(const File&) = delete;
  File& operator=(const File&) = delete;

  const std::string& path() const { return path_; }
  // The regular files, in archive order.
  const std::vector<Member>& members() const { return members_; }
  // The bytes of one of members().
  std::string read(const Member& member) const;

 private:
  void index();  // fills size_ and members_ from the headers

  std::string path_;
  int fd_ = -1;
  uint64_t size_ = 0;
  std::vector<Member> members_;
};

}  // namespace aligner::tar
