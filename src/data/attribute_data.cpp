#include "data/attribute_data.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>

#include "data/common.h"
#include "text/trim.h"

namespace aligner {

namespace {

// NeMo writes -100 (its ignore index) for an attribute an example has no value for.
constexpr double kNemoMissing = -100.0;

std::string joined(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

void read_values(const AttributeDataset& ds, const nlohmann::json& r, const std::string& where,
                 const Conversation* conv, AttributeExample& ex) {
  const auto& names = ds.attributes;
  ex.values.assign(names.size(), 0.0f);
  ex.present.assign(names.size(), 0);
  auto label = r.find("label");
  if (label != r.end() && label->is_array()) {
    if (label->size() != names.size()) {
      fail("{}: field \"label\": {} values for {} attributes ({})", where, label->size(), names.size(),
           joined(names));
    }
    for (size_t a = 0; a < names.size(); ++a) {
      const nlohmann::json& v = (*label)[a];
      if (v.is_null()) continue;
      double d = json_as<double>(v, where, fmt::format("label[{}]", a));
      if (d == kNemoMissing) continue;
      ex.values[a] = static_cast<float>(d);
      ex.present[a] = 1;
    }
    return;
  }
  if (label != r.end() && !label->is_null()) {
    std::string s = json_as<std::string>(*label, where, "label");
    try {
      parse_attribute_label(s, names, ex.values, ex.present);
    } catch (const Error& e) {
      fail("{}: field \"label\": {}", where, e.what());
    }
    return;
  }
  bool any_field = false;
  for (size_t a = 0; a < names.size(); ++a) {
    if (auto v = get_optional_field<double>(r, names[a], where)) {
      ex.values[a] = static_cast<float>(*v);
      ex.present[a] = 1;
      any_field = true;
    }
  }
  if (any_field || !conv) return;
  for (auto m = conv->messages.rbegin(); m != conv->messages.rend(); ++m) {
    if (m->role != "assistant") continue;
    if (!m->label.empty()) {
      try {
        parse_attribute_label(m->label, names, ex.values, ex.present);
      } catch (const Error& e) {
        fail("{}: the last reply's label: {}", where, e.what());
      }
    }
    break;
  }
}

// Example `index` and the layout of its record; nullopt when dropped for length.
std::optional<AttributeExample> make_example(const AttributeDataset& ds, int64_t index, ExampleStatus& status,
                                             std::string& layout) {
  std::string where = ds.file.where(index);
  nlohmann::json r = ds.file.read(index);
  Encoder enc{ds.tok, ds.tmpl, ds.opt.add_eos};
  // The model scores a reply, so the reply's own attribute line is not part of its input.
  if (enc.tmpl.format == ChatFormat::kSteerlm) enc.tmpl.format = ChatFormat::kNemo;
  Sequence seq;
  int64_t prompt_length = 0;
  std::optional<Conversation> conv;
  if (r.contains("text")) {
    layout = "text";
    std::string text = get_field<std::string>(r, "text", where);
    if (is_blank(text)) fail("{}: field \"text\": empty text", where);
    seq.input_ids = encode_prompt_text(enc, text);
    if (enc.add_eos && ds.tok->special().eos) seq.input_ids.push_back(*ds.tok->special().eos);
    seq.loss_mask.assign(seq.input_ids.size(), 0);
    prompt_length = static_cast<int64_t>(seq.input_ids.size());
  } else if (r.contains("prompt")) {
    layout = "prompt_response";
    TextOrChat prompt = parse_text_or_chat(r["prompt"], where, "prompt", true);
    TextOrChat response = parse_text_or_chat(require_field(r, "response", where), where, "response", true);
    if (!response.is_chat && is_blank(response.text)) fail("{}: field \"response\": empty response", where);
    seq = encode_prompt_response(enc, prompt, response, where, "response", &prompt_length);
  } else if (r.contains("messages") || r.contains("conversations")) {
    layout = r.contains("messages") ? "messages" : "conversations";
    ChatFormat format = enc.tmpl.format;
    conv = r.contains("messages") ? parse_messages(r["messages"], where, "messages", true)
                                  : parse_nemo_conversation(r, where, format, true);
    TokenizedText t = encode_chat(enc, *conv, false);
    seq = {std::move(t.ids), std::move(t.loss_mask)};
    prompt_length = first_loss_index(seq);
  } else {
    fail("{}: not an attribute record: expected a field text, prompt+response, messages or conversations",
         where);
  }
  AttributeExample ex;
  read_values(ds, r, where, conv ? &*conv : nullptr, ex);
  if (std::find(ex.present.begin(), ex.present.end(), 1) == ex.present.end()) {
    fail("{}: no attribute values: expected \"label\" or fields named {}", where, joined(ds.attributes));
  }
  status = fit_length({&seq}, prompt_length, ds.opt.max_length, ds.opt.truncation, ds.tmpl.bos);
  if (status == ExampleStatus::kDropped) return std::nullopt;
  ex.input_ids = std::move(seq.input_ids);
  return ex;
}

}  // namespace

const std::vector<std::string>& nemo_attributes() {
  static const std::vector<std::string> names = {"quality",    "toxicity",    "humor",
                                                 "creativity", "helpfulness", "correctness",
                                                 "coherence",  "complexity",  "verbosity"};
  return names;
}

void parse_attribute_label(std::string_view label, const std::vector<std::string>& attributes,
                           std::vector<float>& values, std::vector<uint8_t>& present) {
  size_t pos = 0;
  while (pos <= label.size()) {
    size_t comma = label.find(',', pos);
    if (comma == std::string_view::npos) comma = label.size();
    std::string item = trim(label.substr(pos, comma - pos));
    pos = comma + 1;
    if (item.empty()) continue;
    size_t colon = item.find(':');
    if (colon == std::string::npos) fail("\"{}\" is not name:value", item);
    std::string name = trim(item.substr(0, colon));
    std::string value = trim(item.substr(colon + 1));
    auto it = std::find(attributes.begin(), attributes.end(), name);
    if (it == attributes.end())
      fail("unknown attribute \"{}\" (expected one of: {})", name, joined(attributes));
    size_t a = static_cast<size_t>(it - attributes.begin());
    char* end = nullptr;
    double v = std::strtod(value.c_str(), &end);
    if (value.empty() || *end != '\0' || !std::isfinite(v))
      fail("attribute \"{}\": \"{}\" is not a number", name, value);
    if (present[a]) fail("attribute \"{}\" given twice", name);
    values[a] = static_cast<float>(v);
    present[a] = 1;
  }
}

std::string attribute_label_text(const std::vector<std::string>& attributes, const std::vector<float>& values,
                                 const std::vector<uint8_t>& present) {
  std::string out;
  for (size_t a = 0; a < attributes.size(); ++a) {
    if (!present[a]) continue;
    const float v = values[a];
    const bool whole = std::fabs(v) < 1e15f && v == std::nearbyint(v);
    const std::string value = whole ? fmt::format("{}", int64_t(v)) : fmt::format("{}", v);
    out += (out.empty() ? "" : ",") + attributes[a] + ":" + value;
  }
  return out;
}

std::string steerlm_label(std::string_view label, const std::vector<std::string>& attributes) {
  std::vector<float> values(attributes.size(), 0.0f);
  std::vector<uint8_t> present(attributes.size(), 0);
  parse_attribute_label(label, attributes, values, present);
  return attribute_label_text(attributes, values, present);
}

AttributeDataset open_attribute_dataset(const std::string& path, const Tokenizer& tok,
                                        const ChatTemplate& tmpl, const DataOptions& opt,
                                        std::vector<std::string> attributes) {
  if (opt.max_length < 2) fail("{}: max_length must be at least 2, got {}", path, opt.max_length);
  if (attributes.empty()) fail("{}: no attribute names given", path);
  return AttributeDataset{JsonlFile(path), &tok, tmpl, opt, std::move(attributes), {}};
}

std::optional<AttributeExample> attribute_example(AttributeDataset& ds, int64_t index) {
  std::string where = ds.file.where(index);
  return read_guarded<AttributeExample>(ds.file, ds.stats, ds.opt.skip_bad_lines, index, where,
                                        [&](ExampleStatus& status) {
                                          std::string layout;
                                          return make_example(ds, index, status, layout);
                                        });
}

void check_dataset(AttributeDataset& ds, int threads) {
  check_dataset_examples(
      ds, threads,
      [&](int64_t index, ExampleStatus& status) {
        std::string layout;
        make_example(ds, index, status, layout);
        return layout;
      },
      [&](int64_t index) { return ds.file.where(index); });
}

}  // namespace aligner
