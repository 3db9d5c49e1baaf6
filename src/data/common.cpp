#include "data/common.h"

#include <algorithm>
#include <atomic>
#include <cctype>
#include <exception>
#include <mutex>
#include <thread>

namespace aligner {

namespace {

std::string lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

// NeMo names speakers freely: "User"/"Assistant" with its extra_id tokens, the whole Llama 3 header
// "<|start_header_id|>user<|end_header_id|>" with Llama 3 tokens, ShareGPT "human"/"gpt".
std::string nemo_role(std::string_view from, std::string_view where, std::string_view name) {
  std::string s = lower(from);
  const std::string start = "<|start_header_id|>", end = "<|end_header_id|>";
  if (s.size() > start.size() + end.size() && s.compare(0, start.size(), start) == 0 &&
      s.compare(s.size() - end.size(), end.size(), end) == 0) {
    s = s.substr(start.size(), s.size() - start.size() - end.size());
  }
  if (s == "user" || s == "human") return "user";
  if (s == "assistant" || s == "gpt") return "assistant";
  if (s == "system") return "system";
  fail("{}: field \"{}\": unknown speaker \"{}\" (expected User, Assistant, human, gpt, or a Llama 3 header)",
       where, name, from);
}

void append(std::vector<int32_t>& to, const std::vector<int32_t>& from) {
  to.insert(to.end(), from.begin(), from.end());
}

}  // namespace

bool is_blank(std::string_view s) {
  return std::all_of(s.begin(), s.end(), [](char c) { return std::isspace(static_cast<unsigned char>(c)); });
}

std::vector<int32_t> parse_token_ids(const nlohmann::json& value, std::string_view where,
                                     std::string_view name, int64_t vocab) {
  if (!value.is_array())
    fail("{}: field \"{}\": expected a list of token ids, got {}", where, name, json_type_name(value));
  std::vector<int32_t> ids;
  ids.reserve(value.size());
  for (size_t i = 0; i < value.size(); ++i) {
    const std::string element = fmt::format("{}[{}]", name, i);
    const int64_t id = json_as<int64_t>(value[i], where, element);
    if (id < 0 || id >= vocab)
      fail("{}: field \"{}\": token id {} is outside the vocabulary [0, {})", where, element, id, vocab);
    ids.push_back(static_cast<int32_t>(id));
  }
  return ids;
}

Conversation parse_messages(const nlohmann::json& value, std::string_view where, std::string_view name,
                            bool nonempty_replies) {
  if (!value.is_array()) {
    fail("{}: field \"{}\": expected a list of messages, got {}", where, name, json_type_name(value));
  }
  if (value.empty()) fail("{}: field \"{}\": no messages", where, name);
  Conversation conv;
  for (size_t i = 0; i < value.size(); ++i) {
    std::string item = fmt::format("{}[{}]", name, i);
    const nlohmann::json& m = value[i];
    if (!m.is_object()) {
      fail("{}: field \"{}\": expected a message {{\"role\", \"content\"}}, got {}", where, item,
           json_type_name(m));
    }
    std::string role = get_field<std::string>(m, "role", where, item);
    std::string content = get_field<std::string>(m, "content", where, item);
    if (role == "system") {
      if (i != 0) fail("{}: field \"{}.role\": a system message must be the first", where, item);
      conv.system = std::move(content);
      continue;
    }
    if (role != "user" && role != "assistant") {
      fail("{}: field \"{}.role\": expected user or assistant (or system first), got \"{}\"", where, item,
           role);
    }
    if (role == "assistant" && nonempty_replies && is_blank(content)) {
      fail("{}: field \"{}.content\": empty response", where, item);
    }
    std::string label = get_optional_field<std::string>(m, "label", where, item).value_or("");
    conv.messages.push_back({std::move(role), std::move(content), std::move(label)});
  }
  return conv;
}

TextOrChat parse_text_or_chat(const nlohmann::json& value, std::string_view where, std::string_view name,
                              bool nonempty_replies) {
  TextOrChat out;
  if (value.is_string()) {
    out.text = value.get<std::string>();
    return out;
  }
  if (!value.is_array()) {
    fail("{}: field \"{}\": expected a string or a list of messages, got {}", where, name,
         json_type_name(value));
  }
  out.is_chat = true;
  out.chat = parse_messages(value, where, name, nonempty_replies);
  return out;
}

Conversation parse_nemo_conversation(const nlohmann::json& record, std::string_view where, ChatFormat& format,
                                     bool nonempty_replies) {
  Conversation conv;
  conv.system = get_optional_field<std::string>(record, "system", where);
  if (auto type = get_optional_field<std::string>(record, "type", where)) {
    if (*type == "VALUE_TO_TEXT") {
      if (format == ChatFormat::kNemo) format = ChatFormat::kSteerlm;
    } else if (*type == "TEXT_TO_VALUE") {
      fail("{}: field \"type\": TEXT_TO_VALUE (training to predict the attribute line) is not supported",
           where);
    } else {
      fail("{}: field \"type\": expected VALUE_TO_TEXT, TEXT_TO_VALUE or null, got \"{}\"", where, *type);
    }
  }
  if (auto mask = get_optional_field<std::string>(record, "mask", where)) {
    if (nemo_role(*mask, where, "mask") != "user") {
      fail("{}: field \"mask\": only the user's turns can be masked out, got \"{}\"", where, *mask);
    }
  }
  const nlohmann::json& turns = require_field(record, "conversations", where);
  if (!turns.is_array()) {
    fail("{}: field \"conversations\": expected a list of turns, got {}", where, json_type_name(turns));
  }
  if (turns.empty()) fail("{}: field \"conversations\": no turns", where);
  for (size_t i = 0; i < turns.size(); ++i) {
    std::string item = fmt::format("conversations[{}]", i);
    std::string from = get_field<std::string>(turns[i], "from", where, item);
    std::string role = nemo_role(from, where, item + ".from");
    std::string value = get_field<std::string>(turns[i], "value", where, item);
    if (role == "system") {
      if (i != 0) fail("{}: field \"{}.from\": a system turn must be the first", where, item);
      conv.system = std::move(value);
      continue;
    }
    if (role == "assistant" && nonempty_replies && is_blank(value)) {
      fail("{}: field \"{}.value\": empty response", where, item);
    }
    std::string label = get_optional_field<std::string>(turns[i], "label", where, item).value_or("");
    conv.messages.push_back({std::move(role), std::move(value), std::move(label)});
  }
  return conv;
}

std::vector<int32_t> encode_prompt_text(const Encoder& enc, std::string_view text) {
  std::vector<int32_t> ids;
  if (enc.tmpl.bos) ids.push_back(*enc.tok->special().bos);
  append(ids, enc.tok->encode(text, false));
  return ids;
}

std::vector<int32_t> encode_response_text(const Encoder& enc, std::string_view text) {
  std::vector<int32_t> ids = enc.tok->encode(text, false);
  if (enc.add_eos && enc.tok->special().eos) ids.push_back(*enc.tok->special().eos);
  return ids;
}

TokenizedText encode_chat(const Encoder& enc, const Conversation& conv, bool add_generation_prompt) {
  return tokenize_segments(render_segments(enc.tmpl, conv, add_generation_prompt), *enc.tok);
}

Sequence encode_prompt_response(const Encoder& enc, const TextOrChat& prompt, const TextOrChat& response,
                                std::string_view where, std::string_view response_name,
                                int64_t* prompt_length) {
  Sequence seq;
  if (!prompt.is_chat) {
    if (response.is_chat) {
      fail("{}: field \"{}\": a text prompt needs a text response, got a list of messages", where,
           response_name);
    }
    seq.input_ids = encode_prompt_text(enc, prompt.text);
    *prompt_length = static_cast<int64_t>(seq.input_ids.size());
    append(seq.input_ids, encode_response_text(enc, response.text));
    seq.loss_mask.assign(seq.input_ids.size(), 1);
    std::fill(seq.loss_mask.begin(), seq.loss_mask.begin() + *prompt_length, 0);
    return seq;
  }
  Conversation full = prompt.chat;
  if (response.is_chat) {
    if (response.chat.system)
      fail("{}: field \"{}\": a response cannot hold a system message", where, response_name);
    full.messages.insert(full.messages.end(), response.chat.messages.begin(), response.chat.messages.end());
  } else {
    full.messages.push_back({"assistant", response.text, {}});
  }
  TokenizedText head = encode_chat(enc, prompt.chat, true);
  TokenizedText all = encode_chat(enc, full, false);
  if (all.ids.size() < head.ids.size() || !std::equal(head.ids.begin(), head.ids.end(), all.ids.begin())) {
    fail("{}: the {} template renders the prompt differently once the response follows it", where,
         chat_format_name(enc.tmpl.format));
  }
  *prompt_length = static_cast<int64_t>(head.ids.size());
  seq.input_ids = std::move(all.ids);
  seq.loss_mask = std::move(all.loss_mask);
  std::fill(seq.loss_mask.begin(), seq.loss_mask.begin() + *prompt_length, 0);
  return seq;
}

ExampleStatus fit_length(const std::vector<Sequence*>& seqs, int64_t& prompt_length, int64_t max_length,
                         Truncation policy, bool keep_first) {
  int64_t longest = 0;
  for (const Sequence* s : seqs) longest = std::max<int64_t>(longest, s->input_ids.size());
  if (longest <= max_length) return ExampleStatus::kOk;
  if (policy == Truncation::kDrop) return ExampleStatus::kDropped;
  int64_t keep = keep_first && prompt_length > 0 ? 1 : 0;
  int64_t cut = std::min(longest - max_length, prompt_length - keep);
  for (Sequence* s : seqs) {
    if (cut > 0) {
      s->input_ids.erase(s->input_ids.begin() + keep, s->input_ids.begin() + keep + cut);
      s->loss_mask.erase(s->loss_mask.begin() + keep, s->loss_mask.begin() + keep + cut);
    }
    // The response alone is too long: its end goes.
    if (static_cast<int64_t>(s->input_ids.size()) > max_length) {
      s->input_ids.resize(max_length);
      s->loss_mask.resize(max_length);
    }
  }
  prompt_length -= std::max<int64_t>(cut, 0);
  prompt_length = std::min(prompt_length, max_length);
  return ExampleStatus::kTruncated;
}

int64_t first_loss_index(const Sequence& seq) {
  auto it = std::find(seq.loss_mask.begin(), seq.loss_mask.end(), 1);
  return static_cast<int64_t>(it - seq.loss_mask.begin());
}

void check_examples(const JsonlFile& file, DataStats& stats, int64_t n, bool skip_bad_lines, int threads,
                    const std::function<std::string(int64_t, ExampleStatus&)>& build,
                    const std::function<std::string(int64_t)>& where) {
  std::vector<ExampleStatus> status(static_cast<size_t>(n), ExampleStatus::kUnread);
  std::vector<std::string> layout(static_cast<size_t>(n));
  std::vector<std::pair<int64_t, std::string>> errors;
  std::exception_ptr crash;  // anything but a bad record stops the check and is rethrown here
  std::mutex mutex;
  std::atomic<int64_t> next{0};
  auto work = [&] {
    for (int64_t i = next++; i < n; i = next++) {
      try {
        ExampleStatus s = ExampleStatus::kOk;
        layout[size_t(i)] = build(i, s);
        status[size_t(i)] = s;
      } catch (const Error& e) {
        std::string message = e.what();
        if (message.rfind(file.path() + ":", 0) != 0) message = where(i) + ": " + message;
        status[size_t(i)] = ExampleStatus::kBad;
        const std::lock_guard<std::mutex> lock(mutex);
        errors.emplace_back(i, std::move(message));
      } catch (...) {
        const std::lock_guard<std::mutex> lock(mutex);
        if (!crash) crash = std::current_exception();
        next = n;
      }
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < std::max(1, threads); ++t) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
  if (crash) std::rethrow_exception(crash);

  std::sort(errors.begin(), errors.end());
  if (!errors.empty() && !skip_bad_lines) {
    std::string listed;
    for (size_t k = 0; k < std::min<size_t>(10, errors.size()); ++k) listed += "\n  " + errors[k].second;
    fail("{}: {} bad record{}{}:{}\n(data.skip_bad_lines=true skips bad records)", file.path(), errors.size(),
         errors.size() == 1 ? "" : "s", errors.size() > 10 ? ", the first 10" : "", listed);
  }
  if (!errors.empty() && stats.first_error.empty()) stats.first_error = errors.front().second;
  for (int64_t i = 0; i < n; ++i) {
    record_status(stats, i, status[size_t(i)]);
    if (status[size_t(i)] != ExampleStatus::kBad) ++stats.layouts[layout[size_t(i)]];
  }
}

}  // namespace aligner
