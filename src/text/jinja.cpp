#include "text/jinja.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <initializer_list>

#include "core/error.h"
#include "text/utf8.h"

namespace aligner::jinja {

namespace {

// Bounds that keep a hostile template from exhausting memory, stack or time. Real chat templates
// stay orders of magnitude below each.
constexpr size_t kMaxText = size_t(1) << 24;   // bytes in the output or any string a template builds
constexpr size_t kMaxItems = size_t(1) << 20;  // elements in a list a template builds
constexpr int64_t kMaxRange = 100000;          // jinja2's sandbox refuses larger range()s too
constexpr uint32_t kMaxNesting = 512;          // lists and dicts inside each other
constexpr int kMaxDepth = 500;                 // nested evaluation: expressions, blocks, macro calls
constexpr int kMaxParseDepth = 100;            // nested brackets, expressions and blocks in the source
constexpr int kMaxExprDepth = 250;             // depth of an expression's tree (a + b + c + ... nests too)
constexpr int64_t kMaxSteps = 5'000'000;       // expressions, statements and loop iterations per render

// An error inside the engine; the line is filled in by the innermost node that sees it, and the
// template's name added where it leaves the engine.
struct Failure {
  std::string message;
  int line = 0;
};

template <class... Args>
[[noreturn]] void raise(fmt::format_string<Args...> format, Args&&... args) {
  throw Failure{fmt::format(format, std::forward<Args>(args)...), 0};
}

void check_text_size(size_t size) {
  if (size > kMaxText) raise("the template builds a string of more than {} bytes", kMaxText);
}

// Bytes of the string values and items of the lists this thread's render has made so far: many
// values each under kMaxText or kMaxItems (a join of a join of a map over characters, or forty
// `set v = [0] * 1000000`) could still take minutes and gigabytes.
thread_local size_t built_bytes = 0, built_items = 0;
constexpr size_t kMaxBuilt = size_t(1) << 28, kMaxBuiltItems = size_t(1) << 23;

// ---------------------------------------------------------------------------------------------
// Text as Python sees it: code points, and str.isspace() for whitespace.

bool py_space(uint32_t cp) {
  return (cp >= 0x1C && cp <= 0x1F) || utf8::is_whitespace(cp);
}

bool is_ascii(std::string_view s) {
  return std::all_of(s.begin(), s.end(), [](char c) { return static_cast<unsigned char>(c) < 0x80; });
}

size_t cp_count(std::string_view s) {
  size_t n = 0;
  for (char c : s) n += (static_cast<unsigned char>(c) & 0xC0) != 0x80;
  return n;
}

// Byte offset where each code point starts, and s.size() last.
std::vector<size_t> cp_starts(std::string_view s) {
  std::vector<size_t> starts;
  for (size_t i = 0; i < s.size(); ++i) {
    if ((static_cast<unsigned char>(s[i]) & 0xC0) != 0x80) starts.push_back(i);
  }
  starts.push_back(s.size());
  return starts;
}

std::vector<uint32_t> code_points(std::string_view s) {
  std::vector<uint32_t> out;
  for (size_t i = 0; i < s.size();) out.push_back(utf8::next(s, i));
  return out;
}

// The code point that ends at `end`, and where it starts.
uint32_t prev_cp(std::string_view s, size_t end, size_t& start) {
  start = end - 1;
  while (start > 0 && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80) --start;
  size_t i = start;
  return utf8::next(s, i);
}

// Python's str.strip family: `chars` null strips whitespace, else any of its code points.
std::string_view py_strip(std::string_view s, const std::string* chars, bool left, bool right) {
  std::vector<uint32_t> set;
  if (chars) set = code_points(*chars);
  auto strip = [&](uint32_t cp) {
    return chars ? std::find(set.begin(), set.end(), cp) != set.end() : py_space(cp);
  };
  size_t b = 0, e = s.size();
  if (left) {
    while (b < e) {
      size_t i = b;
      if (!strip(utf8::next(s, i))) break;
      b = i;
    }
  }
  if (right) {
    while (e > b) {
      size_t start;
      if (!strip(prev_cp(s, e, start))) break;
      e = start;
    }
  }
  return s.substr(b, e - b);
}

// Case mapping is ASCII only: chat templates change the case of role names and keywords.
char ascii_upper(char c) {
  return c >= 'a' && c <= 'z' ? static_cast<char>(c - 32) : c;
}
char ascii_lower(char c) {
  return c >= 'A' && c <= 'Z' ? static_cast<char>(c + 32) : c;
}
bool ascii_alpha(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}
bool ascii_digit(char c) {
  return c >= '0' && c <= '9';
}

std::string upper(std::string s) {
  for (char& c : s) c = ascii_upper(c);
  return s;
}
std::string lower(std::string s) {
  for (char& c : s) c = ascii_lower(c);
  return s;
}

// Python's str.splitlines().
std::vector<std::string> split_lines(std::string_view s) {
  std::vector<std::string> lines;
  size_t start = 0, i = 0;
  while (i < s.size()) {
    size_t at = i;
    uint32_t cp = utf8::next(s, i);
    bool breaks = cp == '\n' || cp == '\r' || cp == 0x0B || cp == 0x0C || (cp >= 0x1C && cp <= 0x1E) ||
                  cp == 0x85 || cp == 0x2028 || cp == 0x2029;
    if (!breaks) continue;
    lines.emplace_back(s.substr(start, at - start));
    if (cp == '\r' && i < s.size() && s[i] == '\n') ++i;
    start = i;
  }
  if (start < s.size()) lines.emplace_back(s.substr(start));
  return lines;
}

// ---------------------------------------------------------------------------------------------
// Values: what jinja2 would hold as Python objects.

struct Value;
struct Dict;
struct Function;
using List = std::vector<Value>;

struct Value {
  enum Kind : uint8_t {
    kUndefined,
    kNone,
    kBool,
    kInt,
    kFloat,
    kString,
    kList,
    kTuple,
    kDict,
    kNamespace,
    kFunction
  };
  Kind kind = kUndefined;
  bool b = false;
  int64_t i = 0;
  double f = 0;
  uint32_t depth = 0;                // how deeply lists and dicts nest inside this one
  bool has_namespace = false;        // is a namespace or holds one
  std::string s;                     // kString; kUndefined: what is undefined, for the error if it is used
  std::shared_ptr<const List> list;  // kList, kTuple
  std::shared_ptr<Dict> dict;        // kDict (never changed once made), kNamespace (set changes it)
  std::shared_ptr<const Function> fn;
};

struct Dict {
  std::vector<std::pair<Value, Value>> items;
};

struct Args {
  std::vector<Value> pos;
  std::vector<std::pair<std::string, Value>> kw;
};

struct Function {
  std::string name;
  std::function<Value(Args&)> call;
};

Value undefined(std::string what) {
  Value v;
  v.s = std::move(what);
  return v;
}
Value none() {
  Value v;
  v.kind = Value::kNone;
  return v;
}
Value boolean(bool b) {
  Value v;
  v.kind = Value::kBool;
  v.b = b;
  return v;
}
Value integer(int64_t i) {
  Value v;
  v.kind = Value::kInt;
  v.i = i;
  return v;
}
Value number(double f) {
  Value v;
  v.kind = Value::kFloat;
  v.f = f;
  return v;
}
Value string(std::string s) {
  check_text_size(s.size());
  built_bytes += s.size();
  if (built_bytes > kMaxBuilt) raise("the template builds more than {} bytes of strings in all", kMaxBuilt);
  Value v;
  v.kind = Value::kString;
  v.s = std::move(s);
  return v;
}
Value sequence(List items, bool tuple = false) {
  if (items.size() > kMaxItems) raise("the template builds a list of more than {} items", kMaxItems);
  built_items += items.size();
  if (built_items > kMaxBuiltItems)
    raise("the template builds more than {} list items in all", kMaxBuiltItems);
  Value v;
  v.kind = tuple ? Value::kTuple : Value::kList;
  for (const Value& x : items) {
    v.depth = std::max(v.depth, x.depth + 1);
    v.has_namespace |= x.has_namespace;
  }
  if (v.depth > kMaxNesting) raise("lists and dicts nested more than {} deep", kMaxNesting);
  v.list = std::make_shared<const List>(std::move(items));
  return v;
}
Value mapping(Dict d, Value::Kind kind = Value::kDict) {
  Value v;
  v.kind = kind;
  v.has_namespace = kind == Value::kNamespace;
  for (const auto& [k, x] : d.items) {
    v.depth = std::max({v.depth, k.depth + 1, x.depth + 1});
    v.has_namespace |= k.has_namespace || x.has_namespace;
  }
  if (v.depth > kMaxNesting) raise("lists and dicts nested more than {} deep", kMaxNesting);
  v.dict = std::make_shared<Dict>(std::move(d));
  return v;
}
Value function(std::string name, std::function<Value(Args&)> call) {
  Value v;
  v.kind = Value::kFunction;
  v.fn = std::make_shared<const Function>(Function{std::move(name), std::move(call)});
  return v;
}

bool is_seq(const Value& v) {
  return v.kind == Value::kList || v.kind == Value::kTuple;
}
bool is_num(const Value& v) {
  return v.kind == Value::kBool || v.kind == Value::kInt || v.kind == Value::kFloat;
}
bool is_intlike(const Value& v) {
  return v.kind == Value::kBool || v.kind == Value::kInt;
}
int64_t as_int(const Value& v) {
  return v.kind == Value::kBool ? v.b : v.i;
}
double as_double(const Value& v) {
  return v.kind == Value::kFloat ? v.f : static_cast<double>(as_int(v));
}

const char* type_name(const Value& v) {
  switch (v.kind) {
    case Value::kUndefined:
      return "Undefined";
    case Value::kNone:
      return "NoneType";
    case Value::kBool:
      return "bool";
    case Value::kInt:
      return "int";
    case Value::kFloat:
      return "float";
    case Value::kString:
      return "str";
    case Value::kList:
      return "list";
    case Value::kTuple:
      return "tuple";
    case Value::kDict:
      return "dict";
    case Value::kNamespace:
      return "Namespace";
    case Value::kFunction:
      return "function";
  }
  return "?";
}

// Using an undefined value for more than printing, testing or iterating it is an error, as with
// jinja2's default Undefined.
[[noreturn]] void undefined_error(const Value& v) {
  throw Failure{v.s, 0};
}
const Value& defined(const Value& v) {
  if (v.kind == Value::kUndefined) undefined_error(v);
  return v;
}

bool truthy(const Value& v) {
  switch (v.kind) {
    case Value::kUndefined:
    case Value::kNone:
      return false;
    case Value::kBool:
      return v.b;
    case Value::kInt:
      return v.i != 0;
    case Value::kFloat:
      return v.f != 0;
    case Value::kString:
      return !v.s.empty();
    case Value::kList:
    case Value::kTuple:
      return !v.list->empty();
    case Value::kDict:
      return !v.dict->items.empty();
    default:
      return true;
  }
}

const Value* find_key(const Dict& d, const Value& key);

bool equals(const Value& a, const Value& b) {
  if (is_num(a) && is_num(b)) {
    if (a.kind == Value::kFloat || b.kind == Value::kFloat) return as_double(a) == as_double(b);
    return as_int(a) == as_int(b);
  }
  if (a.kind != b.kind) return false;
  switch (a.kind) {
    case Value::kUndefined:
    case Value::kNone:
      return true;
    case Value::kString:
      return a.s == b.s;
    case Value::kList:
    case Value::kTuple:
      return a.list->size() == b.list->size() &&
             std::equal(a.list->begin(), a.list->end(), b.list->begin(), equals);
    case Value::kDict: {
      if (a.dict->items.size() != b.dict->items.size()) return false;
      for (const auto& item : a.dict->items) {
        const Value* other = find_key(*b.dict, item.first);
        if (!other || !equals(*other, item.second)) return false;
      }
      return true;
    }
    case Value::kNamespace:
      return a.dict == b.dict;
    case Value::kFunction:
      return a.fn == b.fn;
    default:
      return false;
  }
}

const Value* find_key(const Dict& d, const Value& key) {
  for (const auto& [k, v] : d.items) {
    if (equals(k, key)) return &v;
  }
  return nullptr;
}
const Value* find_key(const Dict& d, std::string_view key) {
  for (const auto& [k, v] : d.items) {
    if (k.kind == Value::kString && k.s == key) return &v;
  }
  return nullptr;
}
void set_key(Dict& d, Value key, Value value) {
  for (auto& [k, v] : d.items) {
    if (equals(k, key)) {
      v = std::move(value);
      return;
    }
  }
  d.items.emplace_back(std::move(key), std::move(value));
}

// Python's a < b, for the types that order.
bool less(const Value& a, const Value& b) {
  if (is_num(a) && is_num(b)) {
    if (a.kind == Value::kFloat || b.kind == Value::kFloat) return as_double(a) < as_double(b);
    return as_int(a) < as_int(b);
  }
  if (a.kind == Value::kUndefined) undefined_error(a);
  if (b.kind == Value::kUndefined) undefined_error(b);
  if (a.kind == Value::kString && b.kind == Value::kString) return a.s < b.s;  // UTF-8 keeps code point order
  if (is_seq(a) && a.kind == b.kind) {
    size_t n = std::min(a.list->size(), b.list->size());
    for (size_t k = 0; k < n; ++k) {
      if (!equals((*a.list)[k], (*b.list)[k])) return less((*a.list)[k], (*b.list)[k]);
    }
    return a.list->size() < b.list->size();
  }
  raise("'<' not supported between instances of '{}' and '{}'", type_name(a), type_name(b));
}

// Python's repr(float), which is also how json.dumps writes floats.
std::string py_float(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
  std::string s = fmt::format("{}", d);
  if (s.find_first_of(".e") == std::string::npos) s += ".0";
  return s;
}

void append_hex_escape(std::string& out, uint32_t cp) {
  if (cp < 0x100) {
    out += fmt::format("\\x{:02x}", cp);
  } else if (cp < 0x10000) {
    out += fmt::format("\\u{:04x}", cp);
  } else {
    out += fmt::format("\\U{:08x}", cp);
  }
}

// What Python's repr() escapes beyond ASCII controls: other controls, separators, formatting
// characters and private use (str.isprintable() is false for them).
bool py_unprintable(uint32_t cp) {
  return cp < 0x20 || (cp >= 0x7F && cp <= 0xA0) || cp == 0xAD || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200F) || (cp >= 0x2028 && cp <= 0x202F) || (cp >= 0x205F && cp <= 0x2064) ||
         cp == 0x3000 || cp == 0xFEFF || (cp >= 0xD800 && cp <= 0xF8FF);
}

void py_repr_string(const std::string& s, std::string& out) {
  char quote = s.find('\'') != std::string::npos && s.find('"') == std::string::npos ? '"' : '\'';
  out += quote;
  for (size_t i = 0; i < s.size();) {
    uint32_t cp = utf8::next(s, i);
    if (cp == static_cast<uint32_t>(quote) || cp == '\\') {
      out += '\\';
      out += static_cast<char>(cp);
    } else if (cp == '\n') {
      out += "\\n";
    } else if (cp == '\r') {
      out += "\\r";
    } else if (cp == '\t') {
      out += "\\t";
    } else if (py_unprintable(cp)) {
      append_hex_escape(out, cp);
    } else {
      utf8::append(out, cp);
    }
  }
  out += quote;
}

// `level` counts the containers around v. Lists and dicts cannot nest deeper than kMaxNesting, but
// a namespace changes after it is made, so one can hold itself: the count stops that.
void repr(const Value& v, std::string& out, uint32_t level = 0);
std::string to_str(const Value& v);

void repr_items(const List& items, std::string& out, uint32_t level) {
  for (size_t k = 0; k < items.size(); ++k) {
    if (k) out += ", ";
    repr(items[k], out, level);
    check_text_size(out.size());
  }
}

void repr_dict(const Dict& d, std::string& out, uint32_t level) {
  out += '{';
  for (size_t k = 0; k < d.items.size(); ++k) {
    if (k) out += ", ";
    repr(d.items[k].first, out, level);
    out += ": ";
    repr(d.items[k].second, out, level);
    check_text_size(out.size());
  }
  out += '}';
}

void repr(const Value& v, std::string& out, uint32_t level) {
  if (level > kMaxNesting)
    raise("lists, dicts and namespaces nested more than {} deep (does a namespace hold itself?)",
          kMaxNesting);
  switch (v.kind) {
    case Value::kUndefined:
      out += "Undefined";
      return;
    case Value::kString:
      py_repr_string(v.s, out);
      return;
    case Value::kList:
      out += '[';
      repr_items(*v.list, out, level + 1);
      out += ']';
      return;
    case Value::kTuple:
      out += '(';
      repr_items(*v.list, out, level + 1);
      if (v.list->size() == 1) out += ',';
      out += ')';
      return;
    case Value::kDict:
      repr_dict(*v.dict, out, level + 1);
      return;
    case Value::kNamespace:
      out += "<Namespace ";
      repr_dict(*v.dict, out, level + 1);
      out += '>';
      return;
    default:
      out += to_str(v);
  }
}

// Python's str(), which is what {{ }} prints.
std::string to_str(const Value& v) {
  switch (v.kind) {
    case Value::kUndefined:
      return {};
    case Value::kNone:
      return "None";
    case Value::kBool:
      return v.b ? "True" : "False";
    case Value::kInt:
      return std::to_string(v.i);
    case Value::kFloat:
      return py_float(v.f);
    case Value::kString:
      return v.s;
    case Value::kFunction:
      return "<function " + v.fn->name + ">";
    default: {
      std::string out;
      repr(v, out);
      return out;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// JSON, both ways.

Value from_json(const nlohmann::ordered_json& j) {
  switch (j.type()) {
    case nlohmann::ordered_json::value_t::null:
      return none();
    case nlohmann::ordered_json::value_t::boolean:
      return boolean(j.get<bool>());
    case nlohmann::ordered_json::value_t::number_integer:
      return integer(j.get<int64_t>());
    case nlohmann::ordered_json::value_t::number_unsigned: {
      uint64_t u = j.get<uint64_t>();
      if (u > static_cast<uint64_t>(INT64_MAX)) return number(static_cast<double>(u));
      return integer(static_cast<int64_t>(u));
    }
    case nlohmann::ordered_json::value_t::number_float:
      return number(j.get<double>());
    case nlohmann::ordered_json::value_t::string:
      return string(j.get<std::string>());
    case nlohmann::ordered_json::value_t::array: {
      List items;
      items.reserve(j.size());
      for (const auto& x : j) items.push_back(from_json(x));
      return sequence(std::move(items));
    }
    case nlohmann::ordered_json::value_t::object: {
      Dict d;
      d.items.reserve(j.size());
      for (const auto& [k, x] : j.items()) d.items.emplace_back(string(k), from_json(x));
      return mapping(std::move(d));
    }
    default:
      raise("a template variable holds binary data");
  }
}

struct JsonStyle {
  bool ensure_ascii = false;
  bool indent = false;
  std::string indent_text;
  std::string item_sep = ", ";
  std::string key_sep = ": ";
  bool sort_keys = false;
};

void json_string(const std::string& s, bool ensure_ascii, std::string& out) {
  out += '"';
  for (size_t i = 0; i < s.size();) {
    uint32_t cp = utf8::next(s, i);
    switch (cp) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\f':
        out += "\\f";
        break;
      default:
        if (cp < 0x20 || (ensure_ascii && cp >= 0x7F && cp < 0x10000)) {
          out += fmt::format("\\u{:04x}", cp);
        } else if (ensure_ascii && cp >= 0x10000) {
          uint32_t c = cp - 0x10000;
          out += fmt::format("\\u{:04x}\\u{:04x}", 0xD800 + (c >> 10), 0xDC00 + (c & 0x3FF));
        } else {
          utf8::append(out, cp);
        }
    }
  }
  out += '"';
}

// json.dumps(value, ...) as Python writes it.
void to_json(const Value& v, const JsonStyle& st, int level, std::string& out) {
  check_text_size(out.size());
  auto newline = [&](int lvl) {
    if (!st.indent) return;
    out += '\n';
    for (int k = 0; k < lvl; ++k) out += st.indent_text;
  };
  switch (v.kind) {
    case Value::kNone:
      out += "null";
      return;
    case Value::kBool:
      out += v.b ? "true" : "false";
      return;
    case Value::kInt:
      out += std::to_string(v.i);
      return;
    case Value::kFloat:
      if (std::isnan(v.f)) {
        out += "NaN";
      } else if (std::isinf(v.f)) {
        out += v.f > 0 ? "Infinity" : "-Infinity";
      } else {
        out += py_float(v.f);
      }
      return;
    case Value::kString:
      json_string(v.s, st.ensure_ascii, out);
      return;
    case Value::kList:
    case Value::kTuple: {
      if (v.list->empty()) {
        out += "[]";
        return;
      }
      out += '[';
      for (size_t k = 0; k < v.list->size(); ++k) {
        if (k) out += st.item_sep;
        newline(level + 1);
        to_json((*v.list)[k], st, level + 1, out);
      }
      newline(level);
      out += ']';
      return;
    }
    case Value::kDict: {
      if (v.dict->items.empty()) {
        out += "{}";
        return;
      }
      std::vector<std::pair<std::string, const Value*>> items;
      for (const auto& [k, x] : v.dict->items) {
        std::string key;
        if (k.kind == Value::kString) {
          key = k.s;
        } else if (k.kind == Value::kNone) {
          key = "null";
        } else if (k.kind == Value::kBool) {
          key = k.b ? "true" : "false";
        } else if (k.kind == Value::kInt || k.kind == Value::kFloat) {
          key = to_str(k);
        } else {
          raise("keys must be str, int, float, bool or None, not {}", type_name(k));
        }
        items.emplace_back(std::move(key), &x);
      }
      if (st.sort_keys) {
        std::stable_sort(items.begin(), items.end(),
                         [](const auto& a, const auto& b) { return a.first < b.first; });
      }
      out += '{';
      for (size_t k = 0; k < items.size(); ++k) {
        if (k) out += st.item_sep;
        newline(level + 1);
        json_string(items[k].first, st.ensure_ascii, out);
        out += st.key_sep;
        to_json(*items[k].second, st, level + 1, out);
      }
      newline(level);
      out += '}';
      return;
    }
    default:
      raise("Object of type {} is not JSON serializable", type_name(v));
  }
}

// ---------------------------------------------------------------------------------------------
// Lexer: the token stream jinja2's lexer gives, trim_blocks and lstrip_blocks applied.

enum class Tok : uint8_t {
  kData,
  kVarBegin,
  kVarEnd,
  kBlockBegin,
  kBlockEnd,
  kName,
  kString,
  kInt,
  kFloat,
  kOp,
  kEof
};

struct Token {
  Tok type;
  std::string text;  // data, name, operator, or the decoded string literal
  int line;
  int64_t ival = 0;
  double fval = 0;
};

const char* describe(Tok t) {
  switch (t) {
    case Tok::kData:
      return "template data";
    case Tok::kVarBegin:
      return "'{{'";
    case Tok::kVarEnd:
      return "end of print statement";
    case Tok::kBlockBegin:
      return "'{%'";
    case Tok::kBlockEnd:
      return "end of statement block";
    case Tok::kName:
      return "name";
    case Tok::kString:
      return "string";
    case Tok::kInt:
      return "integer";
    case Tok::kFloat:
      return "float";
    case Tok::kOp:
      return "operator";
    case Tok::kEof:
      return "end of template";
  }
  return "?";
}

std::string describe(const Token& t) {
  if (t.type == Tok::kName || t.type == Tok::kOp) return "'" + t.text + "'";
  return describe(t.type);
}

[[noreturn]] void syntax_error(int line, std::string message) {
  throw Failure{std::move(message), line};
}

class Lexer {
 public:
  explicit Lexer(std::string_view source) {
    // As jinja2: \r\n and \r read as \n, and one newline at the very end is dropped
    // (keep_trailing_newline=False).
    src_.reserve(source.size());
    for (size_t i = 0; i < source.size(); ++i) {
      if (source[i] == '\r') {
        src_ += '\n';
        if (i + 1 < source.size() && source[i + 1] == '\n') ++i;
      } else {
        src_ += source[i];
      }
    }
    if (!src_.empty() && src_.back() == '\n') src_.pop_back();
  }

  std::vector<Token> run() {
    while (pos_ < src_.size()) root();
    tokens_.push_back({Tok::kEof, {}, line_});
    return std::move(tokens_);
  }

 private:
  std::string src_;
  size_t pos_ = 0;
  int line_ = 1;
  bool line_starting_ = true;  // the previous match ended with a newline (or nothing came before)
  std::vector<Token> tokens_;

  bool at(size_t p, std::string_view s) const { return src_.compare(p, s.size(), s) == 0; }

  void emit_data(std::string text, int line) {
    if (!text.empty()) tokens_.push_back({Tok::kData, std::move(text), line});
  }

  // Whitespace (Python's \s) at p, its length.
  size_t space_at(size_t p) const {
    size_t i = p;
    while (i < src_.size()) {
      size_t k = i;
      if (!py_space(utf8::next(src_, k))) break;
      i = k;
    }
    return i - p;
  }

  void advance(size_t to) {
    line_ += static_cast<int>(std::count(src_.begin() + pos_, src_.begin() + to, '\n'));
    line_starting_ = to > pos_ && src_[to - 1] == '\n';
    pos_ = to;
  }

  // The text before a tag, stripped as jinja2 strips it: all whitespace before `{%-`, and with
  // lstrip_blocks the spaces between a line's start and a block or comment tag.
  std::string text_before(size_t end, char sign, bool variable) const {
    std::string_view text(src_.data() + pos_, end - pos_);
    if (sign == '-') return std::string(py_strip(text, nullptr, false, true));
    if (sign != '+' && !variable) {
      size_t l_pos = text.rfind('\n');
      l_pos = l_pos == std::string_view::npos ? 0 : l_pos + 1;
      if ((l_pos > 0 || line_starting_) && l_pos < text.size() &&
          py_strip(text.substr(l_pos), nullptr, true, false).empty()) {
        return std::string(text.substr(0, l_pos));
      }
    }
    return std::string(text);
  }

  // Length of a block end ("%}", "-%}" with the whitespace after it, "+%}") at p, or 0; trim_blocks
  // drops the newline after a plain "%}".
  size_t tag_end_at(size_t p, char close) const {
    const char end[3] = {close, '}', 0};
    if (at(p, std::string("+") + end)) return 3;
    if (at(p, std::string("-") + end)) return 3 + space_at(p + 3);
    if (at(p, end)) return 2 + (p + 2 < src_.size() && src_[p + 2] == '\n');
    return 0;
  }

  void root() {
    size_t start = pos_;
    char kind = 0;
    for (size_t p = src_.find('{', pos_); p != std::string::npos; p = src_.find('{', p + 1)) {
      if (p + 1 < src_.size() && (src_[p + 1] == '{' || src_[p + 1] == '%' || src_[p + 1] == '#')) {
        start = p;
        kind = src_[p + 1];
        break;
      }
    }
    if (!kind) {
      emit_data(src_.substr(pos_), line_);
      advance(src_.size());
      return;
    }
    char sign =
        start + 2 < src_.size() && (src_[start + 2] == '-' || src_[start + 2] == '+') ? src_[start + 2] : 0;
    size_t after = start + 2 + (sign ? 1 : 0);
    if (kind == '%') {
      size_t p = after + space_at(after);
      if (at(p, "raw")) {
        size_t q = p + 3 + space_at(p + 3);
        size_t end = at(q, "-%}") ? q + 3 + space_at(q + 3) : at(q, "%}") ? q + 2 : 0;
        if (end) {
          emit_data(text_before(start, sign, false), line_);
          advance(end);
          raw();
          return;
        }
      }
    }
    emit_data(text_before(start, sign, kind == '{'), line_);
    int line = line_;
    advance(after);
    line_starting_ = false;
    if (kind == '#') {
      comment(line);
    } else {
      tokens_.push_back({kind == '{' ? Tok::kVarBegin : Tok::kBlockBegin, {}, line});
      tag(kind == '{' ? '}' : '%');
    }
  }

  void comment(int line) {
    size_t p = src_.find("#}", pos_);
    if (p == std::string::npos) syntax_error(line, "missing end of comment tag");
    size_t end;
    if (p > pos_ && src_[p - 1] == '-') {
      end = p + 2 + space_at(p + 2);
    } else if (p > pos_ && src_[p - 1] == '+') {
      end = p + 2;
    } else {
      end = p + 2 + (p + 2 < src_.size() && src_[p + 2] == '\n');
    }
    advance(end);
  }

  void raw() {
    for (size_t p = src_.find("{%", pos_); p != std::string::npos; p = src_.find("{%", p + 1)) {
      char sign = p + 2 < src_.size() && (src_[p + 2] == '-' || src_[p + 2] == '+') ? src_[p + 2] : 0;
      size_t q = p + 2 + (sign ? 1 : 0);
      q += space_at(q);
      if (!at(q, "endraw")) continue;
      q += 6;
      q += space_at(q);
      size_t end_len = tag_end_at(q, '%');
      if (!end_len) continue;
      emit_data(text_before(p, sign, false), line_);
      advance(q + end_len);
      return;
    }
    syntax_error(line_, "missing end of raw directive");
  }

  // Tokens inside {{ }} or {% %}, up to the end tag.
  void tag(char close) {
    std::vector<char> balance;
    while (true) {
      if (pos_ >= src_.size()) {
        syntax_error(line_, fmt::format("unexpected end of template, expected {}",
                                        describe(close == '}' ? Tok::kVarEnd : Tok::kBlockEnd)));
      }
      if (balance.empty()) {
        size_t n = 0;
        if (close == '%') {
          n = tag_end_at(pos_, '%');
        } else if (at(pos_, "-}}")) {
          n = 3 + space_at(pos_ + 3);
        } else if (at(pos_, "}}")) {
          n = 2;
        }
        if (n) {
          tokens_.push_back({close == '}' ? Tok::kVarEnd : Tok::kBlockEnd, {}, line_});
          advance(pos_ + n);
          return;
        }
      }
      if (size_t ws = space_at(pos_)) {
        advance(pos_ + ws);
        continue;
      }
      if (number() || name() || string_literal()) continue;
      op(balance);
    }
  }

  bool number() {
    size_t p = pos_;
    if (!ascii_digit(src_[p])) return false;
    auto digits = [&](size_t q) {  // (\d+_)*\d+ at q: its end, or q
      size_t r = q;
      while (r < src_.size() && ascii_digit(src_[r])) {
        while (r < src_.size() && ascii_digit(src_[r])) ++r;
        if (r + 1 < src_.size() && src_[r] == '_' && ascii_digit(src_[r + 1])) ++r;
      }
      return r;
    };
    // float: not right after a '.', digits with a fraction, an exponent, or both
    if (p == 0 || src_[p - 1] != '.') {
      size_t q = digits(p);
      size_t frac = q < src_.size() && src_[q] == '.' ? digits(q + 1) : q;
      bool has_frac = frac > q + 1;
      size_t e = has_frac ? frac : q;
      size_t exp_end = e;
      if (e < src_.size() && (src_[e] == 'e' || src_[e] == 'E')) {
        size_t s = e + 1;
        if (s < src_.size() && (src_[s] == '+' || src_[s] == '-')) ++s;
        size_t d = digits(s);
        if (d > s) exp_end = d;
      }
      if (has_frac || exp_end > e) {
        std::string text;
        for (size_t k = p; k < exp_end; ++k) {
          if (src_[k] != '_') text += src_[k];
        }
        tokens_.push_back({Tok::kFloat, text, line_, 0, std::strtod(text.c_str(), nullptr)});
        advance(exp_end);
        return true;
      }
    }
    int base = 10;
    size_t q = p;
    auto is_digit = [&](char c) {
      if (base == 16) return ascii_digit(c) || (ascii_lower(c) >= 'a' && ascii_lower(c) <= 'f');
      return c >= '0' && c < static_cast<char>('0' + base);
    };
    if (src_[p] == '0' && p + 2 < src_.size()) {
      char b = ascii_lower(src_[p + 1]);
      base = b == 'b' ? 2 : b == 'o' ? 8 : b == 'x' ? 16 : 10;
      size_t d = p + 2 + (src_[p + 2] == '_');
      if (base != 10 && d < src_.size() && is_digit(src_[d])) {
        q = p + 2;
      } else {
        base = 10;
      }
    }
    std::string text;
    size_t r = q;
    if (base == 10 && src_[p] == '0') {
      // 0(_?0)*
      r = p + 1;
      text = "0";
      while (r < src_.size() &&
             (src_[r] == '0' || (src_[r] == '_' && r + 1 < src_.size() && src_[r + 1] == '0'))) {
        if (src_[r] == '_') ++r;
        ++r;
      }
    } else {
      while (r < src_.size()) {
        if (src_[r] == '_' && r + 1 < src_.size() && is_digit(src_[r + 1])) {
          ++r;
        } else if (!is_digit(src_[r])) {
          break;
        }
        text += src_[r++];
      }
    }
    errno = 0;
    int64_t value = std::strtoll(text.c_str(), nullptr, base);
    if (errno == ERANGE) syntax_error(line_, "integer literal too large");
    tokens_.push_back({Tok::kInt, text, line_, value});
    advance(r);
    return true;
  }

  bool name() {
    auto ident = [](char c, bool first) {
      return ascii_alpha(c) || c == '_' || static_cast<unsigned char>(c) >= 0x80 ||
             (!first && ascii_digit(c));
    };
    if (!ident(src_[pos_], true)) return false;
    size_t r = pos_ + 1;
    while (r < src_.size() && ident(src_[r], false)) ++r;
    tokens_.push_back({Tok::kName, src_.substr(pos_, r - pos_), line_});
    advance(r);
    return true;
  }

  // A quoted string, decoded as Python's "unicode-escape" codec decodes it (as jinja2 does).
  bool string_literal() {
    char quote = src_[pos_];
    if (quote != '\'' && quote != '"') return false;
    size_t r = pos_ + 1;
    while (r < src_.size() && src_[r] != quote) r += src_[r] == '\\' ? 2 : 1;
    if (r >= src_.size()) return false;  // unterminated: not a string, an unexpected character
    std::string_view body(src_.data() + pos_ + 1, r - pos_ - 1);
    std::string out;
    for (size_t i = 0; i < body.size();) {
      if (body[i] != '\\' || i + 1 >= body.size()) {
        out += body[i++];
        continue;
      }
      char c = body[i + 1];
      i += 2;
      auto hex = [&](size_t n) {
        if (i + n > body.size()) syntax_error(line_, "truncated escape in a string literal");
        uint32_t cp = 0;
        for (size_t k = 0; k < n; ++k) {
          char h = ascii_lower(body[i + k]);
          if (!ascii_digit(h) && !(h >= 'a' && h <= 'f'))
            syntax_error(line_, "truncated escape in a string literal");
          cp = cp * 16 + static_cast<uint32_t>(ascii_digit(h) ? h - '0' : h - 'a' + 10);
        }
        i += n;
        if (cp > 0x10FFFF) syntax_error(line_, "illegal Unicode character in a string literal");
        utf8::append(out, (cp >= 0xD800 && cp <= 0xDFFF) ? 0xFFFD : cp);
      };
      switch (c) {
        case '\n':
          break;
        case '\\':
        case '\'':
        case '"':
          out += c;
          break;
        case 'a':
          out += '\a';
          break;
        case 'b':
          out += '\b';
          break;
        case 'f':
          out += '\f';
          break;
        case 'n':
          out += '\n';
          break;
        case 'r':
          out += '\r';
          break;
        case 't':
          out += '\t';
          break;
        case 'v':
          out += '\v';
          break;
        case 'x':
          hex(2);
          break;
        case 'u':
          hex(4);
          break;
        case 'U':
          hex(8);
          break;
        case 'N':
          syntax_error(line_, "\\N{...} escapes are not supported");
        default:
          if (c >= '0' && c <= '7') {
            uint32_t cp = static_cast<uint32_t>(c - '0');
            for (int k = 0; k < 2 && i < body.size() && body[i] >= '0' && body[i] <= '7'; ++k) {
              cp = cp * 8 + static_cast<uint32_t>(body[i++] - '0');
            }
            utf8::append(out, cp);
          } else {
            out += '\\';
            out += c;
          }
      }
    }
    tokens_.push_back({Tok::kString, std::move(out), line_});
    advance(r + 1);
    return true;
  }

  void op(std::vector<char>& balance) {
    static const char* kOps[] = {"//", "**", "==", "!=", ">=", "<=", "+", "-", "/", "*", "%", "~", "[",
                                 "]",  "(",  ")",  "{",  "}",  ">",  "<", "=", ".", ":", "|", ",", ";"};
    for (const char* o : kOps) {
      if (!at(pos_, o)) continue;
      char c = o[0];
      if (o[1] == 0 && (c == '(' || c == '[' || c == '{')) {
        balance.push_back(c == '(' ? ')' : c == '[' ? ']' : '}');
      } else if (o[1] == 0 && (c == ')' || c == ']' || c == '}')) {
        if (balance.empty()) syntax_error(line_, fmt::format("unexpected '{}'", c));
        if (balance.back() != c)
          syntax_error(line_, fmt::format("unexpected '{}', expected '{}'", c, balance.back()));
        balance.pop_back();
      }
      tokens_.push_back({Tok::kOp, o, line_});
      advance(pos_ + std::strlen(o));
      return;
    }
    size_t i = pos_;
    std::string c;
    utf8::append(c, utf8::next(src_, i));
    syntax_error(line_, fmt::format("unexpected char '{}'", c));
  }
};

// ---------------------------------------------------------------------------------------------
// Syntax tree.

using FilterFn = Value (*)(const Value&, Args&);
using TestFn = bool (*)(const Value&, Args&);
const FilterFn* find_filter(std::string_view name);
const TestFn* find_test(std::string_view name);

struct Expr;
using ExprPtr = std::unique_ptr<Expr>;

struct Expr {
  enum Kind {
    kConst,    // value
    kName,     // name
    kList,     // args: items
    kTuple,    // args: items
    kDict,     // args: key, value, key, value, ...
    kAttr,     // args[0].name
    kItem,     // args[0][args[1]]
    kSlice,    // args[0][args[1]:args[2]:args[3]], absent parts null
    kCall,     // args[0](args[1:], kwargs)
    kFilter,   // args[0] | name(args[1:], kwargs); args[0] null in a filter block's chain
    kTest,     // args[0] is name(args[1:], kwargs)
    kNeg,      // -args[0]
    kPos,      // +args[0]
    kNot,      // not args[0]
    kAnd,      // args[0] and args[1]
    kOr,       // args[0] or args[1]
    kBinary,   // args[0] name args[1], name one of + - * / // % **
    kCompare,  // args[0] ops[0] args[1] ops[1] args[2] ...
    kConcat,   // args[0] ~ args[1] ~ ...
    kCond,     // args[1] if args[0] else args[2] (args[2] null: undefined)
  };
  Kind kind;
  int line;
  Value value;
  std::string name;
  std::vector<ExprPtr> args;
  std::vector<std::pair<std::string, ExprPtr>> kwargs;
  std::vector<std::string> ops;
  FilterFn filter = nullptr;
  TestFn test = nullptr;
  int depth = 1;  // of the tree below: bounded, as evaluating and destroying it recurses

  void add(ExprPtr child) {
    if (child) depth = std::max(depth, child->depth + 1);
    if (depth > kMaxExprDepth) syntax_error(line, "the template nests too deeply");
    args.push_back(std::move(child));
  }
  void add(std::string key, ExprPtr child) {
    depth = std::max(depth, child->depth + 1);
    if (depth > kMaxExprDepth) syntax_error(line, "the template nests too deeply");
    kwargs.emplace_back(std::move(key), std::move(child));
  }
};

struct Stmt;
using StmtPtr = std::unique_ptr<Stmt>;
using Body = std::vector<StmtPtr>;

struct Stmt {
  enum Kind {
    kText,         // text
    kPrint,        // {{ expr }}
    kIf,           // branches; else_body
    kFor,          // for targets in expr [if cond]: body, else_body
    kSet,          // targets = expr; attr set: targets[0].attr = expr
    kSetBlock,     // targets[0] = rendered body | filters
    kMacro,        // name(params = defaults): body
    kFilterBlock,  // rendered body | filters
    kBreak,
    kContinue,
    kGeneration,  // body, its output marked as the assistant's
  };
  Kind kind;
  int line;
  std::string text;  // kText; kMacro: the name
  std::string attr;  // kSet on a namespace attribute
  ExprPtr expr, cond;
  std::vector<std::pair<ExprPtr, Body>> branches;
  Body body, else_body;
  std::vector<std::string> targets;
  std::vector<std::string> params;
  std::vector<ExprPtr> defaults;  // one per parameter, null where it has none
  std::vector<ExprPtr> filters;
  bool uses_loop = false;  // kFor: the body may read `loop`, so it is made for each iteration
};

}  // namespace

struct Template {
  std::string name;
  Body body;
  bool uses_generation = false;
};

namespace {

class Parser {
 public:
  explicit Parser(std::vector<Token> tokens) : tokens_(std::move(tokens)) {}

  Body parse_template(bool& uses_generation) {
    Body body = parse_body({}, nullptr, 0, "");
    uses_generation = uses_generation_;
    return body;
  }

 private:
  std::vector<Token> tokens_;
  size_t pos_ = 0;
  int depth_ = 0;
  int loops_ = 0;            // enclosing for loops (in the current macro): where break and continue may go
  std::vector<Stmt*> fors_;  // for loops being parsed, innermost last
  bool uses_generation_ = false;

  struct DepthGuard {
    Parser& p;
    explicit DepthGuard(Parser& parser) : p(parser) {
      if (++p.depth_ > kMaxParseDepth) syntax_error(p.peek().line, "the template nests too deeply");
    }
    ~DepthGuard() { --p.depth_; }
  };

  const Token& peek(size_t k = 0) const { return tokens_[std::min(pos_ + k, tokens_.size() - 1)]; }
  Token next() {
    Token t = peek();
    if (pos_ < tokens_.size() - 1) ++pos_;
    return t;
  }
  bool is_name(const Token& t, std::string_view n) const { return t.type == Tok::kName && t.text == n; }
  bool is_op(const Token& t, std::string_view o) const { return t.type == Tok::kOp && t.text == o; }
  bool skip_name(std::string_view n) {
    if (!is_name(peek(), n)) return false;
    next();
    return true;
  }
  bool skip_op(std::string_view o) {
    if (!is_op(peek(), o)) return false;
    next();
    return true;
  }
  [[noreturn]] void unexpected(const Token& t, std::string_view expected) {
    syntax_error(t.line, fmt::format("expected {}, got {}", expected, describe(t)));
  }
  void expect_op(std::string_view o) {
    if (!skip_op(o)) unexpected(peek(), fmt::format("'{}'", o));
  }
  void expect(Tok type) {
    if (peek().type != type) unexpected(peek(), describe(type));
    next();
  }
  std::string expect_name() {
    if (peek().type != Tok::kName) unexpected(peek(), "a name");
    return next().text;
  }

  ExprPtr make(Expr::Kind kind, int line) {
    auto e = std::make_unique<Expr>();
    e->kind = kind;
    e->line = line;
    return e;
  }

  // Statements until a block whose tag is one of `ends`; that tag's name is consumed and returned
  // in *found (the rest of the tag is the caller's). `opener`: the block being parsed, for errors.
  Body parse_body(std::initializer_list<std::string_view> ends, std::string* found, int open_line,
                  std::string_view opener) {
    DepthGuard guard(*this);
    Body body;
    while (true) {
      const Token& t = peek();
      if (t.type == Tok::kEof) {
        if (ends.size() == 0) return body;
        syntax_error(open_line,
                     fmt::format("'{}' is never closed (expected '{}')", opener, *(ends.end() - 1)));
      }
      if (t.type == Tok::kData) {
        auto s = std::make_unique<Stmt>();
        s->kind = Stmt::kText;
        s->line = t.line;
        s->text = next().text;
        body.push_back(std::move(s));
      } else if (t.type == Tok::kVarBegin) {
        auto s = std::make_unique<Stmt>();
        s->kind = Stmt::kPrint;
        s->line = next().line;
        s->expr = parse_tuple(true);
        expect(Tok::kVarEnd);
        body.push_back(std::move(s));
      } else if (t.type == Tok::kBlockBegin) {
        const Token& tag = peek(1);
        if (tag.type == Tok::kName &&
            std::find(ends.begin(), ends.end(), std::string_view(tag.text)) != ends.end()) {
          next();
          *found = next().text;
          return body;
        }
        if (tag.type == Tok::kName &&
            (tag.text.rfind("end", 0) == 0 || tag.text == "else" || tag.text == "elif")) {
          if (ends.size() == 0) syntax_error(tag.line, fmt::format("unexpected '{}'", tag.text));
          syntax_error(tag.line, fmt::format("unexpected '{}', expected '{}' to close the '{}' at line {}",
                                             tag.text, *(ends.end() - 1), opener, open_line));
        }
        next();
        body.push_back(parse_statement());
      } else {
        unexpected(t, "a statement");
      }
    }
  }

  StmtPtr parse_statement() {
    const Token tag = peek();
    if (tag.type != Tok::kName) unexpected(tag, "a tag name");
    auto s = std::make_unique<Stmt>();
    s->line = tag.line;
    const std::string& n = tag.text;
    next();
    if (n == "if") {
      parse_if(*s);
    } else if (n == "for") {
      parse_for(*s);
    } else if (n == "set") {
      parse_set(*s);
    } else if (n == "macro") {
      parse_macro(*s);
    } else if (n == "filter") {
      s->kind = Stmt::kFilterBlock;
      parse_filter_chain(*s);
      expect(Tok::kBlockEnd);
      std::string found;
      s->body = parse_body({"endfilter"}, &found, s->line, "filter");
      expect(Tok::kBlockEnd);
    } else if (n == "break" || n == "continue") {
      if (!loops_) syntax_error(tag.line, fmt::format("'{}' outside a loop", n));
      s->kind = n == "break" ? Stmt::kBreak : Stmt::kContinue;
      expect(Tok::kBlockEnd);
    } else if (n == "generation") {
      s->kind = Stmt::kGeneration;
      uses_generation_ = true;
      expect(Tok::kBlockEnd);
      std::string found;
      s->body = parse_body({"endgeneration"}, &found, s->line, "generation");
      expect(Tok::kBlockEnd);
    } else {
      syntax_error(tag.line, fmt::format("unknown or unsupported tag '{}'", n));
    }
    return s;
  }

  void parse_if(Stmt& s) {
    s.kind = Stmt::kIf;
    ExprPtr cond = parse_tuple(false);
    while (true) {
      expect(Tok::kBlockEnd);
      std::string found;
      Body body = parse_body({"elif", "else", "endif"}, &found, s.line, "if");
      s.branches.emplace_back(std::move(cond), std::move(body));
      if (found == "elif") {
        cond = parse_tuple(false);
        continue;
      }
      if (found == "else") {
        expect(Tok::kBlockEnd);
        s.else_body = parse_body({"endif"}, &found, s.line, "if");
      }
      expect(Tok::kBlockEnd);
      return;
    }
  }

  void parse_for(Stmt& s) {
    s.kind = Stmt::kFor;
    do {
      s.targets.push_back(expect_name());
    } while (skip_op(","));
    if (!skip_name("in")) unexpected(peek(), "'in'");
    s.expr = parse_tuple(false);
    if (skip_name("if")) s.cond = parse_expression(true);
    if (is_name(peek(), "recursive")) syntax_error(peek().line, "recursive loops are not supported");
    expect(Tok::kBlockEnd);
    std::string found;
    ++loops_;
    fors_.push_back(&s);
    s.body = parse_body({"else", "endfor"}, &found, s.line, "for");
    fors_.pop_back();
    --loops_;
    if (found == "else") {
      expect(Tok::kBlockEnd);
      s.else_body = parse_body({"endfor"}, &found, s.line, "for");
    }
    expect(Tok::kBlockEnd);
  }

  void parse_set(Stmt& s) {
    s.targets.push_back(expect_name());
    if (skip_op(".")) {
      s.attr = expect_name();
    } else {
      while (skip_op(",")) s.targets.push_back(expect_name());
    }
    if (skip_op("=")) {
      s.kind = Stmt::kSet;
      s.expr = parse_tuple(true);
      expect(Tok::kBlockEnd);
      return;
    }
    if (!s.attr.empty() || s.targets.size() != 1) unexpected(peek(), "'='");
    s.kind = Stmt::kSetBlock;
    if (is_op(peek(), "|")) parse_filter_chain(s);
    expect(Tok::kBlockEnd);
    std::string found;
    s.body = parse_body({"endset"}, &found, s.line, "set");
    expect(Tok::kBlockEnd);
  }

  void parse_macro(Stmt& s) {
    s.kind = Stmt::kMacro;
    s.text = expect_name();
    expect_op("(");
    while (!skip_op(")")) {
      if (!s.params.empty()) expect_op(",");
      if (skip_op(")")) break;  // a trailing comma
      s.params.push_back(expect_name());
      s.defaults.push_back(skip_op("=") ? parse_expression(true) : nullptr);
    }
    expect(Tok::kBlockEnd);
    std::string found;
    int loops = loops_;
    loops_ = 0;
    s.body = parse_body({"endmacro"}, &found, s.line, "macro");
    loops_ = loops;
    expect(Tok::kBlockEnd);
  }

  // `name(args) | name ...` after a filter or set tag; at least one filter.
  void parse_filter_chain(Stmt& s) {
    skip_op("|");
    do {
      s.filters.push_back(parse_filter(nullptr));
    } while (skip_op("|"));
  }

  // Expressions, by jinja2's grammar and precedence.

  // `a, b` as a tuple, or one expression.
  ExprPtr parse_tuple(bool with_condexpr) {
    int line = peek().line;
    std::vector<ExprPtr> items;
    bool comma = false;
    while (true) {
      if (!items.empty()) {
        if (!skip_op(",")) break;
        comma = true;
      }
      const Token& t = peek();
      if (t.type == Tok::kVarEnd || t.type == Tok::kBlockEnd || is_op(t, ")") || is_name(t, "if")) {
        if (items.empty()) unexpected(t, "an expression");
        break;
      }
      items.push_back(parse_expression(with_condexpr));
    }
    if (items.size() == 1 && !comma) return std::move(items[0]);
    auto e = make(Expr::kTuple, line);
    for (ExprPtr& x : items) e->add(std::move(x));
    return e;
  }

  ExprPtr parse_expression(bool with_condexpr) {
    DepthGuard guard(*this);
    return with_condexpr ? parse_condexpr() : parse_or();
  }

  ExprPtr parse_condexpr() {
    ExprPtr e = parse_or();
    while (is_name(peek(), "if")) {
      auto c = make(Expr::kCond, next().line);
      ExprPtr cond = parse_or();
      ExprPtr otherwise = skip_name("else") ? parse_condexpr() : nullptr;
      c->add(std::move(cond));
      c->add(std::move(e));
      c->add(std::move(otherwise));
      e = std::move(c);
    }
    return e;
  }

  ExprPtr binary(Expr::Kind kind, ExprPtr l, ExprPtr r, int line, std::string op = {}) {
    auto e = make(kind, line);
    e->name = std::move(op);
    e->add(std::move(l));
    e->add(std::move(r));
    return e;
  }

  ExprPtr parse_or() {
    ExprPtr e = parse_and();
    while (is_name(peek(), "or")) {
      int line = next().line;
      e = binary(Expr::kOr, std::move(e), parse_and(), line);
    }
    return e;
  }

  ExprPtr parse_and() {
    ExprPtr e = parse_not();
    while (is_name(peek(), "and")) {
      int line = next().line;
      e = binary(Expr::kAnd, std::move(e), parse_not(), line);
    }
    return e;
  }

  ExprPtr parse_not() {
    if (is_name(peek(), "not")) {
      DepthGuard guard(*this);
      auto e = make(Expr::kNot, next().line);
      e->add(parse_not());
      return e;
    }
    return parse_compare();
  }

  ExprPtr parse_compare() {
    int line = peek().line;
    ExprPtr first = parse_math1();
    std::vector<std::string> ops;
    std::vector<ExprPtr> operands;
    while (true) {
      const Token& t = peek();
      std::string op;
      if (t.type == Tok::kOp && (t.text == "==" || t.text == "!=" || t.text == "<" || t.text == ">" ||
                                 t.text == "<=" || t.text == ">=")) {
        op = t.text;
        next();
      } else if (is_name(t, "in")) {
        op = "in";
        next();
      } else if (is_name(t, "not") && is_name(peek(1), "in")) {
        op = "not in";
        next();
        next();
      } else {
        break;
      }
      ops.push_back(op);
      operands.push_back(parse_math1());
    }
    if (ops.empty()) return first;
    auto e = make(Expr::kCompare, line);
    e->add(std::move(first));
    for (auto& x : operands) e->add(std::move(x));
    e->ops = std::move(ops);
    return e;
  }

  ExprPtr parse_math1() {
    ExprPtr e = parse_concat();
    while (is_op(peek(), "+") || is_op(peek(), "-")) {
      Token op = next();
      e = binary(Expr::kBinary, std::move(e), parse_concat(), op.line, op.text);
    }
    return e;
  }

  ExprPtr parse_concat() {
    int line = peek().line;
    ExprPtr e = parse_math2();
    if (!is_op(peek(), "~")) return e;
    auto c = make(Expr::kConcat, line);
    c->add(std::move(e));
    while (skip_op("~")) c->add(parse_math2());
    return c;
  }

  ExprPtr parse_math2() {
    ExprPtr e = parse_pow();
    while (is_op(peek(), "*") || is_op(peek(), "/") || is_op(peek(), "//") || is_op(peek(), "%")) {
      Token op = next();
      e = binary(Expr::kBinary, std::move(e), parse_pow(), op.line, op.text);
    }
    return e;
  }

  ExprPtr parse_pow() {
    ExprPtr e = parse_unary(true);
    while (is_op(peek(), "**")) {
      Token op = next();
      e = binary(Expr::kBinary, std::move(e), parse_unary(true), op.line, op.text);
    }
    return e;
  }

  ExprPtr parse_unary(bool with_filter) {
    DepthGuard guard(*this);
    ExprPtr e;
    if (is_op(peek(), "-") || is_op(peek(), "+")) {
      Token op = next();
      e = make(op.text == "-" ? Expr::kNeg : Expr::kPos, op.line);
      e->add(parse_unary(false));
    } else {
      e = parse_primary();
    }
    e = parse_postfix(std::move(e));
    if (with_filter) e = parse_filter_expr(std::move(e));
    return e;
  }

  ExprPtr parse_primary() {
    const Token t = peek();
    switch (t.type) {
      case Tok::kName: {
        next();
        if (t.text == "true" || t.text == "True" || t.text == "false" || t.text == "False") {
          auto e = make(Expr::kConst, t.line);
          e->value = boolean(t.text[0] == 't' || t.text[0] == 'T');
          return e;
        }
        if (t.text == "none" || t.text == "None") {
          auto e = make(Expr::kConst, t.line);
          e->value = none();
          return e;
        }
        auto e = make(Expr::kName, t.line);
        e->name = t.text;
        if (t.text == "loop") {
          for (Stmt* f : fors_) f->uses_loop = true;
        }
        return e;
      }
      case Tok::kString: {
        std::string s;
        while (peek().type == Tok::kString) s += next().text;
        auto e = make(Expr::kConst, t.line);
        e->value = string(std::move(s));
        return e;
      }
      case Tok::kInt:
      case Tok::kFloat: {
        next();
        auto e = make(Expr::kConst, t.line);
        e->value = t.type == Tok::kInt ? integer(t.ival) : number(t.fval);
        return e;
      }
      case Tok::kOp:
        if (t.text == "(") {
          next();
          if (skip_op(")")) return make(Expr::kTuple, t.line);
          ExprPtr e = parse_tuple(true);
          expect_op(")");
          return e;
        }
        if (t.text == "[") {
          next();
          auto e = make(Expr::kList, t.line);
          while (!skip_op("]")) {
            if (!e->args.empty()) {
              expect_op(",");
              if (skip_op("]")) break;
            }
            e->add(parse_expression(true));
          }
          return e;
        }
        if (t.text == "{") {
          next();
          auto e = make(Expr::kDict, t.line);
          while (!skip_op("}")) {
            if (!e->args.empty()) {
              expect_op(",");
              if (skip_op("}")) break;
            }
            e->add(parse_expression(true));
            expect_op(":");
            e->add(parse_expression(true));
          }
          return e;
        }
        break;
      default:
        break;
    }
    unexpected(t, "an expression");
  }

  ExprPtr parse_postfix(ExprPtr e) {
    while (true) {
      const Token& t = peek();
      if (is_op(t, ".")) {
        int line = next().line;
        if (peek().type == Tok::kInt) {
          auto item = make(Expr::kConst, line);
          item->value = integer(next().ival);
          e = binary(Expr::kItem, std::move(e), std::move(item), line);
        } else {
          auto a = make(Expr::kAttr, line);
          a->name = expect_name();
          a->add(std::move(e));
          e = std::move(a);
        }
      } else if (is_op(t, "[")) {
        e = parse_subscript(std::move(e));
      } else if (is_op(t, "(")) {
        e = parse_call(std::move(e));
      } else {
        return e;
      }
    }
  }

  ExprPtr parse_subscript(ExprPtr obj) {
    int line = next().line;  // [
    std::array<ExprPtr, 3> parts;
    int colons = 0;
    while (!is_op(peek(), "]")) {
      if (skip_op(":")) {
        if (++colons > 2) unexpected(peek(), "']'");
      } else if (parts[colons]) {
        unexpected(peek(), colons ? "']'" : "':' or ']'");
      } else {
        parts[colons] = parse_expression(true);
      }
    }
    next();
    if (colons == 0) {
      if (!parts[0]) syntax_error(line, "expected an index");
      return binary(Expr::kItem, std::move(obj), std::move(parts[0]), line);
    }
    auto e = make(Expr::kSlice, line);
    e->add(std::move(obj));
    for (auto& p : parts) e->add(std::move(p));
    return e;
  }

  void parse_call_args(Expr& e) {
    expect_op("(");
    bool first = true;
    while (!skip_op(")")) {
      if (!first) {
        expect_op(",");
        if (skip_op(")")) break;
      }
      first = false;
      if (is_op(peek(), "*") || is_op(peek(), "**"))
        syntax_error(peek().line, "*args and **kwargs are not supported");
      if (peek().type == Tok::kName && is_op(peek(1), "=")) {
        std::string key = next().text;
        next();
        e.add(std::move(key), parse_expression(true));
      } else {
        if (!e.kwargs.empty()) syntax_error(peek().line, "positional argument after a keyword argument");
        e.add(parse_expression(true));
      }
    }
  }

  ExprPtr parse_call(ExprPtr callee) {
    auto e = make(Expr::kCall, peek().line);
    e->add(std::move(callee));
    parse_call_args(*e);
    return e;
  }

  // `| name(args)` with the pipe consumed; `value` null in a filter block's chain.
  ExprPtr parse_filter(ExprPtr value) {
    auto e = make(Expr::kFilter, peek().line);
    e->name = expect_name();
    while (skip_op(".")) e->name += "." + expect_name();
    const FilterFn* f = find_filter(e->name);
    if (!f) syntax_error(e->line, fmt::format("no filter named '{}'", e->name));
    e->filter = *f;
    e->add(std::move(value));
    if (is_op(peek(), "(")) parse_call_args(*e);
    return e;
  }

  ExprPtr parse_filter_expr(ExprPtr e) {
    while (true) {
      const Token& t = peek();
      if (is_op(t, "|")) {
        next();
        e = parse_filter(std::move(e));
      } else if (is_name(t, "is")) {
        e = parse_test(std::move(e));
      } else if (is_op(t, "(")) {
        e = parse_call(std::move(e));
      } else {
        return e;
      }
    }
  }

  ExprPtr parse_test(ExprPtr value) {
    int line = next().line;  // is
    bool negated = skip_name("not");
    auto e = make(Expr::kTest, line);
    e->name = expect_name();
    while (skip_op(".")) e->name += "." + expect_name();
    const TestFn* f = find_test(e->name);
    if (!f) syntax_error(line, fmt::format("no test named '{}'", e->name));
    e->test = *f;
    e->add(std::move(value));
    const Token& t = peek();
    if (is_op(t, "(")) {
      parse_call_args(*e);
    } else if ((t.type == Tok::kName || t.type == Tok::kString || t.type == Tok::kInt ||
                t.type == Tok::kFloat || is_op(t, "[") || is_op(t, "{")) &&
               !is_name(t, "else") && !is_name(t, "or") && !is_name(t, "and")) {
      if (is_name(t, "is")) syntax_error(t.line, "cannot chain multiple tests with is");
      e->add(parse_postfix(parse_primary()));
    }
    if (!negated) return e;
    auto n = make(Expr::kNot, line);
    n->add(std::move(e));
    return n;
  }
};

// ---------------------------------------------------------------------------------------------
// Arguments of filters, tests, methods and globals.

// The argument at position i or named `name`, or null.
const Value* find_arg(const Args& a, size_t i, std::string_view name) {
  if (i < a.pos.size()) return &a.pos[i];
  for (const auto& [k, v] : a.kw) {
    if (k == name) return &v;
  }
  return nullptr;
}

Value arg(const Args& a, size_t i, std::string_view name, Value fallback) {
  const Value* v = find_arg(a, i, name);
  return v ? *v : std::move(fallback);
}

// Too many arguments, or unknown keywords, are errors as in Python.
void check_args(const Args& a, std::string_view fn, std::initializer_list<std::string_view> names) {
  if (a.pos.size() > names.size())
    raise("{}() takes at most {} argument(s), got {}", fn, names.size(), a.pos.size());
  for (const auto& [k, v] : a.kw) {
    auto it = std::find(names.begin(), names.end(), k);
    if (it == names.end()) raise("{}() got an unexpected keyword argument '{}'", fn, k);
    if (static_cast<size_t>(it - names.begin()) < a.pos.size())
      raise("{}() got multiple values for '{}'", fn, k);
  }
}

const std::string& str_arg(const Value& v, std::string_view what) {
  if (v.kind != Value::kString) raise("{} must be a string, not {}", what, type_name(v));
  return v.s;
}

int64_t int_arg(const Value& v, std::string_view what) {
  if (!is_intlike(v)) raise("{} must be an integer, not {}", what, type_name(v));
  return as_int(v);
}

// ---------------------------------------------------------------------------------------------
// Operations on values.

// Items of an iterable, as Python's iter(): characters of a string, keys of a dict.
List iterate(const Value& v) {
  switch (v.kind) {
    case Value::kUndefined:
      return {};
    case Value::kString: {
      List out;
      std::vector<size_t> starts = cp_starts(v.s);
      for (size_t k = 0; k + 1 < starts.size(); ++k)
        out.push_back(string(v.s.substr(starts[k], starts[k + 1] - starts[k])));
      return out;
    }
    case Value::kList:
    case Value::kTuple:
      return *v.list;
    case Value::kDict: {
      List out;
      for (const auto& [k, x] : v.dict->items) out.push_back(k);
      return out;
    }
    default:
      raise("'{}' object is not iterable", type_name(v));
  }
}

int64_t length(const Value& v) {
  switch (v.kind) {
    case Value::kUndefined:
      return 0;
    case Value::kString:
      return static_cast<int64_t>(cp_count(v.s));
    case Value::kList:
    case Value::kTuple:
      return static_cast<int64_t>(v.list->size());
    case Value::kDict:
      return static_cast<int64_t>(v.dict->items.size());
    default:
      raise("object of type '{}' has no len()", type_name(v));
  }
}

bool contains(const Value& container, const Value& item) {
  switch (container.kind) {
    case Value::kUndefined:
      return false;
    case Value::kString:
      if (item.kind != Value::kString)
        raise("'in <string>' requires string as left operand, not {}", type_name(item));
      return container.s.find(item.s) != std::string::npos;
    case Value::kList:
    case Value::kTuple:
      return std::any_of(container.list->begin(), container.list->end(),
                         [&](const Value& x) { return equals(x, item); });
    case Value::kDict:
      if (is_seq(item) && item.kind == Value::kList) raise("unhashable type: 'list'");
      if (item.kind == Value::kDict || item.kind == Value::kNamespace)
        raise("unhashable type: '{}'", type_name(item));
      return find_key(*container.dict, item) != nullptr;
    default:
      raise("argument of type '{}' is not iterable", type_name(container));
  }
}

// Python's slice of a sequence of n items: the indexes it takes.
std::vector<size_t> slice_indexes(int64_t n, const Value& start, const Value& stop, const Value& step) {
  auto part = [](const Value& v, std::string_view what) -> std::optional<int64_t> {
    if (v.kind == Value::kNone || v.kind == Value::kUndefined) return std::nullopt;
    return int_arg(v, what);
  };
  int64_t st = part(step, "a slice step").value_or(1);
  if (st == 0) raise("slice step cannot be zero");
  auto clamp = [&](std::optional<int64_t> x, int64_t dflt) {
    if (!x) return dflt;
    int64_t v = *x < 0 ? *x + n : *x;
    if (st > 0) return std::clamp<int64_t>(v, 0, n);
    return std::clamp<int64_t>(v, -1, n - 1);
  };
  int64_t b = clamp(part(start, "a slice start"), st > 0 ? 0 : n - 1);
  int64_t e = clamp(part(stop, "a slice stop"), st > 0 ? n : -1);
  std::vector<size_t> out;
  for (int64_t k = b; st > 0 ? k < e : k > e; k += st) out.push_back(static_cast<size_t>(k));
  return out;
}

Value slice(const Value& v, const Value& start, const Value& stop, const Value& step) {
  defined(v);
  if (v.kind == Value::kString) {
    if (is_ascii(v.s)) {
      std::string out;
      for (size_t k : slice_indexes(static_cast<int64_t>(v.s.size()), start, stop, step)) out += v.s[k];
      return string(std::move(out));
    }
    std::vector<size_t> starts = cp_starts(v.s);
    std::string out;
    for (size_t k : slice_indexes(static_cast<int64_t>(starts.size() - 1), start, stop, step)) {
      out.append(v.s, starts[k], starts[k + 1] - starts[k]);
    }
    return string(std::move(out));
  }
  if (is_seq(v)) {
    List out;
    for (size_t k : slice_indexes(static_cast<int64_t>(v.list->size()), start, stop, step))
      out.push_back((*v.list)[k]);
    return sequence(std::move(out), v.kind == Value::kTuple);
  }
  raise("'{}' object is not subscriptable", type_name(v));
}

Value method(const Value& obj, const std::string& name);

// obj[key] as jinja2's sandbox does it: the item, else (for a string key) the attribute, else
// undefined.
Value get_item(const Value& obj, const Value& key) {
  if (obj.kind == Value::kUndefined) undefined_error(obj);
  if ((obj.kind == Value::kString || is_seq(obj)) && is_intlike(key)) {
    int64_t n = obj.kind == Value::kString ? static_cast<int64_t>(cp_count(obj.s))
                                           : static_cast<int64_t>(obj.list->size());
    int64_t k = as_int(key) < 0 ? as_int(key) + n : as_int(key);
    if (k >= 0 && k < n) {
      if (is_seq(obj)) return (*obj.list)[static_cast<size_t>(k)];
      if (is_ascii(obj.s)) return string(obj.s.substr(static_cast<size_t>(k), 1));
      std::vector<size_t> starts = cp_starts(obj.s);
      return string(obj.s.substr(starts[k], starts[k + 1] - starts[k]));
    }
  } else if (obj.kind == Value::kDict || (obj.kind == Value::kNamespace && key.kind == Value::kString)) {
    if (const Value* v = find_key(*obj.dict, key)) return *v;
  }
  if (key.kind == Value::kString) {
    Value m = method(obj, key.s);
    if (m.kind != Value::kUndefined) return m;
  }
  return undefined(fmt::format("'{}' object has no element {}", type_name(obj), to_str(key)));
}

// obj.name as jinja2's sandbox does it: the attribute (a method), else the item, else undefined.
Value get_attr(const Value& obj, const std::string& name) {
  if (obj.kind == Value::kUndefined) undefined_error(obj);
  Value m = method(obj, name);
  if (m.kind != Value::kUndefined) return m;
  if (obj.kind == Value::kDict || obj.kind == Value::kNamespace) {
    if (const Value* v = find_key(*obj.dict, name)) return *v;
  }
  return undefined(fmt::format("'{}' object has no attribute '{}'", type_name(obj), name));
}

int64_t checked_add(int64_t x, int64_t y) {
  int64_t r;
  if (__builtin_add_overflow(x, y, &r)) raise("integer overflow");
  return r;
}
int64_t checked_sub(int64_t x, int64_t y) {
  int64_t r;
  if (__builtin_sub_overflow(x, y, &r)) raise("integer overflow");
  return r;
}
int64_t checked_mul(int64_t x, int64_t y) {
  int64_t r;
  if (__builtin_mul_overflow(x, y, &r)) raise("integer overflow");
  return r;
}

Value repeat(const Value& seq, int64_t times) {
  times = std::max<int64_t>(times, 0);
  if (seq.kind == Value::kString) {
    if (!seq.s.empty() && static_cast<uint64_t>(times) > kMaxText / seq.s.size())
      check_text_size(kMaxText + 1);
    std::string out;
    for (int64_t k = 0; k < times; ++k) out += seq.s;
    return string(std::move(out));
  }
  if (!seq.list->empty() && static_cast<uint64_t>(times) > kMaxItems / seq.list->size()) {
    raise("the template builds a list of more than {} items", kMaxItems);
  }
  List out;
  for (int64_t k = 0; k < times; ++k) out.insert(out.end(), seq.list->begin(), seq.list->end());
  return sequence(std::move(out), seq.kind == Value::kTuple);
}

// CPython's float divmod, so that // and % give Python's results to the last bit.
std::pair<double, double> py_divmod(double a, double b) {
  double mod = std::fmod(a, b);
  double div = (a - mod) / b;
  if (mod != 0) {
    if ((b < 0) != (mod < 0)) {
      mod += b;
      div -= 1.0;
    }
  } else {
    mod = std::copysign(0.0, b);
  }
  double floordiv = std::copysign(0.0, a / b);
  if (div != 0) {
    floordiv = std::floor(div);
    if (div - floordiv > 0.5) floordiv += 1.0;
  }
  return {floordiv, mod};
}
double py_mod(double a, double b) {
  return py_divmod(a, b).second;
}

Value arithmetic(const std::string& op, const Value& a, const Value& b) {
  defined(a);
  defined(b);
  if (is_num(a) && is_num(b)) {
    bool ints = is_intlike(a) && is_intlike(b);
    if (op == "/") {
      if (as_double(b) == 0) raise("division by zero");
      return number(as_double(a) / as_double(b));
    }
    if (ints) {
      int64_t x = as_int(a), y = as_int(b);
      if (op == "+") return integer(checked_add(x, y));
      if (op == "-") return integer(checked_sub(x, y));
      if (op == "*") return integer(checked_mul(x, y));
      if (op == "//" || op == "%") {
        if (y == 0) raise("integer division or modulo by zero");
        if (x == INT64_MIN && y == -1) raise("integer overflow");
        int64_t q = x / y, m = x % y;
        if (m != 0 && ((m < 0) != (y < 0))) {
          --q;
          m += y;
        }
        return integer(op == "//" ? q : m);
      }
      if (op == "**") {
        if (y < 0) return number(std::pow(static_cast<double>(x), static_cast<double>(y)));
        int64_t p = 1;
        for (uint64_t k = static_cast<uint64_t>(y); k; k >>= 1) {
          if (k & 1) p = checked_mul(p, x);
          if (k > 1) x = checked_mul(x, x);
        }
        return integer(p);
      }
    }
    double x = as_double(a), y = as_double(b);
    if (op == "+") return number(x + y);
    if (op == "-") return number(x - y);
    if (op == "*") return number(x * y);
    if (op == "//" || op == "%") {
      if (y == 0) raise("float division by zero");
      auto [q, m] = py_divmod(x, y);
      return number(op == "//" ? q : m);
    }
    if (op == "**") return number(std::pow(x, y));
  }
  if (op == "+") {
    if (a.kind == Value::kString && b.kind == Value::kString) {
      check_text_size(a.s.size() + b.s.size());
      return string(a.s + b.s);
    }
    if (is_seq(a) && a.kind == b.kind) {
      List out = *a.list;
      out.insert(out.end(), b.list->begin(), b.list->end());
      return sequence(std::move(out), a.kind == Value::kTuple);
    }
    if (a.kind == Value::kString) raise("can only concatenate str (not \"{}\") to str", type_name(b));
  }
  if (op == "*") {
    if ((a.kind == Value::kString || is_seq(a)) && is_intlike(b)) return repeat(a, as_int(b));
    if ((b.kind == Value::kString || is_seq(b)) && is_intlike(a)) return repeat(b, as_int(a));
  }
  raise("unsupported operand type(s) for {}: '{}' and '{}'", op, type_name(a), type_name(b));
}

// ---------------------------------------------------------------------------------------------
// Methods of str, list and dict that the sandbox allows.

Value py_split(const std::string& s, const Value* sep_arg, int64_t maxsplit) {
  List out;
  if (!sep_arg || sep_arg->kind == Value::kNone) {
    size_t i = 0;
    auto skip_space = [&] {
      while (i < s.size()) {
        size_t k = i;
        if (!py_space(utf8::next(s, k))) break;
        i = k;
      }
    };
    skip_space();
    while (i < s.size()) {
      if (maxsplit >= 0 && static_cast<int64_t>(out.size()) == maxsplit) {
        out.push_back(string(s.substr(i)));
        return sequence(std::move(out));
      }
      size_t b = i;
      while (i < s.size()) {
        size_t k = i;
        if (py_space(utf8::next(s, k))) break;
        i = k;
      }
      out.push_back(string(s.substr(b, i - b)));
      skip_space();
    }
    return sequence(std::move(out));
  }
  const std::string& sep = str_arg(*sep_arg, "the separator");
  if (sep.empty()) raise("empty separator");
  size_t b = 0;
  while (true) {
    size_t p =
        maxsplit >= 0 && static_cast<int64_t>(out.size()) == maxsplit ? std::string::npos : s.find(sep, b);
    if (p == std::string::npos) break;
    out.push_back(string(s.substr(b, p - b)));
    b = p + sep.size();
  }
  out.push_back(string(s.substr(b)));
  return sequence(std::move(out));
}

std::string py_replace(const std::string& s, const std::string& old, const std::string& repl, int64_t count) {
  std::string out;
  if (old.empty()) {
    std::vector<size_t> starts = cp_starts(s);
    for (size_t k = 0; k < starts.size(); ++k) {
      if (count < 0 || static_cast<int64_t>(k) < count) out += repl;
      if (k + 1 < starts.size()) out.append(s, starts[k], starts[k + 1] - starts[k]);
      check_text_size(out.size());
    }
    return out;
  }
  size_t b = 0;
  for (int64_t n = 0; count < 0 || n < count; ++n) {
    size_t p = s.find(old, b);
    if (p == std::string::npos) break;
    out.append(s, b, p - b);
    out += repl;
    check_text_size(out.size());
    b = p + old.size();
  }
  out.append(s, b);
  check_text_size(out.size());
  return out;
}

// Python's str.title(): a letter after a non-letter is upper case, other letters lower case.
std::string py_title(const std::string& s) {
  std::string out = s;
  bool prev_cased = false;
  for (char& c : out) {
    bool cased = ascii_alpha(c);
    c = cased && !prev_cased ? ascii_upper(c) : ascii_lower(c);
    prev_cased = cased;
  }
  return out;
}

std::string py_capitalize(const std::string& s) {
  std::string out = lower(s);
  if (!out.empty()) out[0] = ascii_upper(out[0]);
  return out;
}

bool affix_matches(const std::string& s, const Value& affix, bool prefix) {
  auto one = [&](const Value& a) {
    const std::string& x = str_arg(a, prefix ? "startswith's argument" : "endswith's argument");
    return x.size() <= s.size() &&
           (prefix ? s.compare(0, x.size(), x) == 0 : s.compare(s.size() - x.size(), x.size(), x) == 0);
  };
  if (affix.kind == Value::kTuple) return std::any_of(affix.list->begin(), affix.list->end(), one);
  return one(affix);
}

Value string_method(const std::string& s, const std::string& name) {
  auto bind = [&](std::function<Value(Args&)> f) { return function("str." + name, std::move(f)); };
  if (name == "strip" || name == "lstrip" || name == "rstrip") {
    return bind([s, name](Args& a) {
      check_args(a, name, {"chars"});
      Value chars = arg(a, 0, "chars", none());
      const std::string* set =
          chars.kind == Value::kNone ? nullptr : &str_arg(chars, "the characters to strip");
      return string(std::string(py_strip(s, set, name != "rstrip", name != "lstrip")));
    });
  }
  if (name == "split") {
    return bind([s](Args& a) {
      check_args(a, "split", {"sep", "maxsplit"});
      return py_split(s, find_arg(a, 0, "sep"), int_arg(arg(a, 1, "maxsplit", integer(-1)), "maxsplit"));
    });
  }
  if (name == "splitlines") {
    return bind([s](Args& a) {
      check_args(a, "splitlines", {});
      List out;
      for (std::string& line : split_lines(s)) out.push_back(string(std::move(line)));
      return sequence(std::move(out));
    });
  }
  if (name == "startswith" || name == "endswith") {
    return bind([s, name](Args& a) {
      check_args(a, name, {"prefix"});
      const Value* x = find_arg(a, 0, "prefix");
      if (!x) raise("{}() takes exactly one argument", name);
      return boolean(affix_matches(s, *x, name == "startswith"));
    });
  }
  if (name == "upper" || name == "lower" || name == "title" || name == "capitalize") {
    return bind([s, name](Args& a) {
      check_args(a, name, {});
      if (name == "upper") return string(upper(s));
      if (name == "lower") return string(lower(s));
      return string(name == "title" ? py_title(s) : py_capitalize(s));
    });
  }
  if (name == "replace") {
    return bind([s](Args& a) {
      check_args(a, "replace", {"old", "new", "count"});
      const Value* old = find_arg(a, 0, "old");
      const Value* repl = find_arg(a, 1, "new");
      if (!old || !repl) raise("replace() takes at least 2 arguments");
      return string(py_replace(s, str_arg(*old, "old"), str_arg(*repl, "new"),
                               int_arg(arg(a, 2, "count", integer(-1)), "count")));
    });
  }
  if (name == "find" || name == "rfind" || name == "index" || name == "count") {
    return bind([s, name](Args& a) {
      check_args(a, name, {"sub"});
      const Value* sub = find_arg(a, 0, "sub");
      if (!sub) raise("{}() takes exactly one argument", name);
      const std::string& x = str_arg(*sub, "the substring");
      if (name == "count") {
        if (x.empty()) return integer(static_cast<int64_t>(cp_count(s)) + 1);
        int64_t n = 0;
        for (size_t p = s.find(x); p != std::string::npos; p = s.find(x, p + x.size())) ++n;
        return integer(n);
      }
      size_t p = name == "rfind" ? s.rfind(x) : s.find(x);
      if (p == std::string::npos) {
        if (name == "index") raise("substring not found");
        return integer(-1);
      }
      return integer(static_cast<int64_t>(cp_count(std::string_view(s).substr(0, p))));
    });
  }
  if (name == "join") {
    return bind([s](Args& a) {
      check_args(a, "join", {"iterable"});
      const Value* items = find_arg(a, 0, "iterable");
      if (!items) raise("join() takes exactly one argument");
      std::string out;
      List list = iterate(*items);
      for (size_t k = 0; k < list.size(); ++k) {
        if (k) out += s;
        out += str_arg(list[k], fmt::format("sequence item {}", k));
        check_text_size(out.size());
      }
      return string(std::move(out));
    });
  }
  if (name == "isdigit" || name == "isalpha" || name == "isalnum" || name == "isspace" || name == "isupper" ||
      name == "islower") {
    return bind([s, name](Args& a) {
      check_args(a, name, {});
      if (name == "isspace") {
        return boolean(!s.empty() && py_strip(s, nullptr, true, false).empty());
      }
      if (name == "isupper" || name == "islower") {
        bool cased = false;
        for (char c : s) {
          if (!ascii_alpha(c)) continue;
          cased = true;
          if ((name == "isupper") != (c >= 'A' && c <= 'Z')) return boolean(false);
        }
        return boolean(cased);
      }
      auto ok = [&](char c) {
        if (name == "isdigit") return ascii_digit(c);
        if (name == "isalpha") return ascii_alpha(c);
        return ascii_alpha(c) || ascii_digit(c);
      };
      return boolean(!s.empty() && std::all_of(s.begin(), s.end(), ok));
    });
  }
  return undefined({});
}

// The methods an immutable sandbox allows on an object; undefined for a name that is none.
// Methods that would change a list or dict are security errors, as in jinja2.
Value method(const Value& obj, const std::string& name) {
  if (obj.kind == Value::kString) return string_method(obj.s, name);
  if (is_seq(obj)) {
    static const char* kMutating[] = {"append", "clear", "pop",    "reverse",
                                      "insert", "sort",  "extend", "remove"};
    for (const char* m : kMutating) {
      if (name == m) raise("access to attribute '{}' of '{}' object is unsafe", name, type_name(obj));
    }
    if (name == "index" || name == "count") {
      Value self = obj;
      return function(name, [self, name](Args& a) {
        check_args(a, name, {"value"});
        const Value* x = find_arg(a, 0, "value");
        if (!x) raise("{}() takes exactly one argument", name);
        int64_t n = 0;
        for (size_t k = 0; k < self.list->size(); ++k) {
          if (!equals((*self.list)[k], *x)) continue;
          if (name == "index") return integer(static_cast<int64_t>(k));
          ++n;
        }
        if (name == "index") raise("{} is not in list", to_str(*x));
        return integer(n);
      });
    }
  }
  if (obj.kind == Value::kDict) {
    static const char* kMutating[] = {"clear", "pop", "popitem", "setdefault", "update"};
    for (const char* m : kMutating) {
      if (name == m) raise("access to attribute '{}' of 'dict' object is unsafe", name);
    }
    Value self = obj;
    if (name == "items" || name == "keys" || name == "values") {
      return function(name, [self, name](Args& a) {
        check_args(a, name, {});
        List out;
        for (const auto& [k, v] : self.dict->items) {
          if (name == "items") {
            out.push_back(sequence({k, v}, true));
          } else {
            out.push_back(name == "keys" ? k : v);
          }
        }
        return sequence(std::move(out));
      });
    }
    if (name == "get") {
      return function(name, [self](Args& a) {
        check_args(a, "get", {"key", "default"});
        const Value* key = find_arg(a, 0, "key");
        if (!key) raise("get() takes at least 1 argument");
        const Value* v = find_key(*self.dict, *key);
        return v ? *v : arg(a, 1, "default", none());
      });
    }
  }
  return undefined({});
}

// ---------------------------------------------------------------------------------------------
// Tests (`x is name`).

bool test_defined(const Value& v, Args&) {
  return v.kind != Value::kUndefined;
}
bool test_undefined(const Value& v, Args&) {
  return v.kind == Value::kUndefined;
}
bool test_none(const Value& v, Args&) {
  return v.kind == Value::kNone;
}
bool test_boolean(const Value& v, Args&) {
  return v.kind == Value::kBool;
}
bool test_true(const Value& v, Args&) {
  return v.kind == Value::kBool && v.b;
}
bool test_false(const Value& v, Args&) {
  return v.kind == Value::kBool && !v.b;
}
bool test_integer(const Value& v, Args&) {
  return v.kind == Value::kInt;
}
bool test_float(const Value& v, Args&) {
  return v.kind == Value::kFloat;
}
bool test_number(const Value& v, Args&) {
  return is_num(v);
}
bool test_string(const Value& v, Args&) {
  return v.kind == Value::kString;
}
bool test_mapping(const Value& v, Args&) {
  return v.kind == Value::kDict;
}
bool test_callable(const Value& v, Args&) {
  return v.kind == Value::kFunction;
}
bool test_iterable(const Value& v, Args&) {
  return v.kind == Value::kUndefined || v.kind == Value::kString || is_seq(v) || v.kind == Value::kDict;
}
bool test_sequence(const Value& v, Args& a) {
  return test_iterable(v, a);
}

const Value& test_operand(const Args& a, std::string_view test) {
  const Value* x = find_arg(a, 0, "other");
  if (!x) raise("the '{}' test needs an argument", test);
  return *x;
}

bool test_even(const Value& v, Args&) {
  if (v.kind == Value::kFloat) return py_mod(v.f, 2) == 0;
  return int_arg(v, "the value tested for even") % 2 == 0;
}
bool test_odd(const Value& v, Args&) {
  if (v.kind == Value::kFloat) return py_mod(v.f, 2) == 1;
  return int_arg(v, "the value tested for odd") % 2 != 0;
}
bool test_divisibleby(const Value& v, Args& a) {
  const Value& d = test_operand(a, "divisibleby");
  if (!is_num(v) || !is_num(d)) raise("divisibleby needs numbers, not {} and {}", type_name(v), type_name(d));
  if (as_double(d) == 0) raise("division by zero");
  if (is_intlike(v) && is_intlike(d)) return as_int(d) == -1 || as_int(v) % as_int(d) == 0;
  return py_mod(as_double(v), as_double(d)) == 0;
}
bool test_eq(const Value& v, Args& a) {
  return equals(v, test_operand(a, "eq"));
}
bool test_ne(const Value& v, Args& a) {
  return !equals(v, test_operand(a, "ne"));
}
bool test_lt(const Value& v, Args& a) {
  return less(v, test_operand(a, "lt"));
}
bool test_gt(const Value& v, Args& a) {
  return less(test_operand(a, "gt"), v);
}
bool test_le(const Value& v, Args& a) {
  const Value& o = test_operand(a, "le");
  return less(v, o) || equals(v, o);
}
bool test_ge(const Value& v, Args& a) {
  const Value& o = test_operand(a, "ge");
  return less(o, v) || equals(v, o);
}
bool test_in(const Value& v, Args& a) {
  return contains(test_operand(a, "in"), v);
}
bool test_sameas(const Value& v, Args& a) {
  const Value& o = test_operand(a, "sameas");
  if (v.kind != o.kind) return false;
  if (is_seq(v)) return v.list == o.list;
  if (v.kind == Value::kDict || v.kind == Value::kNamespace) return v.dict == o.dict;
  return equals(v, o);
}
bool test_lower(const Value& v, Args&) {
  if (v.kind != Value::kString) return false;
  std::string s = v.s;
  return s == lower(s) && std::any_of(s.begin(), s.end(), ascii_alpha);
}
bool test_upper(const Value& v, Args&) {
  if (v.kind != Value::kString) return false;
  std::string s = v.s;
  return s == upper(s) && std::any_of(s.begin(), s.end(), ascii_alpha);
}
bool test_filter(const Value& v, Args&) {
  return v.kind == Value::kString && find_filter(v.s);
}
bool test_test(const Value& v, Args&) {
  return v.kind == Value::kString && find_test(v.s);
}

const TestFn* find_test(std::string_view name) {
  static const std::pair<std::string_view, TestFn> kTests[] = {
      {"boolean", test_boolean},
      {"callable", test_callable},
      {"defined", test_defined},
      {"divisibleby", test_divisibleby},
      {"eq", test_eq},
      {"equalto", test_eq},
      {"==", test_eq},
      {"even", test_even},
      {"false", test_false},
      {"filter", test_filter},
      {"float", test_float},
      {"ge", test_ge},
      {">=", test_ge},
      {"gt", test_gt},
      {"greaterthan", test_gt},
      {">", test_gt},
      {"in", test_in},
      {"integer", test_integer},
      {"iterable", test_iterable},
      {"le", test_le},
      {"<=", test_le},
      {"lower", test_lower},
      {"lt", test_lt},
      {"lessthan", test_lt},
      {"<", test_lt},
      {"mapping", test_mapping},
      {"ne", test_ne},
      {"!=", test_ne},
      {"none", test_none},
      {"number", test_number},
      {"odd", test_odd},
      {"sameas", test_sameas},
      {"sequence", test_sequence},
      {"string", test_string},
      {"test", test_test},
      {"true", test_true},
      {"undefined", test_undefined},
      {"upper", test_upper},
  };
  for (const auto& t : kTests) {
    if (t.first == name) return &t.second;
  }
  return nullptr;
}

// ---------------------------------------------------------------------------------------------
// Filters (`x | name`).

// Args without its first `skip` positional arguments.
Args rest(const Args& a, size_t skip) {
  Args out;
  out.pos.assign(a.pos.begin() + static_cast<std::ptrdiff_t>(std::min(skip, a.pos.size())), a.pos.end());
  out.kw = a.kw;
  return out;
}

// jinja2's attribute paths ("a.b.0"): each part an item (an index where it is a number).
Value lookup_path(const Value& v, const Value& path) {
  if (is_intlike(path)) return get_item(v, path);
  Value out = v;
  std::string p = str_arg(path, "the attribute");
  size_t b = 0;
  while (true) {
    size_t e = p.find('.', b);
    std::string part = p.substr(b, e == std::string::npos ? std::string::npos : e - b);
    bool digits = !part.empty() && std::all_of(part.begin(), part.end(), ascii_digit);
    out = get_item(out, digits && part.size() < 18 ? integer(std::stoll(part)) : string(part));
    if (e == std::string::npos) return out;
    b = e + 1;
  }
}

std::string str_of(const Value& v) {
  std::string s = to_str(v);
  check_text_size(s.size());
  return s;
}

Value filter_trim(const Value& v, Args& a) {
  check_args(a, "trim", {"chars"});
  Value chars = arg(a, 0, "chars", none());
  const std::string* set = chars.kind == Value::kNone ? nullptr : &str_arg(chars, "the characters to trim");
  return string(std::string(py_strip(str_of(v), set, true, true)));
}

Value filter_tojson(const Value& v, Args& a) {
  check_args(a, "tojson", {"ensure_ascii", "indent", "separators", "sort_keys"});
  JsonStyle st;
  st.ensure_ascii = truthy(arg(a, 0, "ensure_ascii", boolean(false)));
  Value indent = arg(a, 1, "indent", none());
  if (indent.kind != Value::kNone) {
    st.indent = true;
    if (indent.kind == Value::kString) {
      st.indent_text = indent.s;
    } else {
      st.indent_text.assign(static_cast<size_t>(std::clamp<int64_t>(int_arg(indent, "indent"), 0, 64)), ' ');
    }
    st.item_sep = ",";
  }
  Value seps = arg(a, 2, "separators", none());
  if (seps.kind != Value::kNone) {
    if (!is_seq(seps) || seps.list->size() != 2) raise("separators must be a pair of strings");
    st.item_sep = str_arg((*seps.list)[0], "the item separator");
    st.key_sep = str_arg((*seps.list)[1], "the key separator");
  }
  st.sort_keys = truthy(arg(a, 3, "sort_keys", boolean(false)));
  std::string out;
  to_json(v, st, 0, out);
  return string(std::move(out));
}

Value filter_length(const Value& v, Args& a) {
  check_args(a, "length", {});
  return integer(length(v));
}

Value filter_upper(const Value& v, Args& a) {
  check_args(a, "upper", {});
  return string(upper(str_of(v)));
}
Value filter_lower(const Value& v, Args& a) {
  check_args(a, "lower", {});
  return string(lower(str_of(v)));
}
Value filter_capitalize(const Value& v, Args& a) {
  check_args(a, "capitalize", {});
  return string(py_capitalize(str_of(v)));
}

// jinja2's title: words start after spaces, '-', and opening brackets.
Value filter_title(const Value& v, Args& a) {
  check_args(a, "title", {});
  std::string s = str_of(v);
  bool start = true;
  for (char& c : s) {
    bool sep = c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f' || c == '-' ||
               c == '(' || c == '{' || c == '[' || c == '<';
    c = start ? ascii_upper(c) : ascii_lower(c);
    start = sep;
  }
  return string(std::move(s));
}

Value filter_replace(const Value& v, Args& a) {
  check_args(a, "replace", {"old", "new", "count"});
  const Value* old = find_arg(a, 0, "old");
  const Value* repl = find_arg(a, 1, "new");
  if (!old || !repl) raise("replace needs the old and the new string");
  Value count = arg(a, 2, "count", none());
  return string(py_replace(str_of(v), str_of(*old), str_of(*repl),
                           count.kind == Value::kNone ? -1 : int_arg(count, "count")));
}

Value filter_join(const Value& v, Args& a) {
  check_args(a, "join", {"d", "attribute"});
  std::string sep = str_of(arg(a, 0, "d", string("")));
  Value attribute = arg(a, 1, "attribute", none());
  std::string out;
  List items = iterate(v);
  for (size_t k = 0; k < items.size(); ++k) {
    if (k) out += sep;
    out += str_of(attribute.kind == Value::kNone ? items[k] : lookup_path(items[k], attribute));
    check_text_size(out.size());
  }
  return string(std::move(out));
}

Value filter_first(const Value& v, Args& a) {
  check_args(a, "first", {});
  List items = iterate(v);
  return items.empty() ? undefined("no first item, sequence was empty") : items.front();
}
Value filter_last(const Value& v, Args& a) {
  check_args(a, "last", {});
  List items = iterate(v);
  return items.empty() ? undefined("no last item, sequence was empty") : items.back();
}

Value filter_default(const Value& v, Args& a) {
  check_args(a, "default", {"default_value", "boolean"});
  bool use = truthy(arg(a, 1, "boolean", boolean(false))) ? !truthy(v) : v.kind == Value::kUndefined;
  return use ? arg(a, 0, "default_value", string("")) : v;
}

Value filter_string(const Value& v, Args& a) {
  check_args(a, "string", {});
  return string(str_of(v));
}
Value filter_safe(const Value& v, Args& a) {
  check_args(a, "safe", {});
  return string(str_of(v));
}

Value filter_escape(const Value& v, Args& a) {
  check_args(a, "escape", {});
  std::string out;
  for (char c : str_of(v)) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&#34;";
        break;
      case '\'':
        out += "&#39;";
        break;
      default:
        out += c;
    }
  }
  return string(std::move(out));
}

// Python's float(str): decimal text with optional sign and surrounding whitespace.
std::optional<double> parse_float(const std::string& text) {
  std::string s(py_strip(text, nullptr, true, true));
  s.erase(std::remove(s.begin(), s.end(), '_'), s.end());
  if (s.empty()) return std::nullopt;
  std::string l = lower(s);
  const char* body = l.c_str() + (l[0] == '+' || l[0] == '-');
  if (!std::strcmp(body, "inf") || !std::strcmp(body, "infinity") || !std::strcmp(body, "nan")) {
    double x = std::strcmp(body, "nan") ? INFINITY : NAN;
    return l[0] == '-' ? -x : x;
  }
  if (l.find_first_not_of("0123456789.e+-") != std::string::npos) return std::nullopt;
  char* end = nullptr;
  double x = std::strtod(s.c_str(), &end);
  if (end != s.c_str() + s.size()) return std::nullopt;
  return x;
}

Value filter_int(const Value& v, Args& a) {
  check_args(a, "int", {"default", "base"});
  Value dflt = arg(a, 0, "default", integer(0));
  int64_t base = int_arg(arg(a, 1, "base", integer(10)), "base");
  defined(v);  // int(Undefined) fails in jinja2 rather than giving the default
  if (is_intlike(v)) return integer(as_int(v));
  if (v.kind == Value::kFloat) {
    if (!std::isfinite(v.f) || std::fabs(v.f) >= 9.2e18) return dflt;
    return integer(static_cast<int64_t>(v.f));
  }
  if (v.kind != Value::kString) return dflt;
  std::string s(py_strip(v.s, nullptr, true, true));
  s.erase(std::remove(s.begin(), s.end(), '_'), s.end());
  if (!s.empty() && base >= 2 && base <= 36) {
    size_t digits = s[0] == '+' || s[0] == '-';
    std::string l = lower(s);
    if (base == 16 && l.compare(digits, 2, "0x") == 0) digits += 2;
    if (base == 8 && l.compare(digits, 2, "0o") == 0) digits += 2;
    if (base == 2 && l.compare(digits, 2, "0b") == 0) digits += 2;
    std::string number = (s[0] == '-' ? "-" : "") + s.substr(digits);
    char* end = nullptr;
    errno = 0;
    long long x = std::strtoll(number.c_str(), &end, static_cast<int>(base));
    if (digits < s.size() && std::isalnum(static_cast<unsigned char>(s[digits])) && errno == 0 &&
        end == number.c_str() + number.size()) {
      return integer(x);
    }
  }
  std::optional<double> f = parse_float(v.s);
  if (!f || !std::isfinite(*f) || std::fabs(*f) >= 9.2e18) return dflt;
  return integer(static_cast<int64_t>(*f));
}

Value filter_float(const Value& v, Args& a) {
  check_args(a, "float", {"default"});
  Value dflt = arg(a, 0, "default", number(0.0));
  defined(v);
  if (is_num(v)) return number(as_double(v));
  if (v.kind != Value::kString) return dflt;
  std::optional<double> f = parse_float(v.s);
  return f ? number(*f) : dflt;
}

Value filter_abs(const Value& v, Args& a) {
  check_args(a, "abs", {});
  if (v.kind == Value::kFloat) return number(std::fabs(v.f));
  int64_t x = int_arg(v, "abs's operand");
  if (x == INT64_MIN) raise("integer overflow");
  return integer(x < 0 ? -x : x);
}

Value filter_round(const Value& v, Args& a) {
  check_args(a, "round", {"precision", "method"});
  int64_t precision =
      std::clamp<int64_t>(int_arg(arg(a, 0, "precision", integer(0)), "precision"), -300, 300);
  std::string how = str_arg(arg(a, 1, "method", string("common")), "method");
  if (!is_num(v)) raise("round needs a number, not {}", type_name(v));
  if (how == "common") {
    // Python's round(): round-half-even on the exact binary value; an int with precision 0 stays one.
    if (is_intlike(v) && precision == 0) return integer(as_int(v));
    double x = as_double(v);
    if (!std::isfinite(x)) return number(x);
    if (precision >= 0) {
      char text[700];
      std::snprintf(text, sizeof text, "%.*f", static_cast<int>(precision), x);
      return number(std::strtod(text, nullptr));
    }
    double scale = std::pow(10.0, static_cast<double>(-precision));
    return number(std::nearbyint(x / scale) * scale);
  }
  if (how != "ceil" && how != "floor") raise("method must be common, ceil or floor");
  double scale = std::pow(10.0, static_cast<double>(precision));
  double x = as_double(v) * scale;
  return number((how == "ceil" ? std::ceil(x) : std::floor(x)) / scale);
}

Value filter_list(const Value& v, Args& a) {
  check_args(a, "list", {});
  return sequence(iterate(v));
}

Value filter_items(const Value& v, Args& a) {
  check_args(a, "items", {});
  if (v.kind == Value::kUndefined) return sequence({});
  if (v.kind != Value::kDict) raise("can only get item pairs from a mapping, not {}", type_name(v));
  List out;
  for (const auto& [k, x] : v.dict->items) out.push_back(sequence({k, x}, true));
  return sequence(std::move(out));
}

Value filter_reverse(const Value& v, Args& a) {
  check_args(a, "reverse", {});
  if (v.kind == Value::kString) return slice(v, none(), none(), integer(-1));
  List items = iterate(v);
  std::reverse(items.begin(), items.end());
  return sequence(std::move(items));
}

// The key filters such as sort and unique compare by: the attribute, strings lower-cased unless
// case_sensitive.
Value sort_key(const Value& v, const Value& attribute, bool case_sensitive) {
  Value key = attribute.kind == Value::kNone ? v : lookup_path(v, attribute);
  if (!case_sensitive && key.kind == Value::kString) return string(lower(key.s));
  return key;
}

Value filter_sort(const Value& v, Args& a) {
  check_args(a, "sort", {"reverse", "case_sensitive", "attribute"});
  bool reverse = truthy(arg(a, 0, "reverse", boolean(false)));
  bool cs = truthy(arg(a, 1, "case_sensitive", boolean(false)));
  Value attribute = arg(a, 2, "attribute", none());
  List items = iterate(v);
  std::vector<std::pair<Value, Value>> keyed;
  for (Value& x : items) keyed.emplace_back(sort_key(x, attribute, cs), std::move(x));
  std::stable_sort(keyed.begin(), keyed.end(), [&](const auto& l, const auto& r) {
    return reverse ? less(r.first, l.first) : less(l.first, r.first);
  });
  List out;
  for (auto& [k, x] : keyed) out.push_back(std::move(x));
  return sequence(std::move(out));
}

Value filter_dictsort(const Value& v, Args& a) {
  check_args(a, "dictsort", {"case_sensitive", "by", "reverse"});
  if (v.kind != Value::kDict) raise("dictsort needs a mapping, not {}", type_name(v));
  bool cs = truthy(arg(a, 0, "case_sensitive", boolean(false)));
  std::string by = str_arg(arg(a, 1, "by", string("key")), "by");
  if (by != "key" && by != "value") raise("by must be key or value");
  bool reverse = truthy(arg(a, 2, "reverse", boolean(false)));
  auto items = v.dict->items;
  auto key = [&](const std::pair<Value, Value>& p) {
    const Value& k = by == "key" ? p.first : p.second;
    return !cs && k.kind == Value::kString ? string(lower(k.s)) : k;
  };
  std::stable_sort(items.begin(), items.end(), [&](const auto& l, const auto& r) {
    return reverse ? less(key(r), key(l)) : less(key(l), key(r));
  });
  List out;
  for (auto& [k, x] : items) out.push_back(sequence({k, x}, true));
  return sequence(std::move(out));
}

Value filter_unique(const Value& v, Args& a) {
  check_args(a, "unique", {"case_sensitive", "attribute"});
  bool cs = truthy(arg(a, 0, "case_sensitive", boolean(false)));
  Value attribute = arg(a, 1, "attribute", none());
  List out, seen;
  for (Value& x : iterate(v)) {
    Value key = sort_key(x, attribute, cs);
    if (std::any_of(seen.begin(), seen.end(), [&](const Value& s) { return equals(s, key); })) continue;
    seen.push_back(std::move(key));
    out.push_back(std::move(x));
  }
  return sequence(std::move(out));
}

Value min_max(const Value& v, Args& a, bool max) {
  check_args(a, max ? "max" : "min", {"case_sensitive", "attribute"});
  bool cs = truthy(arg(a, 0, "case_sensitive", boolean(false)));
  Value attribute = arg(a, 1, "attribute", none());
  List items = iterate(v);
  if (items.empty())
    return undefined(fmt::format("no {} item, sequence was empty", max ? "largest" : "smallest"));
  size_t best = 0;
  Value best_key = sort_key(items[0], attribute, cs);
  for (size_t k = 1; k < items.size(); ++k) {
    Value key = sort_key(items[k], attribute, cs);
    if (max ? less(best_key, key) : less(key, best_key)) {
      best = k;
      best_key = std::move(key);
    }
  }
  return items[best];
}
Value filter_max(const Value& v, Args& a) {
  return min_max(v, a, true);
}
Value filter_min(const Value& v, Args& a) {
  return min_max(v, a, false);
}

Value filter_sum(const Value& v, Args& a) {
  check_args(a, "sum", {"attribute", "start"});
  Value attribute = arg(a, 0, "attribute", none());
  Value total = arg(a, 1, "start", integer(0));
  for (const Value& x : iterate(v))
    total = arithmetic("+", total, attribute.kind == Value::kNone ? x : lookup_path(x, attribute));
  return total;
}

Value filter_indent(const Value& v, Args& a) {
  check_args(a, "indent", {"width", "first", "blank"});
  Value width = arg(a, 0, "width", integer(4));
  std::string pad =
      width.kind == Value::kString
          ? width.s
          : std::string(static_cast<size_t>(std::clamp<int64_t>(int_arg(width, "width"), 0, 1024)), ' ');
  bool first = truthy(arg(a, 1, "first", boolean(false)));
  bool blank = truthy(arg(a, 2, "blank", boolean(false)));
  std::vector<std::string> lines = split_lines(str_of(v) + "\n");
  std::string out;
  for (size_t k = 0; k < lines.size(); ++k) {
    if (k) {
      out += '\n';
      if (blank || !lines[k].empty()) out += pad;
    }
    out += lines[k];
    check_text_size(out.size());
  }
  if (first) out = pad + out;
  return string(std::move(out));
}

Value filter_count(const Value& v, Args& a) {
  return filter_length(v, a);
}

Value filter_attr(const Value& v, Args& a) {
  check_args(a, "attr", {"name"});
  std::string name = str_arg(arg(a, 0, "name", none()), "the attribute name");
  Value m = method(v, name);
  if (m.kind != Value::kUndefined || v.kind != Value::kNamespace) return m;
  const Value* x = find_key(*v.dict, name);
  return x ? *x : undefined(fmt::format("'Namespace' object has no attribute '{}'", name));
}

// select/reject and their attribute forms: the items whose test (truthiness without one) passes,
// or fails.
Value select_items(const Value& v, Args& a, bool keep, bool by_attribute) {
  size_t skip = by_attribute ? 1 : 0;
  Value attribute = by_attribute ? arg(a, 0, "attribute", none()) : none();
  if (by_attribute && attribute.kind == Value::kNone) raise("selectattr and rejectattr need an attribute");
  const TestFn* test = nullptr;
  Args test_args;
  if (a.pos.size() > skip) {
    const std::string& name = str_arg(a.pos[skip], "the test name");
    test = find_test(name);
    if (!test) raise("no test named '{}'", name);
    test_args = rest(a, skip + 1);
  }
  List out;
  if (!truthy(v)) return sequence({});  // as jinja2, which iterates only a true value
  for (Value& x : iterate(v)) {
    Value probe = by_attribute ? lookup_path(x, attribute) : x;
    bool pass = test ? (*test)(probe, test_args) : truthy(probe);
    if (pass == keep) out.push_back(std::move(x));
  }
  return sequence(std::move(out));
}
Value filter_select(const Value& v, Args& a) {
  return select_items(v, a, true, false);
}
Value filter_reject(const Value& v, Args& a) {
  return select_items(v, a, false, false);
}
Value filter_selectattr(const Value& v, Args& a) {
  return select_items(v, a, true, true);
}
Value filter_rejectattr(const Value& v, Args& a) {
  return select_items(v, a, false, true);
}

Value filter_map(const Value& v, Args& a) {
  List out;
  if (!truthy(v)) return sequence({});  // as jinja2, which iterates only a true value
  if (const Value* attribute = find_arg(a, a.pos.size(), "attribute"); attribute && a.pos.empty()) {
    check_args(a, "map", {"attribute", "default"});
    const Value* dflt = find_arg(a, a.pos.size(), "default");
    for (const Value& x : iterate(v)) {
      Value y = lookup_path(x, *attribute);
      out.push_back(y.kind == Value::kUndefined && dflt ? *dflt : std::move(y));
    }
    return sequence(std::move(out));
  }
  if (a.pos.empty()) raise("map needs a filter name or attribute=");
  const std::string& name = str_arg(a.pos[0], "the filter name");
  const FilterFn* f = find_filter(name);
  if (!f) raise("no filter named '{}'", name);
  for (const Value& x : iterate(v)) {
    Args fa = rest(a, 1);
    out.push_back((*f)(x, fa));
  }
  return sequence(std::move(out));
}

const FilterFn* find_filter(std::string_view name) {
  static const std::pair<std::string_view, FilterFn> kFilters[] = {
      {"abs", filter_abs},           {"attr", filter_attr},       {"capitalize", filter_capitalize},
      {"count", filter_count},       {"d", filter_default},       {"default", filter_default},
      {"dictsort", filter_dictsort}, {"e", filter_escape},        {"escape", filter_escape},
      {"first", filter_first},       {"float", filter_float},     {"indent", filter_indent},
      {"int", filter_int},           {"items", filter_items},     {"join", filter_join},
      {"last", filter_last},         {"length", filter_length},   {"list", filter_list},
      {"lower", filter_lower},       {"map", filter_map},         {"max", filter_max},
      {"min", filter_min},           {"reject", filter_reject},   {"rejectattr", filter_rejectattr},
      {"replace", filter_replace},   {"reverse", filter_reverse}, {"round", filter_round},
      {"safe", filter_safe},         {"select", filter_select},   {"selectattr", filter_selectattr},
      {"sort", filter_sort},         {"string", filter_string},   {"sum", filter_sum},
      {"title", filter_title},       {"tojson", filter_tojson},   {"trim", filter_trim},
      {"unique", filter_unique},     {"upper", filter_upper},
  };
  for (const auto& f : kFilters) {
    if (f.first == name) return &f.second;
  }
  return nullptr;
}

// ---------------------------------------------------------------------------------------------
// The renderer.

struct Scope {
  Scope* parent = nullptr;
  std::vector<std::pair<std::string, Value>> vars;

  const Value* find(std::string_view name) const {
    for (const Scope* s = this; s; s = s->parent) {
      for (auto it = s->vars.rbegin(); it != s->vars.rend(); ++it) {
        if (it->first == name) return &it->second;
      }
    }
    return nullptr;
  }
  void set(const std::string& name, Value v) {
    for (auto& [k, x] : vars) {
      if (k == name) {
        x = std::move(v);
        return;
      }
    }
    vars.emplace_back(name, std::move(v));
  }
};

class Renderer {
 public:
  Renderer(const Template& tmpl, const RenderOptions& options) : tmpl_(tmpl), options_(options) {
    add_globals();
    root_.parent = &globals_;
  }

  Rendered run(const nlohmann::ordered_json& variables) {
    if (!variables.is_object()) raise("the template's variables must be a JSON object");
    for (const auto& [k, v] : variables.items()) root_.set(k, from_json(v));
    out_ = &result_.text;
    exec(tmpl_.body, root_);
    return std::move(result_);
  }

 private:
  enum class Flow { kNormal, kBreak, kContinue };

  const Template& tmpl_;
  const RenderOptions& options_;
  Scope globals_, root_;
  Rendered result_;
  std::string* out_ = nullptr;  // where output goes: the result, or a block being captured
  int depth_ = 0;
  int64_t steps_ = 0;

  void step() {
    if (++steps_ > kMaxSteps) raise("the template runs for more than {} steps", kMaxSteps);
  }

  struct DepthGuard {
    Renderer& r;
    explicit DepthGuard(Renderer& renderer) : r(renderer) {
      if (++r.depth_ > kMaxDepth) raise("the template recurses or nests more than {} levels", kMaxDepth);
      r.step();
    }
    ~DepthGuard() { --r.depth_; }
  };

  void emit(std::string_view s) {
    check_text_size(out_->size() + s.size());
    out_->append(s);
  }

  // Output of `body` run in `scope`, as a string (block set, filter blocks, macros).
  std::string capture(const Body& body, Scope& scope) {
    std::string buffer;
    std::string* saved = out_;
    out_ = &buffer;
    try {
      exec(body, scope);
    } catch (...) {
      out_ = saved;
      throw;
    }
    out_ = saved;
    return buffer;
  }

  void add_globals() {
    globals_.set("range", function("range", [](Args& a) {
                   check_args(a, "range", {"start", "stop", "step"});
                   if (a.pos.empty()) raise("range expected at least 1 argument");
                   int64_t start = 0, stop, step = 1;
                   if (a.pos.size() == 1) {
                     stop = int_arg(a.pos[0], "range's argument");
                   } else {
                     start = int_arg(a.pos[0], "range's start");
                     stop = int_arg(a.pos[1], "range's stop");
                     if (a.pos.size() > 2) step = int_arg(a.pos[2], "range's step");
                   }
                   if (step == 0) raise("range() arg 3 must not be zero");
                   List out;
                   for (int64_t k = start; step > 0 ? k < stop : k > stop; k += step) {
                     if (static_cast<int64_t>(out.size()) >= kMaxRange) {
                       raise("range too big: the sandbox allows at most {} items", kMaxRange);
                     }
                     out.push_back(integer(k));
                   }
                   return sequence(std::move(out));
                 }));
    auto from_kwargs = [](Args& a, Value::Kind kind, const char* fn) {
      Dict d;
      if (a.pos.size() > 1) raise("{}() takes at most one positional argument", fn);
      if (!a.pos.empty()) {
        if (a.pos[0].kind != Value::kDict) raise("{}()'s argument must be a dict", fn);
        d = *a.pos[0].dict;
      }
      for (auto& [k, v] : a.kw) set_key(d, string(k), v);
      return mapping(std::move(d), kind);
    };
    globals_.set("namespace", function("namespace", [from_kwargs](Args& a) {
                   return from_kwargs(a, Value::kNamespace, "namespace");
                 }));
    globals_.set("dict",
                 function("dict", [from_kwargs](Args& a) { return from_kwargs(a, Value::kDict, "dict"); }));
    globals_.set("raise_exception", function("raise_exception", [](Args& a) -> Value {
                   check_args(a, "raise_exception", {"message"});
                   throw Failure{str_of(arg(a, 0, "message", string(""))), 0};
                 }));
    globals_.set("strftime_now", function("strftime_now", [this](Args& a) {
                   check_args(a, "strftime_now", {"format"});
                   std::string format = str_arg(arg(a, 0, "format", none()), "strftime_now's format");
                   if (format.size() > 4096) raise("strftime_now's format is too long");
                   std::tm now;
                   if (options_.now) {
                     now = *options_.now;
                   } else {
                     std::time_t t = std::time(nullptr);
                     localtime_r(&t, &now);
                   }
                   std::string out(256 + 64 * format.size(), '\0');
                   out.resize(std::strftime(out.data(), out.size(), format.c_str(), &now));
                   return string(std::move(out));
                 }));
  }

  Flow exec(const Body& body, Scope& scope) {
    for (const StmtPtr& s : body) {
      Flow f = exec(*s, scope);
      if (f != Flow::kNormal) return f;
    }
    return Flow::kNormal;
  }

  Flow exec(const Stmt& s, Scope& scope) {
    DepthGuard guard(*this);
    try {
      return exec_unguarded(s, scope);
    } catch (Failure& f) {
      if (!f.line) f.line = s.line;
      throw;
    }
  }

  Flow exec_unguarded(const Stmt& s, Scope& scope) {
    switch (s.kind) {
      case Stmt::kText:
        emit(s.text);
        return Flow::kNormal;
      case Stmt::kPrint:
        emit(str_of(eval(*s.expr, scope)));
        return Flow::kNormal;
      case Stmt::kIf:
        for (const auto& [cond, body] : s.branches) {
          if (truthy(eval(*cond, scope))) return exec(body, scope);
        }
        return exec(s.else_body, scope);
      case Stmt::kFor:
        return exec_for(s, scope);
      case Stmt::kSet: {
        Value v = eval(*s.expr, scope);
        if (!s.attr.empty()) {
          const Value* ns = scope.find(s.targets[0]);
          if (!ns || ns->kind != Value::kNamespace) raise("cannot assign attribute on non-namespace object");
          // Unlike jinja2: a namespace changed after it is made could come to hold itself (a cycle
          // that never frees) or nest without bound, so what is assigned holds no namespace.
          if (v.has_namespace) raise("a namespace attribute cannot hold a namespace");
          set_key(*ns->dict, string(s.attr), std::move(v));
        } else {
          assign(s.targets, std::move(v), scope);
        }
        return Flow::kNormal;
      }
      case Stmt::kSetBlock: {
        Value v = string(capture(s.body, scope));
        for (const ExprPtr& f : s.filters) v = apply_filter(*f, v, scope);
        scope.set(s.targets[0], std::move(v));
        return Flow::kNormal;
      }
      case Stmt::kMacro:
        scope.set(s.text, macro(s));
        return Flow::kNormal;
      case Stmt::kFilterBlock: {
        Value v = string(capture(s.body, scope));
        for (const ExprPtr& f : s.filters) v = apply_filter(*f, v, scope);
        emit(str_of(v));
        return Flow::kNormal;
      }
      case Stmt::kBreak:
        return Flow::kBreak;
      case Stmt::kContinue:
        return Flow::kContinue;
      case Stmt::kGeneration: {
        bool top = out_ == &result_.text;
        size_t begin = out_->size();
        Flow f = exec(s.body, scope);
        if (top) result_.generation.emplace_back(begin, out_->size());
        return f;
      }
    }
    return Flow::kNormal;
  }

  // Unpacking as Python's `a, b = value`.
  void assign(const std::vector<std::string>& targets, Value v, Scope& scope) {
    if (targets.size() == 1) {
      scope.set(targets[0], std::move(v));
      return;
    }
    List items = iterate(defined(v));
    if (items.size() != targets.size()) {
      raise("cannot unpack {} values into {} names", items.size(), targets.size());
    }
    for (size_t k = 0; k < targets.size(); ++k) scope.set(targets[k], std::move(items[k]));
  }

  Flow exec_for(const Stmt& s, Scope& scope) {
    Value seq = eval(*s.expr, scope);
    if (seq.kind == Value::kNone) raise("'NoneType' object is not iterable");
    List items = iterate(seq);
    if (s.cond) {
      // The filter sees each item but not `loop`: it decides which items the loop has.
      List kept;
      for (Value& x : items) {
        Scope probe{&scope, {}};
        assign(s.targets, x, probe);
        if (truthy(eval(*s.cond, probe))) kept.push_back(std::move(x));
      }
      items = std::move(kept);
    }
    if (items.empty()) return exec(s.else_body, scope);
    const int64_t n = static_cast<int64_t>(items.size());
    for (int64_t k = 0; k < n; ++k) {
      step();
      Scope iteration{&scope, {}};
      assign(s.targets, items[static_cast<size_t>(k)], iteration);
      if (s.uses_loop) iteration.set("loop", loop_object(items, k));
      Flow f = exec(s.body, iteration);
      if (f == Flow::kBreak) break;
    }
    return Flow::kNormal;
  }

  static Value loop_object(const List& items, int64_t k) {
    const int64_t n = static_cast<int64_t>(items.size());
    Dict loop;
    auto put = [&](const char* key, Value v) { loop.items.emplace_back(string(key), std::move(v)); };
    put("index", integer(k + 1));
    put("index0", integer(k));
    put("revindex", integer(n - k));
    put("revindex0", integer(n - k - 1));
    put("first", boolean(k == 0));
    put("last", boolean(k == n - 1));
    put("length", integer(n));
    put("depth", integer(1));
    put("depth0", integer(0));
    put("previtem", k > 0 ? items[static_cast<size_t>(k - 1)] : undefined("there is no previous item"));
    put("nextitem", k + 1 < n ? items[static_cast<size_t>(k + 1)] : undefined("there is no next item"));
    put("cycle", function("loop.cycle", [k](Args& a) {
          if (a.pos.empty()) raise("no items for cycling given");
          return a.pos[static_cast<size_t>(k) % a.pos.size()];
        }));
    return mapping(std::move(loop));
  }

  // A macro as a function: arguments by position or name, missing ones undefined or their default;
  // its body sees the template's top-level variables and its arguments, and returns its output.
  Value macro(const Stmt& s) {
    const Stmt* m = &s;
    return function(s.text, [this, m](Args& a) {
      if (a.pos.size() > m->params.size()) {
        raise("macro '{}' takes not more than {} argument(s)", m->text, m->params.size());
      }
      Scope local{&root_, {}};
      for (size_t k = 0; k < m->params.size(); ++k) {
        const Value* v = find_arg(a, k, m->params[k]);
        if (v) {
          local.set(m->params[k], *v);
        } else if (m->defaults[k]) {
          local.set(m->params[k], eval(*m->defaults[k], local));
        } else {
          local.set(m->params[k], undefined(fmt::format("parameter '{}' was not provided", m->params[k])));
        }
      }
      for (const auto& [k, v] : a.kw) {
        if (std::find(m->params.begin(), m->params.end(), k) == m->params.end()) {
          raise("macro '{}' has no argument '{}'", m->text, k);
        }
      }
      DepthGuard guard(*this);
      return string(capture(m->body, local));
    });
  }

  Args eval_args(const Expr& e, size_t first, Scope& scope) {
    Args a;
    for (size_t k = first; k < e.args.size(); ++k) a.pos.push_back(eval(*e.args[k], scope));
    for (const auto& [k, x] : e.kwargs) a.kw.emplace_back(k, eval(*x, scope));
    return a;
  }

  Value apply_filter(const Expr& f, const Value& v, Scope& scope) {
    Args a = eval_args(f, 1, scope);
    return f.filter(v, a);
  }

  Value eval(const Expr& e, Scope& scope) {
    DepthGuard guard(*this);
    try {
      return eval_unguarded(e, scope);
    } catch (Failure& f) {
      if (!f.line) f.line = e.line;
      throw;
    }
  }

  Value eval_unguarded(const Expr& e, Scope& scope) {
    switch (e.kind) {
      case Expr::kConst:
        return e.value;
      case Expr::kName: {
        const Value* v = scope.find(e.name);
        return v ? *v : undefined(fmt::format("'{}' is undefined", e.name));
      }
      case Expr::kList:
      case Expr::kTuple: {
        List items;
        for (const ExprPtr& x : e.args) items.push_back(eval(*x, scope));
        return sequence(std::move(items), e.kind == Expr::kTuple);
      }
      case Expr::kDict: {
        Dict d;
        for (size_t k = 0; k < e.args.size(); k += 2) {
          Value key = eval(*e.args[k], scope);
          set_key(d, std::move(key), eval(*e.args[k + 1], scope));
        }
        return mapping(std::move(d));
      }
      case Expr::kAttr:
        return get_attr(eval(*e.args[0], scope), e.name);
      case Expr::kItem: {
        Value obj = eval(*e.args[0], scope);
        return get_item(obj, eval(*e.args[1], scope));
      }
      case Expr::kSlice: {
        Value obj = eval(*e.args[0], scope);
        auto part = [&](size_t k) { return e.args[k] ? eval(*e.args[k], scope) : none(); };
        return slice(obj, part(1), part(2), part(3));
      }
      case Expr::kCall: {
        Value fn = eval(*e.args[0], scope);
        Args a = eval_args(e, 1, scope);
        if (fn.kind != Value::kFunction) {
          defined(fn);
          raise("'{}' object is not callable", type_name(fn));
        }
        return fn.fn->call(a);
      }
      case Expr::kFilter:
        return apply_filter(e, eval(*e.args[0], scope), scope);
      case Expr::kTest: {
        Value v = eval(*e.args[0], scope);
        Args a = eval_args(e, 1, scope);
        return boolean(e.test(v, a));
      }
      case Expr::kNeg:
      case Expr::kPos: {
        Value v = defined(eval(*e.args[0], scope));
        if (v.kind == Value::kFloat) return number(e.kind == Expr::kNeg ? -v.f : v.f);
        if (!is_intlike(v))
          raise("bad operand type for unary {}: '{}'", e.kind == Expr::kNeg ? '-' : '+', type_name(v));
        if (e.kind == Expr::kPos) return integer(as_int(v));
        if (as_int(v) == INT64_MIN) raise("integer overflow");
        return integer(-as_int(v));
      }
      case Expr::kNot:
        return boolean(!truthy(eval(*e.args[0], scope)));
      case Expr::kAnd: {
        Value l = eval(*e.args[0], scope);
        return truthy(l) ? eval(*e.args[1], scope) : l;
      }
      case Expr::kOr: {
        Value l = eval(*e.args[0], scope);
        return truthy(l) ? l : eval(*e.args[1], scope);
      }
      case Expr::kBinary: {
        Value l = eval(*e.args[0], scope);
        return arithmetic(e.name, l, eval(*e.args[1], scope));
      }
      case Expr::kCompare: {
        Value l = eval(*e.args[0], scope);
        for (size_t k = 0; k < e.ops.size(); ++k) {
          Value r = eval(*e.args[k + 1], scope);
          const std::string& op = e.ops[k];
          bool ok;
          if (op == "==") {
            ok = equals(l, r);
          } else if (op == "!=") {
            ok = !equals(l, r);
          } else if (op == "<") {
            ok = less(l, r);
          } else if (op == ">") {
            ok = less(r, l);
          } else if (op == "<=") {
            ok = less(l, r) || equals(l, r);
          } else if (op == ">=") {
            ok = less(r, l) || equals(l, r);
          } else if (op == "in") {
            ok = contains(r, l);
          } else {
            ok = !contains(r, l);
          }
          if (!ok) return boolean(false);
          l = std::move(r);
        }
        return boolean(true);
      }
      case Expr::kConcat: {
        std::string out;
        for (const ExprPtr& x : e.args) {
          out += str_of(eval(*x, scope));
          check_text_size(out.size());
        }
        return string(std::move(out));
      }
      case Expr::kCond:
        if (truthy(eval(*e.args[0], scope))) return eval(*e.args[1], scope);
        return e.args[2] ? eval(*e.args[2], scope)
                         : undefined("the condition was false and there is no else");
    }
    return undefined({});
  }
};

}  // namespace

std::shared_ptr<const Template> parse(std::string_view source, const std::string& name) {
  if (!utf8::is_valid(source)) fail("{}: not valid UTF-8", name);
  auto tmpl = std::make_shared<Template>();
  tmpl->name = name;
  try {
    tmpl->body = Parser(Lexer(source).run()).parse_template(tmpl->uses_generation);
  } catch (const Failure& f) {
    fail("{}, line {}: {}", name, f.line, f.message);
  }
  return tmpl;
}

bool uses_generation(const Template& tmpl) {
  return tmpl.uses_generation;
}

Rendered render(const Template& tmpl, const nlohmann::ordered_json& variables, const RenderOptions& options) {
  built_bytes = built_items = 0;
  try {
    return Renderer(tmpl, options).run(variables);
  } catch (const Failure& f) {
    if (f.line) fail("{}, line {}: {}", tmpl.name, f.line, f.message);
    fail("{}: {}", tmpl.name, f.message);
  }
}

}  // namespace aligner::jinja
