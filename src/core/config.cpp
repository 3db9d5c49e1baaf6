#include "core/config.h"

#include <fmt/ranges.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <sstream>
#include <string_view>
#include <utility>

#include "core/error.h"

namespace aligner {
namespace {

enum class Scalar { Int, Float, Bool, String, StringOrNull };

struct Kind {
  Scalar scalar;
  bool list;
  bool operator==(const Kind& other) const { return scalar == other.scalar && list == other.list; }
};

std::string type_name(Kind kind) {
  if (kind.list) {
    switch (kind.scalar) {
      case Scalar::Int:
        return "a list of ints";
      case Scalar::Float:
        return "a list of floats";
      case Scalar::Bool:
        return "a list of bools";
      default:
        return "a list of strings";
    }
  }
  switch (kind.scalar) {
    case Scalar::Int:
      return "an int";
    case Scalar::Float:
      return "a float";
    case Scalar::Bool:
      return "a bool";
    case Scalar::String:
      return "a string";
    default:
      return "a string or null";
  }
}

std::optional<int64_t> parse_int(std::string_view text) {
  // from_chars takes a '-' but not a '+'; stripping only before a digit keeps "+-1" invalid.
  if (text.size() > 1 && text[0] == '+' && std::isdigit(static_cast<unsigned char>(text[1])))
    text.remove_prefix(1);
  int64_t value = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end != text.data() + text.size()) return std::nullopt;
  return value;
}

// YAML 1.2's float syntax (digits, optional fraction, optional exponent, or .inf/.nan); from_chars
// alone would also take "inf", "nan" and hex, which YAML reads as strings.
std::optional<double> parse_float(std::string_view text) {
  const bool has_sign = !text.empty() && (text[0] == '+' || text[0] == '-');
  const bool negative = has_sign && text[0] == '-';
  if (has_sign) text.remove_prefix(1);
  if (text == ".inf" || text == ".Inf" || text == ".INF")
    return negative ? -std::numeric_limits<double>::infinity() : std::numeric_limits<double>::infinity();
  if (!has_sign && (text == ".nan" || text == ".NaN" || text == ".NAN"))
    return std::numeric_limits<double>::quiet_NaN();
  const auto digit = [&](size_t i) {
    return i < text.size() && std::isdigit(static_cast<unsigned char>(text[i]));
  };
  size_t i = 0, mantissa_digits = 0;
  for (; digit(i); ++i) ++mantissa_digits;
  if (i < text.size() && text[i] == '.')
    for (++i; digit(i); ++i) ++mantissa_digits;
  if (mantissa_digits == 0) return std::nullopt;
  if (i < text.size() && (text[i] == 'e' || text[i] == 'E')) {
    ++i;
    if (i < text.size() && (text[i] == '+' || text[i] == '-')) ++i;
    if (!digit(i)) return std::nullopt;
    while (digit(i)) ++i;
  }
  if (i != text.size()) return std::nullopt;
  double value = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end != text.data() + text.size()) return std::nullopt;
  return negative ? -value : value;
}

// YAML 1.1's booleans, which is what PyYAML (and so most existing configs) use.
std::optional<bool> parse_bool(std::string_view text) {
  std::string lower(text);
  std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
  if (lower == "true" || lower == "yes" || lower == "on") return true;
  if (lower == "false" || lower == "no" || lower == "off") return false;
  return std::nullopt;
}

std::string format_float(double value) {
  if (std::isnan(value)) return ".nan";
  if (std::isinf(value)) return value < 0 ? "-.inf" : ".inf";
  std::string text = fmt::format("{}", value);  // shortest text that reads back as the same double
  // PyYAML reads a number as a float only if it has a '.': "1e-05" and "100" would come back
  // as a string and an int.
  if (text.find('.') == std::string::npos) {
    const size_t exponent = text.find_first_of("eE");
    text.insert(exponent == std::string::npos ? text.size() : exponent, ".0");
  }
  return text;
}

// Plain scalars that a YAML reader would not take as a string.
bool looks_typed(const std::string& text) {
  return text.empty() || text == "~" || text == "null" || text == "Null" || text == "NULL" ||
         parse_int(text) || parse_float(text) || parse_bool(text);
}

// The type of a schema default. Quoted defaults are strings whatever they look like, so that
// `revision: "1"` declares a string key.
Scalar infer(const YAML::Node& value) {
  if (value.Tag() == "!") return Scalar::String;
  const std::string& text = value.Scalar();
  if (parse_int(text)) return Scalar::Int;
  if (parse_float(text)) return Scalar::Float;
  if (parse_bool(text)) return Scalar::Bool;
  return Scalar::String;
}

// The type of a schema leaf; nullopt for what the schema cannot express (maps are sections,
// not leaves, and are not asked about).
std::optional<Kind> kind_of(const YAML::Node& value) {
  if (value.IsNull()) return Kind{Scalar::StringOrNull, false};
  if (value.IsScalar()) return Kind{infer(value), false};
  // An empty list says nothing of its elements: `!ints []` and `!floats []` do.
  if (value.size() == 0) {
    if (value.Tag() == "!ints") return Kind{Scalar::Int, true};
    if (value.Tag() == "!floats") return Kind{Scalar::Float, true};
    return Kind{Scalar::String, true};
  }
  if (!value[0].IsScalar()) return std::nullopt;
  return Kind{infer(value[0]), true};
}

std::vector<std::string> split_path(const std::string& path) {
  std::vector<std::string> parts;
  size_t start = 0;
  for (size_t dot; (dot = path.find('.', start)) != std::string::npos; start = dot + 1)
    parts.push_back(path.substr(start, dot - start));
  parts.push_back(path.substr(start));
  return parts;
}

std::string join_path(const std::string& prefix, const std::string& key) {
  return prefix.empty() ? key : prefix + "." + key;
}

std::string last_part(const std::string& path) {
  const size_t dot = path.rfind('.');
  return dot == std::string::npos ? path : path.substr(dot + 1);
}

// The node at a dotted path ("" is the root), or nullopt.
std::optional<YAML::Node> find(const YAML::Node& root, const std::string& path) {
  YAML::Node node = root;
  if (path.empty()) return node;
  for (const std::string& part : split_path(path)) {
    if (!node.IsMap()) return std::nullopt;
    // The const subscript: the mutable one would insert the missing key.
    const YAML::Node child = std::as_const(node)[part];
    if (!child) return std::nullopt;
    // reset() rebinds; assignment would overwrite the node that `node` refers to.
    node.reset(child);
  }
  return node;
}

// The node at a dotted path that exists, by value: a range-for over `*find(...)` would iterate a
// node inside an optional that is destroyed before the loop starts.
YAML::Node existing(const YAML::Node& root, const std::string& path) {
  return *find(root, path);
}

// Replaces the value at an existing dotted path.
void set(YAML::Node& root, const std::string& path, const YAML::Node& value) {
  const std::vector<std::string> parts = split_path(path);
  YAML::Node node = root;
  for (size_t i = 0; i + 1 < parts.size(); ++i) node.reset(node[parts[i]]);
  node[parts.back()] = value;
}

std::string show(const YAML::Node& value) {
  std::string text;
  if (value.IsNull()) {
    text = "null";
  } else if (value.IsScalar()) {
    text = "'" + value.Scalar() + "'";
  } else {
    YAML::Emitter out;
    out.SetSeqFormat(YAML::Flow);
    out.SetMapFormat(YAML::Flow);
    out << value;
    text = (value.IsSequence() ? "a list " : "a map ") + std::string(out.c_str());
  }
  // Errors are printed on one line.
  for (size_t at = 0; (at = text.find('\n', at)) != std::string::npos; at += 2) text.replace(at, 1, "\\n");
  return text;
}

// Where a value came from: a file with line numbers, or the command line.
struct Source {
  std::string file;  // "" for the command line

  std::string from(const YAML::Mark& mark) const {
    if (file.empty()) return "from the command line";
    if (mark.is_null()) return "from " + file;
    return fmt::format("from {} line {}", file, mark.line + 1);
  }
  std::string in(const YAML::Mark& mark) const {
    if (file.empty()) return "(from the command line)";
    if (mark.is_null()) return "in " + file;
    return fmt::format("in {} (line {})", file, mark.line + 1);
  }
};

YAML::Node parse_yaml(const std::string& text, const std::string& name) {
  try {
    return YAML::Load(text);
  } catch (const YAML::Exception& e) {
    if (e.mark.is_null()) fail("YAML syntax error in {}: {}", name, e.msg);
    fail("YAML syntax error in {} (line {}, column {}): {}", name, e.mark.line + 1, e.mark.column + 1, e.msg);
  }
}

// The value in its canonical form, or nullopt if it is not of the type.
std::optional<YAML::Node> convert_scalar(Scalar scalar, const YAML::Node& value) {
  if (value.IsNull()) {
    if (scalar == Scalar::StringOrNull) return YAML::Node();
    return std::nullopt;
  }
  if (!value.IsScalar()) return std::nullopt;
  const std::string& text = value.Scalar();
  switch (scalar) {
    case Scalar::Int:
      if (auto parsed = parse_int(text)) return YAML::Node(std::to_string(*parsed));
      return std::nullopt;
    case Scalar::Float:
      if (auto parsed = parse_float(text)) return YAML::Node(format_float(*parsed));
      return std::nullopt;
    case Scalar::Bool:
      if (auto parsed = parse_bool(text)) return YAML::Node(std::string(*parsed ? "true" : "false"));
      return std::nullopt;
    default:
      return YAML::Node(text);
  }
}

YAML::Node convert(const std::string& path, Kind kind, const YAML::Node& value, const Source& source,
                   const YAML::Mark& mark) {
  if (!kind.list) {
    auto converted = convert_scalar(kind.scalar, value);
    if (!converted)
      fail("config key '{}' expects {}, got {} ({})", path, type_name(kind), show(value), source.from(mark));
    return *converted;
  }
  if (!value.IsSequence())
    fail("config key '{}' expects {}, got {} ({})", path, type_name(kind), show(value), source.from(mark));
  YAML::Node list(YAML::NodeType::Sequence);
  for (size_t i = 0; i < value.size(); ++i) {
    auto converted = convert_scalar(kind.scalar, value[i]);
    if (!converted)
      fail("config key '{}' expects {}, got {} at index {} ({})", path, type_name(kind), show(value[i]), i,
           source.from(mark));
    list.push_back(*converted);
  }
  return list;
}

// Checks the schema and returns its defaults in canonical form.
YAML::Node build(const YAML::Node& schema, const std::string& path, const Source& source,
                 const YAML::Mark& mark) {
  if (!schema.IsMap()) {
    const auto kind = kind_of(schema);
    if (!kind)
      fail("config key '{}' in {}: a list default must hold ints, floats, bools or strings", path,
           source.file);
    return convert(path, *kind, schema, source, mark);
  }
  YAML::Node section(YAML::NodeType::Map);
  for (const auto& entry : schema) {
    const std::string key = entry.first.Scalar();
    if (!entry.first.IsScalar() || key.empty() || key.find('.') != std::string::npos)
      fail("config key '{}' {}: keys must be non-empty names without '.'", join_path(path, key),
           source.in(entry.first.Mark()));
    section[key] = build(entry.second, join_path(path, key), source, entry.first.Mark());
  }
  return section;
}

void collect_paths(const YAML::Node& section, const std::string& prefix, std::vector<std::string>& paths) {
  for (const auto& entry : section) {
    // A copy: growing `paths` below would leave a reference to its last element dangling.
    const std::string path = join_path(prefix, entry.first.Scalar());
    paths.push_back(path);
    if (entry.second.IsMap()) collect_paths(entry.second, path, paths);
  }
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> previous(b.size() + 1), current(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) previous[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    current[0] = i;
    for (size_t j = 1; j <= b.size(); ++j)
      current[j] = std::min({previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (a[i - 1] != b[j - 1])});
    std::swap(previous, current);
  }
  return previous[b.size()];
}

// Close enough to be the key that was meant: a typo or two, scaled to the length typed.
bool is_close(size_t distance, size_t length) {
  return distance <= std::clamp<size_t>(length / 3, 1, 3);
}

// "did you mean" for an unknown key, or the keys that its section does have.
std::string hint(const YAML::Node& schema, const std::string& path) {
  std::vector<std::string> candidates;
  collect_paths(schema, "", candidates);
  // The unknown key's own sections exist, but were not what was meant.
  candidates.erase(std::remove_if(candidates.begin(), candidates.end(),
                                  [&](const std::string& c) { return path.rfind(c + ".", 0) == 0; }),
                   candidates.end());
  // A typo within the right section is the likelier mistake; a right name in the wrong section
  // (or at the top level) comes second.
  const std::string* best = nullptr;
  std::pair<size_t, size_t> best_score{std::numeric_limits<size_t>::max(), 0};
  for (const std::string& candidate : candidates) {
    const size_t distance = edit_distance(path, candidate);
    if (is_close(distance, path.size()) && distance < best_score.first) {
      best = &candidate;
      best_score = {distance, 0};
    }
  }
  if (!best) {
    const std::string name = last_part(path);
    for (const std::string& candidate : candidates) {
      const std::pair<size_t, size_t> score{edit_distance(name, last_part(candidate)),
                                            edit_distance(path, candidate)};
      if (is_close(score.first, name.size()) && score < best_score) {
        best = &candidate;
        best_score = score;
      }
    }
  }
  if (best) return fmt::format("did you mean '{}'?", *best);

  std::string section = path;
  std::optional<YAML::Node> node;
  do {
    section = section.find('.') == std::string::npos ? "" : section.substr(0, section.rfind('.'));
    node = find(schema, section);
  } while (!node || !node->IsMap());
  std::vector<std::string> keys;
  for (const auto& entry : *node) keys.push_back(entry.first.Scalar());
  if (section.empty()) return fmt::format("valid top-level keys: {}", fmt::join(keys, ", "));
  return fmt::format("valid keys in '{}': {}", section, fmt::join(keys, ", "));
}

// Merges a value (a whole section or a leaf) given for a dotted path over the config.
void assign(const YAML::Node& schema, YAML::Node& root, const std::string& path, const YAML::Node& value,
            const Source& source, const YAML::Mark& mark) {
  const auto target = find(schema, path);
  if (!target) fail("unknown config key '{}' {}; {}", path, source.in(mark), hint(schema, path));
  if (!target->IsMap()) {
    set(root, path, convert(path, *kind_of(*target), value, source, mark));
    return;
  }
  if (!value.IsMap())
    fail("config key '{}' expects a section of keys, got {} ({})", path, show(value), source.from(mark));
  for (const auto& entry : value) {
    if (!entry.first.IsScalar())
      fail("config key {} under '{}' is not a name ({})", show(entry.first), path,
           source.from(entry.first.Mark()));
    assign(schema, root, join_path(path, entry.first.Scalar()), entry.second, source, entry.first.Mark());
  }
}

// The type of a key that the code asks for: not finding it is a bug, but still a clear error.
Kind leaf_kind(const YAML::Node& schema, const std::string& key) {
  const auto node = find(schema, key);
  if (!node) fail("unknown config key '{}' (asked for by the code); {}", key, hint(schema, key));
  if (node->IsMap()) fail("config key '{}' is a section, not a value", key);
  return *kind_of(*node);
}

void expect_kind(const std::string& key, Kind kind, Kind wanted) {
  if (!(kind == wanted)) fail("config key '{}' holds {}, not {}", key, type_name(kind), type_name(wanted));
}

void emit_scalar(YAML::Emitter& out, Scalar scalar, const YAML::Node& value) {
  if (value.IsNull()) {
    out << YAML::Null;
  } else if ((scalar == Scalar::String || scalar == Scalar::StringOrNull) && looks_typed(value.Scalar())) {
    // So that a string such as "1" or "yes" reads back as a string, in Python too.
    out << YAML::DoubleQuoted << value.Scalar();
  } else {
    out << value.Scalar();
  }
}

void emit(YAML::Emitter& out, const YAML::Node& schema, const YAML::Node& value) {
  if (schema.IsMap()) {
    out << YAML::BeginMap;
    for (const auto& entry : schema) {
      const std::string& key = entry.first.Scalar();
      out << YAML::Key << key << YAML::Value;
      emit(out, entry.second, value[key]);
    }
    out << YAML::EndMap;
    return;
  }
  const Kind kind = *kind_of(schema);
  if (!kind.list) {
    emit_scalar(out, kind.scalar, value);
    return;
  }
  out << YAML::Flow << YAML::BeginSeq;
  for (const auto& element : value) emit_scalar(out, kind.scalar, element);
  out << YAML::EndSeq;
}

}  // namespace

Config Config::load(const std::string& defaults_yaml, const std::string& file,
                    const std::vector<std::string>& overrides) {
  Config config;
  const std::string defaults_name = "the built-in defaults";
  config.schema_ = parse_yaml(defaults_yaml, defaults_name);
  if (!config.schema_.IsMap()) fail("{} must be a map of keys", defaults_name);
  config.root_ = build(config.schema_, "", Source{defaults_name}, YAML::Mark::null_mark());
  config.defaults_ = YAML::Clone(config.root_);

  if (!file.empty()) {
    // A directory opens and reads as empty, which would silently mean "no changes".
    if (std::filesystem::is_directory(file)) fail("config file {} is a directory", file);
    std::ifstream in(file, std::ios::binary);
    if (!in) fail("cannot open config file {}: {}", file, std::strerror(errno));
    std::ostringstream text;
    text << in.rdbuf();
    const YAML::Node document = parse_yaml(text.str(), file);
    // An empty file (or one of only comments) changes nothing.
    if (!document.IsNull()) {
      if (!document.IsMap()) fail("config file {} must be a map of keys, got {}", file, show(document));
      assign(config.schema_, config.root_, "", document, Source{file}, YAML::Mark::null_mark());
    }
  }

  for (const std::string& item : overrides) {
    const size_t eq = item.find('=');
    if (eq == std::string::npos || eq == 0)
      fail("malformed override '{}': expected key=value, e.g. trainer.max_steps=100", item);
    const std::string key = item.substr(0, eq), text = item.substr(eq + 1);
    // `key=` gives an empty string, as in Hydra, rather than YAML's null.
    const YAML::Node value =
        text.empty() ? YAML::Node(std::string()) : parse_yaml(text, fmt::format("override '{}'", item));
    assign(config.schema_, config.root_, key, value, Source{}, YAML::Mark::null_mark());
  }
  return config;
}

bool Config::has(const std::string& key) const {
  return find(schema_, key).has_value();
}

bool Config::is_null(const std::string& key) const {
  leaf_kind(schema_, key);  // throws for an unknown key or a section
  return find(root_, key)->IsNull();
}

bool Config::is_default(const std::string& key) const {
  leaf_kind(schema_, key);  // throws for an unknown key or a section
  return YAML::Dump(*find(root_, key)) == YAML::Dump(*find(defaults_, key));
}

int64_t Config::get_int(const std::string& key) const {
  expect_kind(key, leaf_kind(schema_, key), {Scalar::Int, false});
  return *parse_int(find(root_, key)->Scalar());
}

double Config::get_float(const std::string& key) const {
  expect_kind(key, leaf_kind(schema_, key), {Scalar::Float, false});
  return *parse_float(find(root_, key)->Scalar());
}

bool Config::get_bool(const std::string& key) const {
  expect_kind(key, leaf_kind(schema_, key), {Scalar::Bool, false});
  return *parse_bool(find(root_, key)->Scalar());
}

std::string Config::get_string(const std::string& key) const {
  const Kind kind = leaf_kind(schema_, key);
  if (!(kind == Kind{Scalar::StringOrNull, false})) expect_kind(key, kind, {Scalar::String, false});
  const YAML::Node value = *find(root_, key);
  return value.IsNull() ? std::string() : value.Scalar();
}

std::vector<int64_t> Config::get_int_list(const std::string& key) const {
  expect_kind(key, leaf_kind(schema_, key), {Scalar::Int, true});
  std::vector<int64_t> values;
  for (const auto& element : existing(root_, key)) values.push_back(*parse_int(element.Scalar()));
  return values;
}

std::vector<double> Config::get_float_list(const std::string& key) const {
  expect_kind(key, leaf_kind(schema_, key), {Scalar::Float, true});
  std::vector<double> values;
  for (const auto& element : existing(root_, key)) values.push_back(*parse_float(element.Scalar()));
  return values;
}

std::vector<std::string> Config::get_string_list(const std::string& key) const {
  expect_kind(key, leaf_kind(schema_, key), {Scalar::String, true});
  std::vector<std::string> values;
  for (const auto& element : existing(root_, key)) values.push_back(element.Scalar());
  return values;
}

std::string Config::to_yaml() const {
  YAML::Emitter out;
  emit(out, schema_, root_);
  return std::string(out.c_str()) + "\n";
}

void Config::save(const std::string& path) const {
  // Written aside and renamed, so that a crash mid-write never leaves a truncated config behind.
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) fail("cannot write {}: {}", tmp, std::strerror(errno));
    out << to_yaml();
    out.close();
    if (!out) fail("cannot write {}: {}", tmp, std::strerror(errno));
  }
  std::error_code error;
  std::filesystem::rename(tmp, path, error);
  if (error) fail("cannot rename {} to {}: {}", tmp, path, error.message());
}

}  // namespace aligner
