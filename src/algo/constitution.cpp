#include "algo/constitution.h"

#include <string_view>

#include "core/error.h"
#include "core/json.h"
#include "data/common.h"
#include "io/jsonl.h"
#include "text/trim.h"

namespace aligner {
namespace {

// "\n\nCritiqueRequest: Point out ...\n\nCritique:" -> "Point out ..." (label "Critique").
std::string unwrap(std::string_view request, const std::string& label) {
  std::string s = trim(request);
  const std::string prefix = label + "Request:", suffix = "\n" + label + ":";
  if (s.rfind(prefix, 0) == 0) s = trim(std::string_view(s).substr(prefix.size()));
  if (s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0)
    s = trim(std::string_view(s).substr(0, s.size() - suffix.size()));
  return s;
}

constexpr const char* kLayout =
    "{\"NAME\": {\"prompt\": [critique requests], \"edit_request\": revision request}, ...}";

std::string request_of(const nlohmann::ordered_json& value, const std::string& where, const std::string& key,
                       const std::string& label) {
  if (!value.is_string()) fail("{}: key \"{}\": expected a string, got {}", where, key, value.type_name());
  std::string s = unwrap(value.get<std::string>(), label);
  if (s.empty()) fail("{}: key \"{}\": empty request", where, key);
  return s;
}

}  // namespace

std::vector<Principle> read_constitution(const std::string& path) {
  const nlohmann::ordered_json doc = read_ordered_json_file(path);
  if (!doc.is_object())
    fail("{}: expected a JSON object of named principles {}, got {}", path, kLayout, doc.type_name());
  if (doc.empty()) fail("{}: no principles; expected {}", path, kLayout);
  std::vector<Principle> out;
  for (const auto& [name, value] : doc.items()) {
    const std::string where = fmt::format("{}: principle \"{}\"", path, name);
    if (!value.is_object())
      fail(
          "{}: expected an object {{\"prompt\": [critique requests], \"edit_request\": revision request}}, "
          "got {}",
          where, value.type_name());
    Principle p;
    p.name = name;
    if (!value.contains("prompt")) fail("{}: missing key \"prompt\" (its critique requests)", where);
    const auto& requests = value["prompt"];
    if (!requests.is_array() || requests.empty())
      fail("{}: key \"prompt\": expected a non-empty list of critique requests, got {}", where,
           requests.is_array() ? "an empty list" : requests.type_name());
    for (size_t i = 0; i < requests.size(); ++i)
      p.critique_requests.push_back(request_of(requests[i], where, fmt::format("prompt[{}]", i), "Critique"));
    if (!value.contains("edit_request"))
      fail("{}: missing key \"edit_request\" (its revision request)", where);
    p.revision_request = request_of(value["edit_request"], where, "edit_request", "Revision");
    if (value.contains("compare")) {
      if (!value["compare"].is_string() || is_blank(value["compare"].get<std::string>()))
        fail("{}: key \"compare\": expected the question to ask the judge, got {}", where,
             value["compare"].dump());
      p.comparison = trim(value["compare"].get<std::string>());
    } else {
      p.comparison = "Which response would need fewer changes to satisfy this request: " + p.revision_request;
    }
    out.push_back(std::move(p));
  }
  return out;
}

std::vector<Message> read_few_shot(const std::string& path) {
  static const char* kTurns[] = {"prompt",   "response",         "critique request",
                                 "critique", "revision request", "revision"};
  const JsonlFile file(path);
  std::vector<Message> out;
  for (int64_t i = 0; i < file.size(); ++i) {
    const std::string where = file.where(i);
    const nlohmann::json record = file.read(i);
    const Conversation c = parse_messages(require_field(record, "messages", where), where, "messages", true);
    if (c.system) fail("{}: field \"messages\": a few-shot exchange has no system message", where);
    if (c.messages.size() != 6)
      fail("{}: field \"messages\": expected 6 messages ({}, {}, {}, {}, {}, {}), got {}", where, kTurns[0],
           kTurns[1], kTurns[2], kTurns[3], kTurns[4], kTurns[5], c.messages.size());
    for (size_t k = 0; k < 6; ++k) {
      const char* role = k % 2 == 0 ? "user" : "assistant";
      if (c.messages[k].role != role)
        fail("{}: field \"messages[{}].role\": the {} is the {}'s turn, got \"{}\"", where, k, kTurns[k],
             role, c.messages[k].role);
      if (is_blank(c.messages[k].content))
        fail("{}: field \"messages[{}].content\": empty {}", where, k, kTurns[k]);
    }
    out.insert(out.end(), c.messages.begin(), c.messages.end());
  }
  return out;
}

}  // namespace aligner
