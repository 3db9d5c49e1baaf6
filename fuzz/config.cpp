// Config::load on a YAML file of arbitrary bytes over a command's built-in schema, then the same
// bytes' `key=value` lines as command-line overrides; what loads is printed back as YAML.
#include "core/config.h"

#include <sstream>

#include "core/builtin_configs.h"
#include "core/error.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const char* const kCommands[] = {"sft", "rm", "dpo", "generate"};
  // Which schema: decided by the input, so each input replays the same way.
  const std::string& defaults = aligner::builtin_config(kCommands[size % 4]);
  std::string path = aligner::fuzz::write_scratch("config.yaml", data, size);
  try {
    aligner::Config::load(defaults, path, {}).to_yaml();
  } catch (const aligner::Error&) {
  }

  std::vector<std::string> overrides;
  std::istringstream lines(std::string(reinterpret_cast<const char*>(data), size));
  for (std::string line; std::getline(lines, line);) {
    if (line.find('=') != std::string::npos) overrides.push_back(line);
  }
  if (overrides.empty()) return 0;
  try {
    aligner::Config::load(defaults, "", overrides).to_yaml();
  } catch (const aligner::Error&) {
  }
  return 0;
}
