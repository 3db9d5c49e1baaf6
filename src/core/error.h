// One error type for everything the user can cause: bad files, bad configs, bad shapes.
// The CLI prints its message on one line and exits non-zero; nothing else catches it.
#pragma once
#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace aligner {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <class... Args>
[[noreturn]] void fail(fmt::format_string<Args...> format, Args&&... args) {
  throw Error(fmt::format(format, std::forward<Args>(args)...));
}

}  // namespace aligner
