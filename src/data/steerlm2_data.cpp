#include "data/steerlm2_data.h"

#include <cmath>

#include "data/attribute_data.h"

namespace aligner {

Steerlm2Prompt parse_steerlm2_prompt(const nlohmann::json& record, std::string_view where,
                                     const std::vector<std::string>& attributes) {
  Steerlm2Prompt p;
  // NeMo's steerlm2 prompt always starts with a system turn, empty when the line has none.
  p.conv.system = get_optional_field<std::string>(record, "system", where).value_or("");
  const nlohmann::json& turns = require_field(record, "prompt_turns", where);
  if (!turns.is_array())
    fail("{}: field \"prompt_turns\": expected a list of turns, got {}", where, json_type_name(turns));
  if (turns.size() % 2 == 0)
    fail(
        "{}: field \"prompt_turns\": expected an odd number of turns (User and Assistant alternating, "
        "the User first and last), got {}",
        where, turns.size());
  for (size_t i = 0; i < turns.size(); ++i) {
    const std::string item = fmt::format("prompt_turns[{}]", i);
    const std::string from = get_field<std::string>(turns[i], "from", where, item);
    const char* expected = i % 2 == 0 ? "User" : "Assistant";
    // The template writes these two speakers only; NeMo writes `from` as it is.
    if (from != expected)
      fail(
          "{}: field \"{}.from\": expected \"{}\" (User and Assistant alternate, the User first), got \"{}\"",
          where, item, expected, from);
    p.conv.messages.push_back(
        {i % 2 == 0 ? "user" : "assistant", get_field<std::string>(turns[i], "value", where, item), {}});
  }
  const auto label = get_optional_field<std::string>(record, "label", where);
  if (!label || is_blank(*label))
    fail(
        "{}: field \"label\": missing: SteerLM 2.0 conditions the responses on the attributes asked for, "
        "such as \"helpfulness:4,correctness:3\"",
        where);
  p.values.assign(attributes.size(), 0.0f);
  p.present.assign(attributes.size(), 0);
  try {
    parse_attribute_label(*label, attributes, p.values, p.present);
  } catch (const Error& e) {
    fail("{}: field \"label\": {}", where, e.what());
  }
  p.conv.generation_label = *label;
  return p;
}

Sequence encode_steerlm2_response(const Encoder& enc, const Conversation& prompt, const std::string& response,
                                  bool labelled, std::string_view where, int64_t* prompt_length) {
  Encoder e = enc;
  e.tmpl.format = labelled ? ChatFormat::kSteerlm : ChatFormat::kNemo;
  TextOrChat head{true, {}, prompt};
  TextOrChat reply{true, {}, {}};
  reply.chat.messages.push_back({"assistant", response, prompt.generation_label});
  return encode_prompt_response(e, head, reply, where, "responses", prompt_length);
}

namespace {

std::optional<Steerlm2Example> make_example(const Steerlm2Dataset& ds, int64_t index, ExampleStatus& status) {
  const std::string where = ds.file.where(index);
  const nlohmann::json r = ds.file.read(index);
  const Steerlm2Prompt p = parse_steerlm2_prompt(r, where, ds.attributes);
  const nlohmann::json& responses = require_field(r, "responses", where);
  if (!responses.is_array())
    fail("{}: field \"responses\": expected a list of responses, got {}", where, json_type_name(responses));
  // One response has w' = b' = 1: nothing to learn.
  if (responses.size() < 2)
    fail("{}: field \"responses\": SteerLM 2.0 needs at least 2 responses to a prompt, got {}", where,
         responses.size());
  const Encoder enc{ds.tok, ds.tmpl, false};
  Steerlm2Example ex;
  int64_t prompt_length = 0;
  for (size_t i = 0; i < responses.size(); ++i) {
    const std::string item = fmt::format("responses[{}]", i);
    const std::string from = get_field<std::string>(responses[i], "from", where, item);
    if (from != "Assistant")
      fail("{}: field \"{}.from\": expected \"Assistant\", got \"{}\"", where, item, from);
    const std::string value = get_field<std::string>(responses[i], "value", where, item);
    double logp[3];
    const char* keys[3] = {kLogPAttributes, kLogPResponse, kLogQResponse};
    for (int k = 0; k < 3; ++k) {
      logp[k] = get_field<double>(responses[i], keys[k], where, item);
      if (!std::isfinite(logp[k]))
        fail("{}: field \"{}.{}\": expected a finite log-probability, got {}", where, item, keys[k], logp[k]);
    }
    ex.log_w.push_back(logp[0] + logp[1] - logp[2]);
    ex.log_q.push_back(logp[2]);
    ex.responses.push_back(encode_steerlm2_response(enc, p.conv, value, true, where, &prompt_length));
  }
  std::vector<Sequence*> seqs;
  for (auto& s : ex.responses) seqs.push_back(&s);
  status = fit_length(seqs, prompt_length, ds.opt.max_length, ds.opt.truncation, ds.tmpl.bos);
  if (status == ExampleStatus::kDropped) return std::nullopt;
  return ex;
}

}  // namespace

Steerlm2Dataset open_steerlm2_dataset(const std::string& path, const Tokenizer& tok, const DataOptions& opt,
                                      std::vector<std::string> attributes) {
  if (opt.max_length < 2) fail("{}: max_length must be at least 2, got {}", path, opt.max_length);
  if (attributes.empty()) fail("{}: no attribute names given", path);
  return Steerlm2Dataset{JsonlFile(path),       &tok, resolve_chat_template("steerlm", tok), opt,
                         std::move(attributes), {}};
}

std::optional<Steerlm2Example> steerlm2_example(Steerlm2Dataset& ds, int64_t index) {
  return read_guarded<Steerlm2Example>(
      ds.file, ds.stats, ds.opt.skip_bad_lines, index, ds.file.where(index),
      [&](ExampleStatus& status) { return make_example(ds, index, status); });
}

void check_dataset(Steerlm2Dataset& ds, int threads) {
  check_dataset_examples(
      ds, threads,
      [&](int64_t index, ExampleStatus& status) {
        make_example(ds, index, status);
        return std::string("steerlm2");
      },
      [&](int64_t index) { return ds.file.where(index); });
}

}  // namespace aligner
