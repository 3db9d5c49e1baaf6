// How every config-driven command takes its settings: its built-in configs/<name>.yaml, then a
// --config file, then flags, then key=value overrides. A flag is only another spelling of a key
// (`--device cuda` is `model.device=cuda`): it becomes an override, so both go through
// Config::load with its types and typo suggestions, and either spelling works everywhere.
#pragma once
#include <CLI/CLI.hpp>

#include <functional>
#include <string>
#include <vector>

#include "core/config.h"

namespace aligner::cli {

struct Alias {
  std::string flag;       // "--device"
  std::string key;        // "model.device"
  bool required = false;  // the key must be set, one way or the other
  // A switch (a flag without a value) sets the key to this value; "" for a flag that takes one.
  std::string switch_value = {};
};

// --model, --device and --dtype for model.path, model.device and model.dtype.
std::vector<Alias> model_aliases(bool model_required);

// Registers --config, --print-config, the aliases and the key=value positional on `cmd`, and lists
// the keys, their defaults and their meaning (the built-in YAML) at the end of its --help. Parsing
// calls `run` with the loaded config, or prints the config and returns (--print-config).
void add_config_options(CLI::App& cmd, const std::string& config_name, const std::vector<Alias>& aliases,
                        std::function<void(const Config&)> run);

}  // namespace aligner::cli
