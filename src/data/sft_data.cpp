#include "data/sft_data.h"

#include "data/common.h"

namespace aligner {

namespace {

SftFormat parse_sft_format(const std::string& name) {
  if (name == "auto") return SftFormat::kAuto;
  if (name == "input_output") return SftFormat::kInputOutput;
  if (name == "messages") return SftFormat::kMessages;
  if (name == "conversations") return SftFormat::kConversations;
  if (name == "text") return SftFormat::kText;
  fail("unknown SFT data format \"{}\": expected auto, input_output, messages, conversations or text", name);
}

SftFormat detect(const nlohmann::json& r, const std::string& where) {
  if (r.contains("messages")) return SftFormat::kMessages;
  if (r.contains("conversations")) return SftFormat::kConversations;
  if (r.contains("input") || r.contains("completion")) return SftFormat::kInputOutput;
  if (r.contains("text")) return SftFormat::kText;
  fail(
      "{}: not an SFT record: expected fields input+output, prompt+completion, messages, conversations or "
      "text",
      where);
}

bool has_reply(const Conversation& conv) {
  for (const Message& m : conv.messages) {
    if (m.role == "assistant") return true;
  }
  return false;
}

const char* layout_name(SftFormat format) {
  switch (format) {
    case SftFormat::kInputOutput:
      return "input_output";
    case SftFormat::kMessages:
      return "messages";
    case SftFormat::kConversations:
      return "conversations";
    default:
      return "text";
  }
}

Sequence make_sequence(const SftDataset& ds, const nlohmann::json& r, const std::string& where,
                       SftFormat format) {
  Encoder enc{ds.tok, ds.tmpl, ds.opt.add_eos};
  if (format == SftFormat::kInputOutput) {
    bool nemo = r.contains("input") || !r.contains("prompt");
    const char* in = nemo ? "input" : "prompt";
    const char* out = nemo ? "output" : "completion";
    TextOrChat prompt = parse_text_or_chat(require_field(r, in, where), where, in, true);
    TextOrChat response = parse_text_or_chat(require_field(r, out, where), where, out, true);
    if (!response.is_chat && is_blank(response.text)) fail("{}: field \"{}\": empty response", where, out);
    int64_t prompt_length = 0;
    return encode_prompt_response(enc, prompt, response, where, out, &prompt_length);
  }
  if (format == SftFormat::kMessages || format == SftFormat::kConversations) {
    Conversation conv = format == SftFormat::kMessages
                            ? parse_messages(require_field(r, "messages", where), where, "messages", true)
                            : parse_nemo_conversation(r, where, enc.tmpl.format, true);
    if (!has_reply(conv)) fail("{}: no assistant turn to train on", where);
    TokenizedText t = encode_chat(enc, conv, false);
    return {std::move(t.ids), std::move(t.loss_mask)};
  }
  // Language modelling: every token is a target but BOS, which nothing comes before.
  std::string text = get_field<std::string>(r, "text", where);
  if (is_blank(text)) fail("{}: field \"text\": empty text", where);
  Sequence seq;
  seq.input_ids = encode_prompt_text(enc, "");
  size_t bos = seq.input_ids.size();
  std::vector<int32_t> ids = encode_response_text(enc, text);
  seq.input_ids.insert(seq.input_ids.end(), ids.begin(), ids.end());
  seq.loss_mask.assign(seq.input_ids.size(), 1);
  std::fill(seq.loss_mask.begin(), seq.loss_mask.begin() + bos, 0);
  return seq;
}

}  // namespace

SftDataset open_sft_dataset(const std::string& path, const Tokenizer& tok, const ChatTemplate& tmpl,
                            const DataOptions& opt) {
  if (opt.max_length < 2) fail("{}: max_length must be at least 2, got {}", path, opt.max_length);
  return SftDataset{JsonlFile(path), parse_sft_format(opt.format), &tok, tmpl, opt, {}};
}

namespace {

// Example `index` and the layout its record has; nullopt when dropped for length.
std::optional<Sequence> build_example(const SftDataset& ds, int64_t index, ExampleStatus& status,
                                      SftFormat& layout) {
  const std::string where = ds.file.where(index);
  const nlohmann::json r = ds.file.read(index);
  layout = ds.format == SftFormat::kAuto ? detect(r, where) : ds.format;
  Sequence seq = make_sequence(ds, r, where, layout);
  int64_t prompt_length = first_loss_index(seq);
  status = fit_length({&seq}, prompt_length, ds.opt.max_length, ds.opt.truncation, ds.tmpl.bos);
  if (status == ExampleStatus::kDropped) return std::nullopt;
  return seq;
}

}  // namespace

std::optional<Sequence> sft_example(SftDataset& ds, int64_t index) {
  return read_guarded<Sequence>(ds.file, ds.stats, ds.opt.skip_bad_lines, index, ds.file.where(index),
                                [&](ExampleStatus& status) {
                                  SftFormat layout;
                                  return build_example(ds, index, status, layout);
                                });
}

void check_dataset(SftDataset& ds, int threads) {
  check_dataset_examples(
      ds, threads,
      [&](int64_t index, ExampleStatus& status) {
        SftFormat layout = SftFormat::kAuto;
        build_example(ds, index, status, layout);
        return std::string(layout_name(layout));
      },
      [&](int64_t index) { return ds.file.where(index); });
}

}  // namespace aligner
