#include "command_config.h"

#include <fmt/format.h>

#include <memory>

#include "core/builtin_configs.h"
#include "core/error.h"

namespace aligner::cli {
namespace {

// A flag's value as one YAML string scalar, so that a path such as "a: b" or "[x" stays the text
// given; the schema still converts it to the key's type ("8" to an int).
std::string yaml_quoted(const std::string& text) {
  std::string out = "\"";
  for (const char c : text) {
    if (c == '"' || c == '\\')
      out += {'\\', c};
    else if (static_cast<unsigned char>(c) < 0x20)
      out += fmt::format("\\x{:02x}", static_cast<unsigned char>(c));
    else
      out += c;
  }
  return out + "\"";
}

}  // namespace

std::vector<Alias> model_aliases(bool model_required) {
  return {
      {"--model", "model.path", model_required}, {"--device", "model.device"}, {"--dtype", "model.dtype"}};
}

void add_config_options(CLI::App& cmd, const std::string& config_name, const std::vector<Alias>& aliases,
                        std::function<void(const Config&)> run) {
  struct Given {
    std::string file;
    bool print = false;
    std::vector<std::string> values;  // one per alias; sized once, so options may point into it
    std::vector<CLI::Option*> options;
    std::vector<std::string> overrides;
  };
  auto given = std::make_shared<Given>();
  given->values.resize(aliases.size());
  cmd.add_option("--config", given->file, "YAML file of keys (listed below) over the defaults");
  for (size_t i = 0; i < aliases.size(); ++i) {
    const Alias& a = aliases[i];
    const std::string help = fmt::format("{}={}", a.key, a.switch_value.empty() ? "VALUE" : a.switch_value);
    given->options.push_back(a.switch_value.empty() ? cmd.add_option(a.flag, given->values[i], help)
                                                    : cmd.add_flag(a.flag, help));
  }
  cmd.add_flag("--print-config", given->print, "Print the resolved config and exit, loading nothing");
  cmd.add_option("overrides", given->overrides, "key=value settings of the keys listed below");
  cmd.footer(fmt::format(
      "Keys, their defaults and their meaning (configs/{}.yaml). Set them in a --config file or as "
      "key=value; the flags above set the keys they name, before any key=value.\n\n{}",
      config_name, builtin_config(config_name)));
  cmd.callback([given, aliases, config_name, run = std::move(run)] {
    std::vector<std::string> overrides;
    for (size_t i = 0; i < aliases.size(); ++i) {
      if (given->options[i]->count() == 0) continue;
      const Alias& a = aliases[i];
      overrides.push_back(a.key + "=" +
                          (a.switch_value.empty() ? yaml_quoted(given->values[i]) : a.switch_value));
    }
    overrides.insert(overrides.end(), given->overrides.begin(), given->overrides.end());
    const Config cfg = Config::load(builtin_config(config_name), given->file, overrides);
    if (given->print) {
      fmt::print("{}", cfg.to_yaml());
      return;
    }
    for (const Alias& a : aliases)
      if (a.required && cfg.get_string(a.key).empty())
        fail("config key '{}' must be set: {} VALUE or {}=VALUE", a.key, a.flag, a.key);
    run(cfg);
  });
}

}  // namespace aligner::cli
