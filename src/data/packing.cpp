#include "data/packing.h"

#include <algorithm>

#include "core/error.h"

namespace aligner {

namespace {

Batch empty_batch(int64_t rows, int64_t cols, int32_t pad_id, bool labels) {
  Batch b;
  b.input_ids = at::full({rows, cols}, static_cast<int64_t>(pad_id), at::kLong);
  if (labels) b.labels = at::full({rows, cols}, kIgnoreIndex, at::kLong);
  b.position_ids = at::zeros({rows, cols}, at::kLong);
  b.attention_mask = at::zeros({rows, cols}, at::kLong);
  return b;
}

// Writes ids (and their labels) into row r from column c. The last token has no label: the token
// after it belongs to another example or is padding.
void place(Batch& b, int64_t r, int64_t c, const std::vector<int32_t>& ids,
           const std::vector<uint8_t>* mask) {
  int64_t cols = b.input_ids.size(1);
  int64_t* in = b.input_ids.data_ptr<int64_t>() + r * cols + c;
  int64_t* pos = b.position_ids.data_ptr<int64_t>() + r * cols + c;
  int64_t* att = b.attention_mask.data_ptr<int64_t>() + r * cols + c;
  int64_t n = static_cast<int64_t>(ids.size());
  for (int64_t t = 0; t < n; ++t) {
    in[t] = ids[t];
    pos[t] = t;
    att[t] = 1;
  }
  if (mask) {
    int64_t* lab = b.labels.data_ptr<int64_t>() + r * cols + c;
    for (int64_t t = 0; t + 1 < n; ++t) {
      if ((*mask)[t + 1]) lab[t] = ids[t + 1];
    }
  }
}

void check(const Sequence& s) {
  if (s.input_ids.size() != s.loss_mask.size()) {
    fail("sequence of {} tokens has a loss mask of {}", s.input_ids.size(), s.loss_mask.size());
  }
}

at::Tensor optional_column(const std::vector<PreferenceExample>& pairs,
                           std::optional<double> PreferenceExample::*field) {
  std::vector<float> v;
  for (const auto& p : pairs) {
    if (!(p.*field)) return {};
    v.push_back(static_cast<float>(*(p.*field)));
  }
  return at::tensor(v, at::kFloat);
}

}  // namespace

int32_t pad_id_for(const Tokenizer& tok) {
  const SpecialTokens& s = tok.special();
  if (s.pad) return *s.pad;
  if (s.eos) return *s.eos;
  return 0;
}

Batch collate_padded(const std::vector<Sequence>& seqs, int32_t pad_id) {
  if (seqs.empty()) fail("collate: empty batch");
  int64_t cols = 0;
  for (const auto& s : seqs) {
    check(s);
    cols = std::max<int64_t>(cols, s.input_ids.size());
  }
  Batch b = empty_batch(static_cast<int64_t>(seqs.size()), cols, pad_id, true);
  for (size_t r = 0; r < seqs.size(); ++r)
    place(b, static_cast<int64_t>(r), 0, seqs[r].input_ids, &seqs[r].loss_mask);
  return b;
}

std::vector<std::vector<int64_t>> plan_packing(const std::vector<int64_t>& lengths, int64_t max_length) {
  std::vector<std::vector<int64_t>> rows;
  std::vector<int64_t> used;
  for (size_t i = 0; i < lengths.size(); ++i) {
    int64_t n = lengths[i];
    if (n > max_length)
      fail("packing: sequence {} has {} tokens, more than the row length {}", i, n, max_length);
    size_t r = 0;
    while (r < rows.size() && used[r] + n > max_length) ++r;
    if (r == rows.size()) {
      rows.emplace_back();
      used.push_back(0);
    }
    rows[r].push_back(static_cast<int64_t>(i));
    used[r] += n;
  }
  return rows;
}

Batch collate_packed(const std::vector<Sequence>& seqs, const std::vector<std::vector<int64_t>>& rows,
                     int32_t pad_id) {
  if (rows.empty()) fail("collate: empty batch");
  int64_t cols = 0;
  for (const auto& row : rows) {
    int64_t n = 0;
    for (int64_t i : row) {
      check(seqs.at(static_cast<size_t>(i)));
      n += static_cast<int64_t>(seqs[static_cast<size_t>(i)].input_ids.size());
    }
    cols = std::max(cols, n);
  }
  Batch b = empty_batch(static_cast<int64_t>(rows.size()), cols, pad_id, true);
  b.segment_ids = at::zeros({static_cast<int64_t>(rows.size()), cols}, at::kLong);
  b.source_index = at::full({static_cast<int64_t>(rows.size()), cols}, -1, at::kLong);
  int64_t* seg = b.segment_ids.data_ptr<int64_t>();
  int64_t* source = b.source_index.data_ptr<int64_t>();
  for (size_t r = 0; r < rows.size(); ++r) {
    int64_t c = 0;
    for (size_t k = 0; k < rows[r].size(); ++k) {
      const Sequence& s = seqs[static_cast<size_t>(rows[r][k])];
      place(b, static_cast<int64_t>(r), c, s.input_ids, &s.loss_mask);
      int64_t n = static_cast<int64_t>(s.input_ids.size());
      std::fill(seg + r * cols + c, seg + r * cols + c + n, static_cast<int64_t>(k) + 1);
      std::fill(source + r * cols + c, source + r * cols + c + n, rows[r][k]);
      c += n;
    }
  }
  return b;
}

Batch pack_sequences(const std::vector<Sequence>& seqs, int64_t max_length, int32_t pad_id) {
  std::vector<int64_t> lengths;
  for (const auto& s : seqs) lengths.push_back(static_cast<int64_t>(s.input_ids.size()));
  return collate_packed(seqs, plan_packing(lengths, max_length), pad_id);
}

PreferenceBatch collate_preferences(const std::vector<PreferenceExample>& pairs, int32_t pad_id,
                                    int64_t pack_length) {
  std::vector<Sequence> seqs;
  seqs.reserve(pairs.size() * 2);
  for (const auto& p : pairs) seqs.push_back(p.chosen);
  for (const auto& p : pairs) seqs.push_back(p.rejected);
  PreferenceBatch out;
  out.seqs = pack_length > 0 ? pack_sequences(seqs, pack_length, pad_id) : collate_padded(seqs, pad_id);
  std::vector<int64_t> lengths;
  for (const auto& p : pairs) lengths.push_back(p.prompt_length);
  out.prompt_lengths = at::tensor(lengths, at::kLong);
  out.chosen_rewards = optional_column(pairs, &PreferenceExample::chosen_reward);
  out.rejected_rewards = optional_column(pairs, &PreferenceExample::rejected_reward);
  out.margins = optional_column(pairs, &PreferenceExample::margin);
  return out;
}

Batch collate_prompts(const std::vector<PromptExample>& prompts, int32_t pad_id) {
  if (prompts.empty()) fail("collate: empty batch");
  int64_t cols = 0;
  for (const auto& p : prompts) cols = std::max<int64_t>(cols, p.input_ids.size());
  Batch b = empty_batch(static_cast<int64_t>(prompts.size()), cols, pad_id, false);
  for (size_t r = 0; r < prompts.size(); ++r) {
    const auto& ids = prompts[r].input_ids;
    place(b, static_cast<int64_t>(r), cols - static_cast<int64_t>(ids.size()), ids, nullptr);
  }
  return b;
}

AttributeBatch collate_attributes(const std::vector<AttributeExample>& examples, int32_t pad_id) {
  if (examples.empty()) fail("collate: empty batch");
  int64_t cols = 0;
  size_t attributes = examples.front().values.size();
  for (const auto& e : examples) cols = std::max<int64_t>(cols, e.input_ids.size());
  AttributeBatch out;
  out.seqs = empty_batch(static_cast<int64_t>(examples.size()), cols, pad_id, false);
  out.values =
      at::zeros({static_cast<int64_t>(examples.size()), static_cast<int64_t>(attributes)}, at::kFloat);
  out.present = at::zeros_like(out.values);
  float* v = out.values.data_ptr<float>();
  float* p = out.present.data_ptr<float>();
  for (size_t r = 0; r < examples.size(); ++r) {
    const auto& e = examples[r];
    if (e.values.size() != attributes || e.present.size() != attributes) {
      fail("collate: example {} has {} attribute values, the first has {}", r, e.values.size(), attributes);
    }
    place(out.seqs, static_cast<int64_t>(r), 0, e.input_ids, nullptr);
    for (size_t a = 0; a < attributes; ++a) {
      v[r * attributes + a] = e.values[a];
      p[r * attributes + a] = e.present[a] ? 1.0f : 0.0f;
    }
  }
  return out;
}

}  // namespace aligner
