#include "gen/engine.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <optional>
#include <unordered_set>

#include "core/error.h"
#include "core/torch_compat.h"
#include "gen/cuda_decoder.h"
#include "gen/sequence_stream.h"
#include "model/layers.h"

namespace aligner {

int64_t context_length(const ModelConfig& cfg) {
  if (cfg.rope.type == "dynamic")
    return std::min(cfg.max_position_embeddings, cfg.rope.original_max_position_embeddings);
  return cfg.max_position_embeddings;
}

namespace {

at::Tensor long_tensor(const std::vector<int64_t>& values, at::Device device) {
  return at::tensor(values, at::TensorOptions().dtype(at::kLong)).to(device);
}

// cos/sin [B, 1, T, head_dim] for positions [B, T] (or [1, T]), computed as rope_cos_sin computes
// them, from the cache's frequencies: positions stay on the device.
std::pair<at::Tensor, at::Tensor> cos_sin(const at::Tensor& inv_freq, const at::Tensor& positions,
                                          at::ScalarType dtype) {
  auto freqs = positions.to(at::kFloat).unsqueeze(-1) * inv_freq;
  auto emb = at::cat({freqs, freqs}, -1).unsqueeze(1);
  return {emb.cos().to(dtype), emb.sin().to(dtype)};
}

Qkv project(const ModelConfig& c, const Block& b, const at::Tensor& x, const at::Tensor& cos,
            const at::Tensor& sin) {
  const int64_t D = c.head_dim;
  const auto h = norm(c, x, b.input_norm, b.input_norm_bias);
  at::Tensor q, k, v;
  if (const auto qkv = joined_linear({&b.q, &b.k, &b.v})) {
    const auto y = apply(*qkv, h);
    const int64_t nq = c.num_heads * D, nkv = c.num_kv_heads * D;
    q = y.narrow(-1, 0, nq), k = y.narrow(-1, nq, nkv), v = y.narrow(-1, nq + nkv, nkv);
  } else {
    q = apply(b.q, h), k = apply(b.k, h), v = apply(b.v, h);
  }
  return attention_heads(c, b, q, k, v, cos, sin);
}

// The rest of the block after attention: output projection, residual, feed-forward.
at::Tensor finish_block(const ModelConfig& c, const Block& b, const at::Tensor& x, const at::Tensor& attn) {
  const auto [h, n] = add_norm(c, x, apply(b.o, attn), b.post_attention_norm, b.post_attention_norm_bias);
  if (const auto gate_up =
          c.gated_mlp && c.num_experts == 0 ? joined_linear({&b.gate, &b.up}) : c10::nullopt) {
    const auto y = apply(*gate_up, n);
    const int64_t I = b.gate.weight.size(0);
    return h + apply(b.down, swiglu(y.narrow(-1, 0, I), y.narrow(-1, I, I)));
  }
  return h + mlp(c, b, n);
}

double attention_scale(const ModelConfig& c) {
  return 1.0 / std::sqrt(double(c.head_dim));
}

}  // namespace

at::Tensor prefill(const Transformer& m, KvCache& cache, const std::vector<std::vector<int32_t>>& prompts,
                   const std::vector<std::vector<int64_t>>& slots) {
  const ModelConfig& c = m.cfg;
  const int64_t n = int64_t(prompts.size());
  if (n == 0 || slots.size() != prompts.size()) fail("prefill: need one list of slots per prompt");
  int64_t T = 0;
  for (const auto& p : prompts) T = std::max<int64_t>(T, int64_t(p.size()));
  if (T > kv_max_tokens(cache))
    fail("prefill: a prompt of {} tokens does not fit the KV cache ({})", T, kv_max_tokens(cache));

  // Right padding: every real token sees only real tokens before it, so plain causal attention is
  // exact and the padded positions' outputs are simply not read. Everything the device needs goes
  // in one copy (each host-to-device copy waits for the device): the ids [n, T], then per slot its
  // index and its prompt's row and length, then each prompt's last position.
  int64_t k = 0;
  for (const auto& s : slots) k += int64_t(s.size());
  std::vector<int64_t> host(n * T + 3 * k + n, 0);
  int64_t* slot_list = host.data() + n * T;
  int64_t *row_of_slot = slot_list + k, *length_of_slot = row_of_slot + k, *last_rows = length_of_slot + k;
  for (int64_t i = 0, j = 0; i < n; ++i) {
    const auto& p = prompts[i];
    if (p.empty()) fail("prefill: prompt {} is empty", i);
    std::copy(p.begin(), p.end(), host.begin() + i * T);
    last_rows[i] = i * T + int64_t(p.size()) - 1;
    for (int64_t s : slots[i]) {
      if (s < 0 || s >= kv_slots(cache))
        fail("prefill: slot {} is outside the KV cache ({} slots)", s, kv_slots(cache));
      slot_list[j] = s;
      row_of_slot[j] = i;
      length_of_slot[j++] = int64_t(p.size());
    }
  }
  const auto device = m.embed.device();
  const auto all = long_tensor(host, device);
  const auto ids = all.narrow(0, 0, n * T).view({n, T});
  const auto slot_index = all.narrow(0, n * T, k), rows = all.narrow(0, n * T + k, k);
  const auto lengths = all.narrow(0, n * T + 2 * k, k), last = all.narrow(0, n * T + 3 * k, n);

  auto x = embed_tokens(m, ids);
  const auto positions = at::arange(T, at::TensorOptions().dtype(at::kLong).device(device)).unsqueeze(0);
  const auto [cos, sin] = cos_sin(cache.inv_freq, positions, x.scalar_type());
  // As forward_hidden's attention_mask for unpadded rows: causal, plus the window where it bites.
  std::map<int64_t, std::optional<at::Tensor>> masks;
  for (int64_t w : c.window) {
    if (masks.count(w)) continue;
    if (w > 0 && w < T) {
      auto q = positions.view({T, 1}), k = positions.view({1, T});
      masks[w] = (k <= q).logical_and(q - k < w).view({1, 1, T, T});
    } else {
      masks[w] = std::nullopt;
    }
  }
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const Block& b = m.layers[l];
    const auto qkv = project(c, b, x, cos, sin);
    store_prompt(cache, l, slot_index, qkv.k.index_select(0, rows), qkv.v.index_select(0, rows));
    const auto& mask = masks[c.window[l]];
    auto out = compat::sdpa(qkv.q, qkv.k, qkv.v, mask, /*is_causal=*/!mask, attention_scale(c));
    x = finish_block(c, b, x, out.transpose(1, 2).reshape({n, T, c.num_heads * c.head_dim}));
  }
  // Only each prompt's last position predicts anything.
  const auto h = x.reshape({n * T, c.hidden_size}).index_select(0, last);
  const auto logits = lm_logits(m, norm(c, h, m.norm, m.norm_bias));
  cache.lengths.index_copy_(0, slot_index, lengths);
  return logits.index_select(0, rows);
}

at::Tensor decode_step(const Transformer& m, KvCache& cache, const at::Tensor& tokens, int64_t span) {
  const ModelConfig& c = m.cfg;
  const int64_t n = tokens.numel();
  if (tokens.dim() != 1 || n < 1 || n > kv_slots(cache))
    fail("decode_step: tokens must be [n] with 1 <= n <= {} slots", kv_slots(cache));
  if (span < 1 || span > kv_max_tokens(cache))
    fail("decode_step: span {} is outside the KV cache's 1..{} positions", span, kv_max_tokens(cache));
  const auto positions = cache.lengths.narrow(0, 0, n).view({n, 1});
  auto x = embed_tokens(m, tokens.view({n, 1}));
  const auto [cos, sin] = cos_sin(cache.inv_freq, positions, x.scalar_type());
  // The new token at position p sees cached positions j <= p (its own key is stored first), and
  // within a window w only p - j < w, as in training.
  const auto keys = at::arange(span, positions.options()).view({1, span});
  std::map<int64_t, at::Tensor> masks;
  for (int64_t w : c.window) {
    if (masks.count(w)) continue;
    auto allowed = keys <= positions;
    if (w > 0) allowed = allowed.logical_and(positions - keys < w);
    masks[w] = allowed.view({n, 1, 1, span});
  }
  const int64_t groups = c.num_heads / c.num_kv_heads;
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const Block& b = m.layers[l];
    const auto qkv = project(c, b, x, cos, sin);
    store_step(cache, l, qkv.k, qkv.v);
    const auto [k, v] = cached_kv(cache, l, n, span);
    // Grouped-query attention without repeat_kv: the query heads sharing a key/value head become
    // that head's query rows (head h = kv_head * groups + g, as repeat_kv pairs them), so each
    // cached head is read once.
    auto q = qkv.q.reshape({n, c.num_kv_heads, groups, c.head_dim});
    auto out = compat::sdpa(q, k, v, masks[c.window[l]], /*is_causal=*/false, attention_scale(c));
    x = finish_block(c, b, x, out.reshape({n, 1, c.num_heads * c.head_dim}));
  }
  cache.lengths.narrow(0, 0, n).add_(1).clamp_max_(kv_max_tokens(cache) - 1);
  return lm_logits(m, norm(c, x, m.norm, m.norm_bias)).view({n, -1});
}

std::string finish_reason_name(FinishReason r) {
  return r == FinishReason::kStop ? "stop" : "length";
}

ResponseText response_text(const GeneratedSequence& s, const Tokenizer& tok,
                           const std::vector<std::string>& stop_strings, bool include_stop) {
  ResponseText r{tok.decode(s.tokens, /*skip_special=*/true), s.tokens.size()};
  if (s.finish != FinishReason::kStop) return r;
  // The occurrence that ends first is the one that stopped generation; of those ending together,
  // the longest.
  size_t start = std::string::npos, end = std::string::npos;
  for (const auto& stop : stop_strings) {
    const size_t at = r.text.find(stop);
    if (at == std::string::npos) continue;
    if (end == std::string::npos || at + stop.size() < end || (at + stop.size() == end && at < start))
      start = at, end = at + stop.size();
  }
  if (start == std::string::npos) return r;  // ended by an EOS or stop id
  const size_t cut = include_stop ? end : start;
  while (r.tokens > 0 &&
         tok.decode({s.tokens.begin(), s.tokens.begin() + int64_t(r.tokens) - 1}, true).size() >= cut)
    --r.tokens;
  r.text.resize(cut);
  return r;
}

void report_generation(JobProgress& progress, int64_t finished, int64_t total, int64_t tokens, bool always) {
  progress.update(finished, always, [&](double s, double eta) {
    return fmt::format(
        "generated {}/{} completions, {} tokens, {} tok/s, ETA {}", finished, total, format_thousands(tokens),
        format_thousands(std::llround(double(tokens) / std::max(s, 1e-9))), format_duration(eta));
  });
}

void check_generation_options(const GenerationOptions& o) {
  if (o.max_new_tokens < 1) fail("generation: max_new_tokens must be at least 1, got {}", o.max_new_tokens);
  if (o.num_samples < 1) fail("generation: num_samples must be at least 1, got {}", o.num_samples);
  if (o.batch_size < 0) fail("generation: batch_size must be 0 (all) or positive, got {}", o.batch_size);
  if (o.prefill_tokens < 1) fail("generation: prefill_tokens must be positive, got {}", o.prefill_tokens);
  check_sampling_params(o.sampling);
  for (const auto& s : o.stop_strings)
    if (s.empty()) fail("generation: a stop string is empty");
  if (!o.stop_strings.empty() && !o.tokenizer) fail("generation: stop strings need a tokenizer");
}

namespace {

void check_prompts(const ModelConfig& c, const std::vector<std::vector<int32_t>>& prompts) {
  const int64_t context = context_length(c);
  for (size_t i = 0; i < prompts.size(); ++i) {
    const auto& p = prompts[i];
    if (p.empty()) fail("prompt {} is empty", i);
    if (int64_t(p.size()) >= context)
      fail("prompt {} has {} tokens, which leaves no room to generate in the model's context of {} tokens", i,
           p.size(), context);
    for (int32_t id : p)
      if (id < 0 || id >= c.vocab_size)
        fail("prompt {}: token id {} is outside the model's vocabulary [0, {})", i, id, c.vocab_size);
  }
}

}  // namespace

struct DecodeSession {
  const Transformer* model = nullptr;
  SamplingParams sampling;
  std::unique_ptr<KvCache> cache;
  std::unique_ptr<CudaDecoder> fast;  // declared after the cache it refers to: destroyed first
};

std::shared_ptr<DecodeSession> make_decode_session() {
  return std::make_shared<DecodeSession>();
}

GenerationResult generate(const Transformer& m, const std::vector<std::vector<int32_t>>& prompts,
                          const GenerationOptions& opt) {
  check_generation_options(opt);
  check_prompts(m.cfg, prompts);
  GenerationResult r;
  if (prompts.empty()) return r;
  at::NoGradGuard no_grad;
  const int64_t context = context_length(m.cfg);
  const int64_t total = int64_t(prompts.size()) * opt.num_samples;
  int64_t longest = 0;
  for (const auto& p : prompts) longest = std::max<int64_t>(longest, int64_t(p.size()));
  const int64_t slots = opt.batch_size > 0 ? std::min(opt.batch_size, total) : total;
  const auto device = m.embed.device();
  const int64_t max_tokens = std::min(context, longest + opt.max_new_tokens);
  // On CUDA the decoding step is a replayed graph with fused attention and sampling kernels; the
  // ATen step below is the reference it is tested against and the path everywhere else.
  const bool use_fast = opt.cuda_kernels && cuda_decoding_supported(m);
  DecodeSession local;
  DecodeSession& session = opt.session ? *opt.session : local;
  const SamplingParams &now = opt.sampling, &was = session.sampling;
  const bool same = session.cache && session.model == &m && kv_slots(*session.cache) == slots &&
                    kv_max_tokens(*session.cache) == max_tokens && bool(session.fast) == use_fast &&
                    now.greedy == was.greedy && now.temperature == was.temperature &&
                    now.top_k == was.top_k && now.top_p == was.top_p;
  if (same) {
    session.cache->lengths.zero_();
  } else {
    session.fast.reset();  // it refers to the cache
    session.cache = std::make_unique<KvCache>(allocate_kv_cache(m.cfg, slots, max_tokens, m.embed.options()));
    if (use_fast) session.fast = std::make_unique<CudaDecoder>(m, *session.cache, opt.sampling);
    session.model = &m;
    session.sampling = opt.sampling;
  }
  KvCache& cache = *session.cache;
  CudaDecoder* fast = session.fast.get();
  auto gen = make_generator(device, opt.seed);

  std::unordered_set<int64_t> stop_ids(opt.stop_ids.begin(), opt.stop_ids.end());
  if (opt.stop_at_eos) {
    stop_ids.insert(m.cfg.eos_token_ids.begin(), m.cfg.eos_token_ids.end());
    if (opt.tokenizer && opt.tokenizer->special().eos) stop_ids.insert(*opt.tokenizer->special().eos);
  }
  size_t longest_stop = 0;
  for (const auto& s : opt.stop_strings) longest_stop = std::max(longest_stop, s.size());
  // A stop string of L bytes ends within the last L tokens, as every token decodes to at least a
  // byte; one more covers the first token losing its leading space when decoded alone.
  auto hits_stop_string = [&](const std::vector<int32_t>& tokens) {
    if (opt.stop_strings.empty()) return false;
    const size_t n = std::min(tokens.size(), longest_stop + 1);
    const std::string tail = opt.tokenizer->decode({tokens.end() - n, tokens.end()}, false);
    for (const auto& s : opt.stop_strings)
      if (tail.find(s) != std::string::npos) return true;
    return false;
  };

  r.sequences.resize(total);
  for (int64_t i = 0; i < total; ++i) {
    r.sequences[i].prompt_index = i / opt.num_samples;
    r.sequences[i].sample_index = i % opt.num_samples;
  }
  std::vector<int64_t> slot_seq(slots, -1);  // the sequence each slot holds, -1 for none
  std::vector<int64_t> slot_len(slots, 0);   // its prompt + generated tokens
  auto last_tokens =
      fast ? fast->tokens : at::zeros({slots}, at::TensorOptions().dtype(at::kLong).device(device));
  // Where a step's tokens and log-probs land on the host; pinned, so that reading them back is a
  // plain asynchronous copy.
  const bool pin = device.is_cuda();
  auto host_tokens = at::empty({slots}, at::TensorOptions().dtype(at::kLong).pinned_memory(pin));
  auto host_logprobs = at::empty({slots}, at::TensorOptions().dtype(at::kFloat).pinned_memory(pin));
  int64_t next_seq = 0, finished = 0;

  // Appends a sampled token to the sequence in `slot`, and frees the slot when the sequence ends.
  auto take = [&](int64_t slot, int64_t token, double logprob) {
    auto& seq = r.sequences[slot_seq[slot]];
    seq.tokens.push_back(int32_t(token));
    seq.logprobs.push_back(float(logprob));
    ++r.generated_tokens;
    ++slot_len[slot];
    if (stop_ids.count(token) || hits_stop_string(seq.tokens))
      seq.finish = FinishReason::kStop;
    else if (int64_t(seq.tokens.size()) >= opt.max_new_tokens || slot_len[slot] >= context)
      seq.finish = FinishReason::kLength;
    else
      return;
    slot_seq[slot] = -1;
    ++finished;
  };
  // Reads the tokens and log-probs chosen for rows [0, rows) back and takes them: the one host
  // synchronisation of a step, which stop checks need anyway.
  auto read_back = [&](const at::Tensor& next, const at::Tensor& logprob,
                       const std::vector<int64_t>& slot_of_row) {
    const int64_t rows = int64_t(slot_of_row.size());
    auto t = host_tokens.narrow(0, 0, rows), lp = host_logprobs.narrow(0, 0, rows);
    t.copy_(next, /*non_blocking=*/true);
    lp.copy_(logprob);  // waits for the device, and so for both copies
    const int64_t* tp = t.data_ptr<int64_t>();
    const float* lpp = lp.data_ptr<float>();
    for (int64_t i = 0; i < rows; ++i)
      if (slot_seq[slot_of_row[i]] >= 0) take(slot_of_row[i], tp[i], lpp[i]);
  };
  // Samples from logits [rows, vocab] for the given slots.
  auto sample = [&](const at::Tensor& logits, const at::Tensor& slot_index,
                    const std::vector<int64_t>& slot_of_row) {
    if (fast) {
      fast->sample(logits, slot_index);
      read_back(last_tokens.index_select(0, slot_index), fast->logprobs.narrow(0, 0, logits.size(0)),
                slot_of_row);
      return;
    }
    // Sampling from the log-probs gives the distribution it gives from the logits (the filters
    // do not see a shift) and saves a second softmax; greedy takes the argmax of the logits
    // themselves, as transformers does, so that rounding in the softmax cannot break a near-tie.
    const auto logp = at::log_softmax(logits.to(at::kFloat), -1);
    auto next = sample_tokens(is_greedy(opt.sampling) ? logits : logp, opt.sampling, gen);
    last_tokens.index_copy_(0, slot_index, next);
    read_back(next, logp.gather(1, next.unsqueeze(1)).squeeze(1), slot_of_row);
  };

  // Puts waiting sequences into free slots: prompts sorted by length into prefill batches of at
  // most prefill_tokens padded tokens, each prompt computed once for all its samples.
  auto fill = [&] {
    std::map<int64_t, std::vector<int64_t>> prompt_slots;
    for (int64_t s = 0; s < slots && next_seq < total; ++s) {
      if (slot_seq[s] >= 0) continue;
      slot_seq[s] = next_seq;
      slot_len[s] = int64_t(prompts[next_seq / opt.num_samples].size());
      prompt_slots[next_seq / opt.num_samples].push_back(s);
      ++next_seq;
    }
    std::vector<std::pair<int64_t, int64_t>> order;  // (length, prompt)
    for (const auto& [p, s] : prompt_slots) order.emplace_back(int64_t(prompts[p].size()), p);
    std::sort(order.begin(), order.end());
    for (size_t start = 0; start < order.size();) {
      size_t end = start + 1;
      while (end < order.size() && int64_t(end - start + 1) * order[end].first <= opt.prefill_tokens) ++end;
      std::vector<std::vector<int32_t>> batch;
      std::vector<std::vector<int64_t>> batch_slots;
      std::vector<int64_t> slot_of_row;
      for (size_t i = start; i < end; ++i) {
        batch.push_back(prompts[order[i].second]);
        batch_slots.push_back(prompt_slots[order[i].second]);
        slot_of_row.insert(slot_of_row.end(), batch_slots.back().begin(), batch_slots.back().end());
      }
      const auto slot_index = long_tensor(slot_of_row, device);
      if (fast) {
        std::vector<int64_t> streams;
        for (int64_t s : slot_of_row) streams.push_back(int64_t(sequence_stream(opt.seed, slot_seq[s])));
        fast->set_streams(slot_index, long_tensor(streams, device));
      }
      sample(prefill(m, cache, batch, batch_slots), slot_index, slot_of_row);
      start = end;
    }
  };

  // On CUDA a step is launched before the previous one's tokens are taken, so that the device never
  // waits for the host. A sequence that the earlier step ends gets one more token, never read:
  // a step's results go only to the sequences its slots held when it was launched.
  struct Launched {
    int64_t n, ticket;
    std::vector<int64_t> seqs;
  };
  std::optional<Launched> in_flight;
  auto take_step = [&](const Launched& l) {
    fast->wait(l.ticket);
    const int64_t* tp = fast->host_tokens(l.ticket);
    const float* lp = fast->host_logprobs(l.ticket);
    for (int64_t s = 0; s < l.n; ++s)
      if (slot_seq[s] >= 0 && slot_seq[s] == l.seqs[s]) take(s, tp[s], lp[s]);
    if (opt.on_step) opt.on_step(finished, r.generated_tokens);
  };
  while (finished < total) {
    fill();
    // Decode slots [0, n): the live slots are below n; free ones among them compute unread output.
    int64_t n = 0, span = 0;
    for (int64_t s = 0; s < slots; ++s) {
      if (slot_seq[s] < 0) continue;
      n = s + 1;
      span = std::max(span, slot_len[s]);  // the pending token sits at position slot_len - 1
    }
    if (fast) {
      Launched next{n, n > 0 ? fast->step(n) : -1, {slot_seq.begin(), slot_seq.begin() + n}};
      if (in_flight) take_step(*in_flight);
      in_flight.reset();
      if (n > 0) in_flight = std::move(next);
      continue;
    }
    if (n > 0) {
      std::vector<int64_t> rows(n);
      std::iota(rows.begin(), rows.end(), 0);
      sample(decode_step(m, cache, last_tokens.narrow(0, 0, n), span), at::arange(n, last_tokens.options()),
             rows);
    }
    if (opt.on_step) opt.on_step(finished, r.generated_tokens);
  }
  if (in_flight) fast->wait(in_flight->ticket);  // a step past every sequence's end
  return r;
}

GenerationBatch collate_generations(const std::vector<std::vector<int32_t>>& prompts,
                                    const GenerationResult& result, int32_t pad_id, at::Device device) {
  const int64_t N = int64_t(result.sequences.size());
  int64_t T = 1;
  for (const auto& s : result.sequences) {
    if (s.prompt_index < 0 || s.prompt_index >= int64_t(prompts.size()))
      fail("collate_generations: sequence of prompt {} but {} prompts given", s.prompt_index, prompts.size());
    T = std::max<int64_t>(T, int64_t(prompts[s.prompt_index].size() + s.tokens.size()));
  }
  const auto i64 = at::TensorOptions().dtype(at::kLong), f32 = at::TensorOptions().dtype(at::kFloat);
  GenerationBatch b;
  b.input_ids = at::full({N, T}, pad_id, i64);
  b.attention_mask = at::zeros({N, T}, i64);
  b.position_ids = at::zeros({N, T}, i64);
  b.labels = at::full({N, T}, -100, i64);
  b.response_mask = at::zeros({N, T}, f32);
  b.logprobs = at::zeros({N, T}, f32);
  auto ids = b.input_ids.accessor<int64_t, 2>(), mask = b.attention_mask.accessor<int64_t, 2>();
  auto pos = b.position_ids.accessor<int64_t, 2>(), labels = b.labels.accessor<int64_t, 2>();
  auto resp = b.response_mask.accessor<float, 2>(), lp = b.logprobs.accessor<float, 2>();
  for (int64_t i = 0; i < N; ++i) {
    const auto& s = result.sequences[i];
    const auto& p = prompts[s.prompt_index];
    const int64_t P = int64_t(p.size()), G = int64_t(s.tokens.size());
    for (int64_t t = 0; t < P + G; ++t) {
      ids[i][t] = t < P ? p[t] : s.tokens[t - P];
      mask[i][t] = 1;
      pos[i][t] = t;
    }
    // Response token j is predicted at position P - 1 + j.
    for (int64_t j = 0; j < G; ++j) {
      labels[i][P - 1 + j] = s.tokens[j];
      resp[i][P - 1 + j] = 1;
      lp[i][P - 1 + j] = s.logprobs[j];
    }
  }
  for (auto* t : {&b.input_ids, &b.attention_mask, &b.position_ids, &b.labels, &b.response_mask, &b.logprobs})
    *t = t->to(device);
  return b;
}

}  // namespace aligner
