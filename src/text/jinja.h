// A Jinja2 interpreter for the chat templates of Hugging Face tokenizers, run as transformers runs
// them: ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True) with the loopcontrols
// extension ({% break %}, {% continue %}), transformers' {% generation %} tag, `tojson` as
// json.dumps(x, ensure_ascii=False), and the globals raise_exception(message) and
// strftime_now(format). Values behave as the Python objects jinja2 would hold: str(), repr(), ==,
// truthiness, slicing, the default Undefined (renders empty, is falsy, fails when used further).
//
// Templates come from downloaded model folders, so they are treated as hostile: a template sees
// only the variables it is given and cannot change them (no list.append, no file or attribute access
// beyond the data), and its time, output, recursion and nesting are bounded, so a template can fail
// but cannot hang or crash the process.
//
// Covered: {{ }}, {% %}, {# #}, {% raw %}, whitespace control (- and +); for (loop.*, `if` filters,
// else, unpacking), if/elif/else, set (namespace attributes, block set), macro, filter blocks;
// literals, arithmetic, ~, comparisons, and/or/not, in, is tests, a if c else b, attribute and item
// access, slicing; jinja2's filters and Python's str, list and dict methods that chat templates use.
// Not covered (an error naming the line): template inheritance, include/import, call blocks,
// recursive loops, with, str.format and %-formatting.
#pragma once
#include <ctime>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace aligner::jinja {

struct Template;

// A syntax error, or an unknown filter or test, is an aligner::Error "<name>, line N: ...".
std::shared_ptr<const Template> parse(std::string_view source, const std::string& name);

// Whether the template marks what the assistant writes with {% generation %} blocks.
bool uses_generation(const Template& tmpl);

struct RenderOptions {
  std::optional<std::tm> now;  // what strftime_now formats; the local time when unset
};

struct Rendered {
  std::string text;
  // [begin, end) byte offsets in text of what each {% generation %} block rendered, in order.
  std::vector<std::pair<size_t, size_t>> generation;
};

// `variables`: a JSON object, one template variable per key (key order is kept, as Python's dicts
// keep it). An error while rendering, raise_exception's included, is an aligner::Error
// "<name>, line N: ...".
Rendered render(const Template& tmpl, const nlohmann::ordered_json& variables,
                const RenderOptions& options = {});

}  // namespace aligner::jinja
