#include "model/tensor_parallel.h"

#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <map>

#include "core/error.h"
#include "core/strings.h"
#include "model/layers.h"
#include "model/lora.h"
#include "model/transformer.h"

namespace aligner {
namespace {

std::optional<TensorParallel>& process_tp() {
  static std::optional<TensorParallel> tp;
  return tp;
}

dist::Dist& group_of(const TensorSplit& s) {
  return *s.tp.group;
}

// Sums a fresh contiguous tensor over the group, in place.
at::Tensor sum_in_place(at::Tensor t, const TensorSplit& s) {
  group_of(s).all_reduce_sum_async(t).wait();
  return t;
}

struct CopyToGroup : torch::autograd::Function<CopyToGroup> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const TensorSplit* s,
                            bool shared) {
    ctx->saved_data["split"] = reinterpret_cast<int64_t>(s);
    ctx->saved_data["shared"] = shared;
    return x;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto* s = reinterpret_cast<const TensorSplit*>(ctx->saved_data["split"].toInt());
    if (!ctx->saved_data["shared"].toBool()) return {sum_in_place(grads[0].contiguous().clone(), *s), {}, {}};
    // Summed over the ranks that hold the same key/value head: each rank's gradient in its head's
    // slot of a buffer, zeros elsewhere.
    auto slots = at::zeros({s->kv_slots, grads[0].numel()}, grads[0].options());
    slots[s->kv_slot].copy_(grads[0].reshape({-1}));
    sum_in_place(slots, *s);
    return {slots[s->kv_slot].view(grads[0].sizes()), {}, {}};
  }
};

struct SumOverGroup : torch::autograd::Function<SumOverGroup> {
  static at::Tensor forward(torch::autograd::AutogradContext*, const at::Tensor& x, const TensorSplit* s) {
    return sum_in_place(x.contiguous().clone(), *s);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext*,
                                                 torch::autograd::variable_list grads) {
    return {grads[0], {}};
  }
};

bool records(const at::Tensor& x) {
  return at::GradMode::is_enabled() && x.requires_grad();
}

// The vocabulary columns of every rank: [..., size x chunk] laid out rank by rank, padded.
at::Tensor gather_padded(const at::Tensor& x, const TensorSplit& s) {
  const int64_t chunk = s.vocab_chunk, n = x.size(-1);
  auto rows = x.reshape({-1, n});
  auto flat = at::zeros({int64_t(s.size()), rows.size(0), chunk}, x.options());
  flat[s.rank()].narrow(1, 0, n).copy_(rows);
  auto buffer = flat.view({-1});
  group_of(s).all_gather_async(buffer).wait();
  return flat;
}

at::Tensor gather_vocab(const at::Tensor& x, const TensorSplit& s) {
  const auto flat = gather_padded(x, s);  // [size, rows, chunk]
  auto sizes = x.sizes().vec();
  sizes.back() = s.full.vocab_size;
  return flat.permute({1, 0, 2}).reshape({flat.size(1), -1}).narrow(1, 0, s.full.vocab_size).reshape(sizes);
}

struct GatherVocab : torch::autograd::Function<GatherVocab> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const TensorSplit* s) {
    ctx->saved_data["split"] = reinterpret_cast<int64_t>(s);
    return gather_vocab(x, *s);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto* s = reinterpret_cast<const TensorSplit*>(ctx->saved_data["split"].toInt());
    return {grads[0].narrow(-1, s->vocab_start, s->vocab_rows), {}};
  }
};

}  // namespace

const TensorParallel* process_tensor_parallel() {
  auto& tp = process_tp();
  return tp && tp->size() > 1 ? &*tp : nullptr;
}

void set_process_tensor_parallel(std::optional<TensorParallel> tp) {
  process_tp() = std::move(tp);
}

std::shared_ptr<const TensorSplit> make_tensor_split(const ModelConfig& full, const TensorParallel& tp) {
  const int64_t n = tp.size();
  if (full.num_heads % n != 0)
    fail("tensor_parallel={} must divide num_attention_heads ({})", n, full.num_heads);
  if (full.intermediate_size % n != 0)
    fail("tensor_parallel={} must divide intermediate_size ({})", n, full.intermediate_size);
  if (full.num_kv_heads % n != 0 && n % full.num_kv_heads != 0)
    fail("tensor_parallel={} and num_key_value_heads ({}) must divide one another", n, full.num_kv_heads);
  if (full.vocab_size < n)
    fail("tensor_parallel={} is more than the vocabulary ({} tokens)", n, full.vocab_size);
  auto s = std::make_shared<TensorSplit>();
  s->tp = tp;
  s->full = full;
  s->vocab_chunk = (full.vocab_size + n - 1) / n;
  // Checked alike on every rank, so that all fail together.
  if ((n - 1) * s->vocab_chunk >= full.vocab_size)
    fail("tensor_parallel={}: the last rank would hold none of the vocabulary's {} rows", n, full.vocab_size);
  s->vocab_start = tp.rank() * s->vocab_chunk;
  s->vocab_rows = std::min(s->vocab_chunk, full.vocab_size - s->vocab_start);
  if (full.num_kv_heads < n) {
    s->kv_slots = full.num_kv_heads;
    s->kv_slot = tp.rank() / (n / full.num_kv_heads);
  }
  return s;
}

ModelConfig local_config(const TensorSplit& s) {
  ModelConfig c = s.full;
  const int64_t n = s.size();
  c.num_heads /= n;
  c.num_kv_heads = s.kv_slots > 0 ? 1 : c.num_kv_heads / n;
  c.intermediate_size /= n;
  return c;
}

SliceSpec tensor_slice(const TensorSplit& s, const std::string& name, int rank) {
  // An adapter (model/lora.h) is split where its projection's weight is: a column-parallel one's B
  // holds the weight's rows, a row-parallel one's A its columns; the other factor is replicated.
  for (const auto& [factor, dim] :
       {std::pair<std::string, int64_t>{".lora_A.weight", 1}, {".lora_B.weight", 0}})
    if (ends_with(name, factor)) {
      const SliceSpec weight = tensor_slice(s, name.substr(0, name.size() - factor.size()) + ".weight", rank);
      return weight.dim == dim ? weight : SliceSpec{};
    }
  const auto& c = s.full;
  const int64_t n = s.size(), D = c.head_dim;
  const auto rows = [&](int64_t dim, int64_t per_rank, int64_t total) {
    return SliceSpec{dim, rank * per_rank, per_rank, total};
  };
  const bool weight = ends_with(name, ".weight"), bias = ends_with(name, ".bias");
  const auto is = [&](const char* proj) { return name.find(proj) != std::string::npos && (weight || bias); };
  if (name == "model.embed_tokens.weight" || name == "lm_head.weight") {
    const int64_t start = std::min<int64_t>(c.vocab_size, rank * s.vocab_chunk);
    return {0, start, std::min(s.vocab_chunk, c.vocab_size - start), c.vocab_size};
  }
  if (is(".self_attn.q_proj.")) return rows(0, c.num_heads / n * D, c.num_heads * D);
  if (is(".self_attn.k_proj.") || is(".self_attn.v_proj.")) {
    if (s.kv_slots == 0) return rows(0, c.num_kv_heads / n * D, c.num_kv_heads * D);
    return {0, rank / (n / c.num_kv_heads) * D, D, c.num_kv_heads * D};
  }
  if (is(".mlp.gate_proj.") || is(".mlp.up_proj."))
    return rows(0, c.intermediate_size / n, c.intermediate_size);
  // Mixtral's experts, each split as a gated MLP: w1 and w3 by rows, w2 by columns; stacked
  // ("...experts.w1", [experts, ...]) one dimension further in than per expert ("...experts.3.w1.weight").
  const size_t experts = name.find(".block_sparse_moe.experts.");
  if (experts != std::string::npos) {
    const bool stacked = !weight;
    const bool down = name.find(".w2") != std::string::npos;
    return rows((down ? 1 : 0) + (stacked ? 1 : 0), c.intermediate_size / n, c.intermediate_size);
  }
  // Row-parallel: the weight's input columns; the bias is added once, after the sum.
  if (weight && name.find(".self_attn.o_proj.") != std::string::npos)
    return rows(1, c.num_heads / n * D, c.num_heads * D);
  if (weight && name.find(".mlp.down_proj.") != std::string::npos)
    return rows(1, c.intermediate_size / n, c.intermediate_size);
  return {};
}

at::Tensor take_slice(const at::Tensor& full, const SliceSpec& spec) {
  if (spec.dim < 0) return full;
  return full.narrow(spec.dim, spec.start, spec.length);
}

std::vector<int64_t> whole_sizes(at::IntArrayRef local, const SliceSpec& spec) {
  auto sizes = local.vec();
  if (spec.dim >= 0) sizes[spec.dim] = spec.full_length;
  return sizes;
}

at::Tensor tp_copy(const at::Tensor& x, const TensorSplit& s) {
  if (!records(x)) return x;
  return CopyToGroup::apply(x, &s, false);
}

at::Tensor tp_copy_shared(const at::Tensor& x, const TensorSplit& s) {
  if (!records(x)) return x;
  return CopyToGroup::apply(x, &s, true);
}

at::Tensor tp_sum(const at::Tensor& x, const TensorSplit& s) {
  if (records(x)) return SumOverGroup::apply(x, &s);
  // Nothing to record: the partial result is summed where it lies when it is a fresh tensor.
  return sum_in_place(x.is_contiguous() ? x : x.contiguous(), s);
}

at::Tensor tp_gather_vocab(const at::Tensor& x, const TensorSplit& s) {
  if (records(x)) return GatherVocab::apply(x, &s);
  return gather_vocab(x, s);
}

namespace {

// The adapter's input: x with its dropout where apply() (model/linear.h) draws it. A row-parallel
// projection's x is this rank's columns of the input: the mask is drawn for the whole input, as one
// rank draws it, and this rank's columns of it taken.
at::Tensor adapter_input(const Linear& l, const at::Tensor& x) {
  const double p = l.lora.dropout;
  if (!adapter_dropout_on(l.lora)) return x;
  if (l.split != Split::kRow) return at::dropout(x, p, true);
  const int64_t n = x.size(-1);
  auto sizes = x.sizes().vec();
  sizes.back() = n * l.tp->size();
  const auto mask = at::dropout(at::ones(sizes, x.options()), p, true);
  return x * mask.narrow(-1, l.tp->rank() * n, n).contiguous();
}

}  // namespace

// With an adapter: column-parallel, the replicated A meets this rank's rows of B, so its gradient is
// this rank's part of the whole one; row-parallel, this rank's columns of A give a partial product
// that the replicated B carries into the partial sum, so B's gradient is partial. Both replicated
// factors go through tp_copy.
at::Tensor tensor_parallel_apply(const Linear& l, const at::Tensor& x) {
  const TensorSplit& s = *l.tp;
  const bool adapted = l.lora.a.defined();
  if (l.split == Split::kColumn) {
    const auto w = l.shared ? tp_copy_shared(l.weight, s) : l.weight;
    const auto b = l.bias.defined() && l.shared ? tp_copy_shared(l.bias, s) : l.bias;
    const auto y = at::linear(x, w, b.defined() ? c10::optional<at::Tensor>(b) : c10::nullopt);
    if (!adapted) return y;
    return add_adapter(y, adapter_input(l, x), tp_copy(l.lora.a, s),
                       l.shared ? tp_copy_shared(l.lora.b, s) : l.lora.b, l.lora.scale);
  }
  auto y = at::linear(x, l.weight);
  if (adapted) y = add_adapter(y, adapter_input(l, x), l.lora.a, tp_copy(l.lora.b, s), l.lora.scale);
  y = tp_sum(y, s);
  return l.bias.defined() ? y + l.bias : y;
}

at::Tensor tensor_parallel_embedding(const TensorSplit& s, const at::Tensor& table, const at::Tensor& ids) {
  const auto local = ids - s.vocab_start;
  const auto here = (local >= 0).logical_and(local < s.vocab_rows);
  const auto rows = at::embedding(table, local.clamp(0, s.vocab_rows - 1));
  return tp_sum(rows * here.unsqueeze(-1).to(rows.scalar_type()), s);
}

at::Tensor tensor_parallel_logprobs(const Transformer& m, const at::Tensor& hidden, const at::Tensor& targets,
                                    int64_t chunk_rows) {
  const TensorSplit& s = *m.tp;
  const auto h = tp_copy(hidden, s);
  std::vector<at::Tensor> out;
  for (int64_t start = 0; start < h.size(0); start += chunk_rows) {
    const int64_t n = std::min(chunk_rows, h.size(0) - start);
    auto logits = apply(m.lm_head, h.narrow(0, start, n));
    logits = at_least_float(logits);
    // The max only steadies the exponentials: no gradient flows through it.
    auto max = std::get<0>(logits.detach().max(-1)).contiguous();
    group_of(s).all_reduce_max_async(max).wait();
    const auto shifted = logits - max.unsqueeze(-1);
    const auto normaliser = tp_sum(shifted.exp().sum(-1), s).log();
    const auto t = targets.narrow(0, start, n) - s.vocab_start;
    const auto here = (t >= 0).logical_and(t < s.vocab_rows);
    const auto picked = shifted.gather(1, t.clamp(0, s.vocab_rows - 1).unsqueeze(1)).squeeze(1);
    const auto target = tp_sum(picked * here.to(picked.scalar_type()), s);
    const auto valid = targets.narrow(0, start, n) >= 0;
    out.push_back((target - normaliser) * valid.to(target.scalar_type()));
  }
  if (out.empty())
    return at::empty({0}, hidden.options().dtype(at::promote_types(hidden.scalar_type(), at::kFloat)));
  return at::cat(out);
}

namespace {

// Rank r's part of a whole tensor, for every rank, and the whole put back together: each distinct
// slice once (ranks sharing a key/value head hold the same one), in order along the split dimension.
at::Tensor gather_one(const TensorSplit& s, const std::string& name, const at::Tensor& local) {
  const SliceSpec mine = tensor_slice(s, name);
  if (mine.dim < 0) return local.detach().cpu();
  const int64_t n = s.size();
  int64_t most = 0;
  for (int r = 0; r < n; ++r) most = std::max(most, tensor_slice(s, name, r).length);
  // Each rank's slice moved to the front and padded to the longest: equal chunks to all-gather.
  auto front = local.detach().to(group_of(s).device()).transpose(0, mine.dim).contiguous();
  auto sizes = front.sizes().vec();
  const int64_t per_row = front.size(0) > 0 ? front.numel() / front.size(0) : 0, chunk = most * per_row;
  auto flat = at::zeros({n * chunk}, front.options());
  flat.narrow(0, s.rank() * chunk, front.numel()).copy_(front.reshape({-1}));
  group_of(s).all_gather_async(flat).wait();
  std::vector<at::Tensor> parts;
  int64_t next = 0;
  for (int r = 0; r < n; ++r) {
    const SliceSpec spec = tensor_slice(s, name, r);
    if (spec.start < next) continue;  // a shared head already taken
    auto part_sizes = sizes;
    part_sizes[0] = spec.length;
    parts.push_back(flat.narrow(0, r * chunk, spec.length * per_row).view(part_sizes));
    next = spec.start + spec.length;
  }
  return at::cat(parts, 0).transpose(0, mine.dim).contiguous().cpu();
}

}  // namespace

std::vector<std::pair<std::string, at::Tensor>> gather_named(
    const TensorSplit& s, const std::vector<std::pair<std::string, at::Tensor>>& local,
    const std::function<std::string(const std::string&)>& name_of) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& [key, t] : local) out.emplace_back(key, gather_one(s, name_of(key), t));
  return out;
}

std::vector<std::pair<std::string, at::Tensor>> slice_named(
    const TensorSplit& s, const std::vector<std::pair<std::string, at::Tensor>>& whole,
    const std::function<std::string(const std::string&)>& name_of) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& [key, t] : whole) {
    const SliceSpec spec = tensor_slice(s, name_of(key));
    if (spec.dim >= 0 && (t.dim() <= spec.dim || t.size(spec.dim) != spec.full_length))
      fail("'{}' has {} rows along dimension {}, the whole model's {} (tensor parallel)", key,
           t.dim() > spec.dim ? t.size(spec.dim) : 0, spec.dim, spec.full_length);
    out.emplace_back(key, take_slice(t, spec).contiguous());
  }
  return out;
}

Transformer gather_transformer(const Transformer& m) {
  if (!m.tp) fail("gather_transformer: the model is not tensor parallel");
  // The model's config as it is now (labels and pad id set after loading), with the whole model's
  // head and column counts.
  ModelConfig cfg = m.cfg;
  cfg.num_heads = m.tp->full.num_heads;
  cfg.num_kv_heads = m.tp->full.num_kv_heads;
  cfg.intermediate_size = m.tp->full.intermediate_size;
  Transformer whole = allocate_transformer(cfg, at::TensorOptions().dtype(m.embed.scalar_type()));
  const auto parts = named_parameters(m);
  auto slots = parameter_slots(whole);
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < parts.size(); ++i) {
    if (slots[i].first != parts[i].first) fail("gather_transformer: parameters out of order");
    const auto t = gather_one(*m.tp, parts[i].first, parts[i].second);
    if (!t.sizes().equals(slots[i].second->sizes()))
      fail("gather_transformer: '{}' gathers to [{}], its config says [{}]", parts[i].first,
           fmt::join(t.sizes(), ", "), fmt::join(slots[i].second->sizes(), ", "));
    slots[i].second->copy_(t);
  }
  // The adapters whole too: the copy saves them, or merges them, as one rank's model does.
  const auto local = layer_linears(m);
  const auto linears = layer_linears(whole);
  for (size_t i = 0; i < local.size(); ++i) {
    const auto& [name, l] = local[i];
    if (!l->lora.a.defined()) continue;
    Lora& lora = linears[i].second->lora;
    lora = l->lora;
    lora.a = gather_one(*m.tp, name + ".lora_A.weight", l->lora.a);
    lora.b = gather_one(*m.tp, name + ".lora_B.weight", l->lora.b);
  }
  return whole;
}

}  // namespace aligner
