// Reading files by offset (pread), for the readers that index a file once and read its parts later
// (JSONL records, tar members): short reads and EINTR handled, errors naming the file.
#pragma once
#include <cstdint>
#include <string>

namespace aligner {

// An aligner::Error "PATH: cannot WHAT: <strerror(errno)>".
[[noreturn]] void fail_errno(const std::string& what, const std::string& path);

// Exactly n bytes at `offset` of the open file `fd` into `out`; a file that ends before them (it
// shrank since it was indexed) or a read error is an error naming `path`.
void pread_exact(int fd, char* out, uint64_t n, uint64_t offset, const std::string& path);

}  // namespace aligner
