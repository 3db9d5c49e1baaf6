// Configs are the user's interface: a command's built-in defaults (YAML, which is also the schema:
// every valid key and its type), a YAML file from --config, then `key=value` overrides.
#pragma once
#include <yaml-cpp/yaml.h>

#include <cstdint>
#include <string>
#include <vector>

namespace aligner {

class Config {
 public:
  // defaults_yaml: the schema. A key whose default is `null` takes a string or null; otherwise
  // the type of the default (int, float, bool, string, list of one of those) is the key's type.
  // An int may be given where a float is expected. Unknown keys (in the file or in overrides)
  // are errors naming the key, where it came from, and the nearest valid key ("did you mean").
  // A wrong type names the key, the expected type and the value given.
  static Config load(const std::string& defaults_yaml, const std::string& file,  // "" = none
                     const std::vector<std::string>& overrides);

  bool has(const std::string& key) const;  // dotted path, e.g. "trainer.max_steps"
  bool is_null(const std::string& key) const;
  // Whether the key still has its built-in default value (neither the file nor an override changed
  // it), for settings whose default gives way to what the model allows.
  bool is_default(const std::string& key) const;
  int64_t get_int(const std::string& key) const;
  double get_float(const std::string& key) const;
  bool get_bool(const std::string& key) const;
  std::string get_string(const std::string& key) const;  // "" for null
  std::vector<int64_t> get_int_list(const std::string& key) const;
  std::vector<double> get_float_list(const std::string& key) const;
  std::vector<std::string> get_string_list(const std::string& key) const;

  std::string to_yaml() const;  // the resolved config, for printing and for the run's outputs
  void save(const std::string& path) const;

  const YAML::Node& root() const { return root_; }

 private:
  YAML::Node root_;      // resolved values, as canonical scalars in the defaults' key order
  YAML::Node schema_;    // the parsed defaults: each key's type is its default's
  YAML::Node defaults_;  // the defaults in canonical form, as root_ holds values
};

}  // namespace aligner
