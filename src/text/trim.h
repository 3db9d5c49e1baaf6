// Whitespace trimming, as Python's str.strip() and Jinja's trim filter do it.
#pragma once
#include <string>
#include <string_view>

namespace aligner {

// `s` without its leading and trailing spaces, tabs, newlines, carriage returns, vertical tabs and
// form feeds.
std::string trim(std::string_view s);

}  // namespace aligner
