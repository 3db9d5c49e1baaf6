#include "data/prompt_data.h"

#include "data/common.h"

namespace aligner {

namespace {

// The conversation up to its last user turn: replies after it are what is to be generated.
Conversation up_to_last_user(Conversation conv, const std::string& where) {
  while (!conv.messages.empty() && conv.messages.back().role == "assistant") conv.messages.pop_back();
  if (conv.messages.empty()) fail("{}: the conversation has no user turn to answer", where);
  return conv;
}

// The record's layout: the field the prompt was read from.
const char* prompt_layout(const nlohmann::json& r) {
  for (const char* key : {"input_ids", "messages", "conversations", "prompt", "text", "input"})
    if (r.contains(key)) return key;
  return nullptr;
}

// `layout`, when given, is set to the field the prompt is read from.
std::optional<PromptExample> make_prompt(const PromptDataset& ds, int64_t index, ExampleStatus& status,
                                         const char** layout = nullptr) {
  std::string where = ds.file.where(index);
  Encoder enc{ds.tok, ds.tmpl, false};
  PromptExample ex;
  ex.record = ds.file.read(index);
  const nlohmann::json& r = ex.record;
  if (layout) *layout = prompt_layout(r);
  // steerlm: the attributes asked of the reply: the record's own "label", else the data set's.
  auto attributes = [&]() -> std::string {
    auto own = get_optional_field<std::string>(r, "label", where);
    if (!own) return ds.generation_label;
    try {
      return steerlm_label(*own, ds.attribute_names);
    } catch (const Error& e) {
      fail("{}: field \"label\": {}", where, e.what());
    }
  };
  bool chat = false;
  auto from_chat = [&](Conversation conv, ChatFormat format) {
    chat = true;
    ChatTemplate t = ds.tmpl;
    t.format = format;
    if (format == ChatFormat::kSteerlm) conv.generation_label = attributes();
    std::vector<Segment> segments = render_segments(t, up_to_last_user(std::move(conv), where), true);
    ex.input_ids = tokenize_segments(segments, *ds.tok).ids;
    ex.text = segments_text(segments, ds.tok->special().bos_text, ds.tok->special().eos_text);
  };
  if (r.contains("input_ids")) {
    ex.input_ids = parse_token_ids(r["input_ids"], where, "input_ids", ds.tok->vocab_size());
    ex.text = ds.tok->decode(ex.input_ids);
  } else if (r.contains("messages")) {
    from_chat(parse_messages(r["messages"], where, "messages", false), ds.tmpl.format);
  } else if (r.contains("conversations")) {
    ChatFormat format = ds.tmpl.format;
    Conversation conv = parse_nemo_conversation(r, where, format, false);
    from_chat(conv, format);
  } else {
    const char* key = prompt_layout(r);
    if (!key) {
      fail(
          "{}: not a prompt record: expected a field input_ids, messages, conversations, prompt, text, input",
          where);
    }
    TextOrChat p = parse_text_or_chat(r[key], where, key, false);
    if (p.is_chat) {
      from_chat(p.chat, ds.tmpl.format);
    } else {
      ex.text = p.text;
      ex.input_ids = encode_prompt_text(enc, p.text);
    }
  }
  if (!chat && ds.tmpl.format == ChatFormat::kSteerlm && !attributes().empty())
    fail("{}: field \"{}\": a prompt used as is cannot be given steerlm attributes; give it as messages",
         where, prompt_layout(r));
  if (ex.input_ids.empty()) fail("{}: empty prompt", where);
  Sequence seq{std::move(ex.input_ids), {}};
  seq.loss_mask.assign(seq.input_ids.size(), 0);
  int64_t prompt_length = static_cast<int64_t>(seq.input_ids.size());
  bool keep_bos = ds.tmpl.bos && ds.tok->special().bos && seq.input_ids.front() == *ds.tok->special().bos;
  status = fit_length({&seq}, prompt_length, ds.opt.max_length, ds.opt.truncation, keep_bos);
  if (status == ExampleStatus::kDropped) return std::nullopt;
  ex.input_ids = std::move(seq.input_ids);
  if (status == ExampleStatus::kTruncated) ex.text = ds.tok->decode(ex.input_ids);
  return ex;
}

}  // namespace

PromptDataset open_prompt_dataset(const std::string& path, const Tokenizer& tok, const ChatTemplate& tmpl,
                                  const DataOptions& opt) {
  if (opt.max_length < 1) fail("{}: max_length must be positive, got {}", path, opt.max_length);
  return PromptDataset{JsonlFile(path), &tok, tmpl, opt, {}};
}

std::optional<PromptExample> prompt_example(PromptDataset& ds, int64_t index) {
  std::string where = ds.file.where(index);
  return read_guarded<PromptExample>(ds.file, ds.stats, ds.opt.skip_bad_lines, index, where,
                                     [&](ExampleStatus& status) { return make_prompt(ds, index, status); });
}

void check_dataset(PromptDataset& ds, int threads) {
  check_dataset_examples(
      ds, threads,
      [&](int64_t index, ExampleStatus& status) {
        const char* layout = nullptr;
        make_prompt(ds, index, status, &layout);
        return std::string(layout ? layout : "");
      },
      [&](int64_t index) { return ds.file.where(index); });
}

}  // namespace aligner
