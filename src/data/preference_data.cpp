#include "data/preference_data.h"

#include <algorithm>

#include "data/common.h"

namespace aligner {

namespace {

PreferenceFormat parse_preference_format(const std::string& name) {
  if (name == "auto") return PreferenceFormat::kAuto;
  if (name == "trl") return PreferenceFormat::kTrl;
  if (name == "nemo") return PreferenceFormat::kNemo;
  if (name == "hh") return PreferenceFormat::kHh;
  if (name == "text_pairs") return PreferenceFormat::kTextPairs;
  fail("unknown preference data format \"{}\": expected auto, trl, nemo, hh or text_pairs", name);
}

bool is_text_pair_record(const nlohmann::json& r) {
  return r.contains("text") && !r.contains("chosen") && !r.contains("chosen_response");
}

PreferenceFormat detect(const nlohmann::json& r, const std::string& where) {
  if (r.contains("chosen_response")) return PreferenceFormat::kNemo;
  if (r.contains("prompt")) return PreferenceFormat::kTrl;
  if (r.contains("chosen")) return PreferenceFormat::kHh;
  fail(
      "{}: not a preference record: expected fields prompt+chosen+rejected, "
      "prompt+chosen_response+rejected_response or chosen+rejected",
      where);
}

TextOrChat parse_answer(const nlohmann::json& r, const char* key, const std::string& where) {
  TextOrChat a = parse_text_or_chat(require_field(r, key, where), where, key, true);
  if (!a.is_chat && is_blank(a.text)) fail("{}: field \"{}\": empty response", where, key);
  if (a.is_chat && a.chat.messages.empty()) fail("{}: field \"{}\": empty response", where, key);
  return a;
}

bool same_message(const Message& a, const Message& b) {
  return a.role == b.role && a.content == b.content;
}

// Whole conversations given as chosen and rejected: the prompt is what they share.
void split_shared(const nlohmann::json& r, const std::string& where, TextOrChat& prompt, TextOrChat& chosen,
                  TextOrChat& rejected) {
  const nlohmann::json& c = require_field(r, "chosen", where);
  const nlohmann::json& j = require_field(r, "rejected", where);
  if (c.is_string() && j.is_string()) {
    HhSplit s = split_hh_pair(c.get<std::string>(), j.get<std::string>());
    if (is_blank(s.chosen)) fail("{}: field \"chosen\": empty response after the shared prompt", where);
    if (is_blank(s.rejected)) fail("{}: field \"rejected\": empty response after the shared prompt", where);
    prompt.text = std::move(s.prompt);
    chosen.text = std::move(s.chosen);
    rejected.text = std::move(s.rejected);
    return;
  }
  TextOrChat cc = parse_text_or_chat(c, where, "chosen", true);
  TextOrChat jj = parse_text_or_chat(j, where, "rejected", true);
  if (!cc.is_chat || !jj.is_chat)
    fail("{}: fields \"chosen\" and \"rejected\": expected both strings or both lists of messages", where);
  const auto& a = cc.chat.messages;
  const auto& b = jj.chat.messages;
  size_t n = 0;
  while (n < a.size() && n < b.size() && same_message(a[n], b[n])) ++n;
  if (n == a.size()) fail("{}: field \"chosen\": empty response after the shared messages", where);
  if (n == b.size()) fail("{}: field \"rejected\": empty response after the shared messages", where);
  if (n == 0 || a[n].role != "assistant" || b[n].role != "assistant") {
    fail(
        "{}: fields \"chosen\" and \"rejected\": expected the same messages up to a user turn, then "
        "different "
        "assistant replies",
        where);
  }
  prompt.is_chat = chosen.is_chat = rejected.is_chat = true;
  prompt.chat.system = cc.chat.system;
  prompt.chat.messages.assign(a.begin(), a.begin() + n);
  chosen.chat.messages.assign(a.begin() + n, a.end());
  rejected.chat.messages.assign(b.begin() + n, b.end());
}

const char* layout_name(PreferenceFormat format) {
  switch (format) {
    case PreferenceFormat::kNemo:
      return "nemo";
    case PreferenceFormat::kHh:
      return "hh";
    case PreferenceFormat::kTextPairs:
      return "text_pairs";
    default:
      return "trl";
  }
}

// Pair `index` and the layout of its record; nullopt when dropped for length.
std::optional<PreferenceExample> make_pair(const PreferenceDataset& ds, int64_t index, ExampleStatus& status,
                                           PreferenceFormat& layout) {
  Encoder enc{ds.tok, ds.tmpl, ds.opt.add_eos};
  PreferenceExample ex;
  layout = ds.format;
  if (ds.format == PreferenceFormat::kTextPairs) {
    std::string wc = ds.file.where(2 * index), wr = ds.file.where(2 * index + 1);
    std::string c = get_field<std::string>(ds.file.read(2 * index), "text", wc);
    std::string r = get_field<std::string>(ds.file.read(2 * index + 1), "text", wr);
    ex.chosen.input_ids = encode_prompt_text(enc, c);
    ex.rejected.input_ids = encode_prompt_text(enc, r);
    const auto& a = ex.chosen.input_ids;
    const auto& b = ex.rejected.input_ids;
    size_t n = std::mismatch(a.begin(), a.end(), b.begin(), b.end()).first - a.begin();
    if (n >= std::min(a.size(), b.size())) {
      fail(
          "{}: field \"text\": the chosen and rejected texts (lines {} and {}) are the same or one starts "
          "the other",
          wc, ds.file.line_number(2 * index), ds.file.line_number(2 * index + 1));
    }
    ex.prompt_length = static_cast<int64_t>(n);
    for (Sequence* s : {&ex.chosen, &ex.rejected}) {
      if (ds.opt.add_eos && ds.tok->special().eos) s->input_ids.push_back(*ds.tok->special().eos);
      s->loss_mask.assign(s->input_ids.size(), 1);
      std::fill(s->loss_mask.begin(), s->loss_mask.begin() + n, 0);
    }
  } else {
    std::string where = ds.file.where(index);
    nlohmann::json r = ds.file.read(index);
    if (layout == PreferenceFormat::kAuto) layout = detect(r, where);
    const PreferenceFormat format = layout;
    TextOrChat prompt, chosen, rejected;
    const char* ck = "chosen";
    const char* rk = "rejected";
    if (format == PreferenceFormat::kHh) {
      split_shared(r, where, prompt, chosen, rejected);
    } else {
      if (format == PreferenceFormat::kNemo) {
        ck = "chosen_response";
        rk = "rejected_response";
      }
      prompt = parse_text_or_chat(require_field(r, "prompt", where), where, "prompt", true);
      chosen = parse_answer(r, ck, where);
      rejected = parse_answer(r, rk, where);
    }
    int64_t rejected_prompt_length = 0;
    ex.chosen = encode_prompt_response(enc, prompt, chosen, where, ck, &ex.prompt_length);
    ex.rejected = encode_prompt_response(enc, prompt, rejected, where, rk, &rejected_prompt_length);
    ex.chosen_reward = get_optional_field<double>(r, "chosen_reward", where);
    ex.rejected_reward = get_optional_field<double>(r, "rejected_reward", where);
    ex.margin = get_optional_field<double>(r, "margin", where);
  }
  status = fit_length({&ex.chosen, &ex.rejected}, ex.prompt_length, ds.opt.max_length, ds.opt.truncation,
                      ds.tmpl.bos);
  if (status == ExampleStatus::kDropped) return std::nullopt;
  return ex;
}

// The "file:line" of pair `index` (of its chosen text, for text_pairs).
std::string where_of(const PreferenceDataset& ds, int64_t index) {
  return ds.file.where(ds.format == PreferenceFormat::kTextPairs ? 2 * index : index);
}

}  // namespace

HhSplit split_hh_pair(const std::string& chosen, const std::string& rejected) {
  static const std::string tag = "\n\nAssistant:";
  size_t shared =
      std::mismatch(chosen.begin(), chosen.end(), rejected.begin(), rejected.end()).first - chosen.begin();
  size_t at = shared >= tag.size() ? chosen.rfind(tag, shared - tag.size()) : std::string::npos;
  if (at == std::string::npos) fail("chosen and rejected share no prompt ending in \"\\n\\nAssistant:\"");
  size_t end = at + tag.size();
  return {chosen.substr(0, end), chosen.substr(end), rejected.substr(end)};
}

PreferenceDataset open_preference_dataset(const std::string& path, const Tokenizer& tok,
                                          const ChatTemplate& tmpl, const DataOptions& opt) {
  if (opt.max_length < 2) fail("{}: max_length must be at least 2, got {}", path, opt.max_length);
  PreferenceDataset ds{JsonlFile(path), parse_preference_format(opt.format), &tok, tmpl, opt, {}};
  if (ds.format == PreferenceFormat::kAuto) {
    // The first record that parses tells whether records pair up.
    for (int64_t i = 0; i < ds.file.size(); ++i) {
      try {
        if (is_text_pair_record(ds.file.read(i))) ds.format = PreferenceFormat::kTextPairs;
        break;
      } catch (const Error&) {
        if (!opt.skip_bad_lines) throw;
      }
    }
  }
  if (ds.format == PreferenceFormat::kTextPairs && ds.file.size() % 2 != 0) {
    fail(
        "{}: the text_pairs layout (chosen text, then rejected text) needs an even number of records, got {}",
        path, ds.file.size());
  }
  return ds;
}

int64_t dataset_size(const PreferenceDataset& ds) {
  return ds.format == PreferenceFormat::kTextPairs ? ds.file.size() / 2 : ds.file.size();
}

std::optional<PreferenceExample> preference_example(PreferenceDataset& ds, int64_t index) {
  return read_guarded<PreferenceExample>(ds.file, ds.stats, ds.opt.skip_bad_lines, index, where_of(ds, index),
                                         [&](ExampleStatus& status) {
                                           PreferenceFormat layout;
                                           return make_pair(ds, index, status, layout);
                                         });
}

void check_dataset(PreferenceDataset& ds, int threads) {
  check_dataset_examples(
      ds, threads,
      [&](int64_t index, ExampleStatus& status) {
        PreferenceFormat layout = PreferenceFormat::kAuto;
        make_pair(ds, index, status, layout);
        return std::string(layout_name(layout));
      },
      [&](int64_t index) { return where_of(ds, index); });
}

}  // namespace aligner
