#include "io/file_io.h"

#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "core/error.h"

namespace aligner {

void fail_errno(const std::string& what, const std::string& path) {
  fail("{}: cannot {}: {}", path, what, std::strerror(errno));
}

void pread_exact(int fd, char* out, uint64_t n, uint64_t offset, const std::string& path) {
  while (n > 0) {
    const ssize_t got = ::pread(fd, out, n, off_t(offset));
    if (got < 0) {
      if (errno == EINTR) continue;
      fail_errno("read", path);
    }
    if (got == 0) fail("{}: file shrank while being read (at offset {})", path, offset);
    out += got, n -= uint64_t(got), offset += uint64_t(got);
  }
}

}  // namespace aligner
