// The YAML files in configs/, compiled in: each command's defaults, and so its schema, travel
// with the binary.
#pragma once
#include <string>

namespace aligner {

// The text of configs/<name>.yaml; an unknown name is an error.
const std::string& builtin_config(const std::string& name);

}  // namespace aligner
