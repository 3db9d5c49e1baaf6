// Small string predicates that several parsers share.
#pragma once
#include <string_view>

namespace aligner {

inline bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

}  // namespace aligner
