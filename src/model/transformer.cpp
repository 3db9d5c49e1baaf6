#include "model/transformer.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cmath>

#include "core/error.h"
#include "core/torch_compat.h"
#include "model/layers.h"

namespace aligner {

// Inverse frequencies of the rotary embedding, with the scaling rules of transformers'
// rope_init_functions. max_position is the longest position in this batch (dynamic scaling).
at::Tensor rope_inv_freq(const ModelConfig& c, int64_t max_position, at::Device device) {
  const auto& r = c.rope;
  const int64_t dim = c.rotary_dim;
  double base = r.theta;
  if (r.type == "dynamic") {
    const double orig = (double)r.original_max_position_embeddings;
    const double seq = std::max<double>(max_position, orig);
    base *= std::pow(r.factor * seq / orig - (r.factor - 1), (double)dim / (dim - 2));
  }
  auto exponent = at::arange(0, dim, 2, at::TensorOptions().dtype(at::kLong)).to(at::kFloat) / (double)dim;
  auto inv_freq = 1.0 / at::pow(base, exponent);
  if (r.type == "linear") inv_freq = inv_freq / r.factor;
  if (r.type == "llama3") {
    const double old_len = (double)r.original_max_position_embeddings;
    const double low_wavelen = old_len / r.low_freq_factor;
    const double high_wavelen = old_len / r.high_freq_factor;
    auto wavelen = 2 * M_PI / inv_freq;
    auto scaled = at::where(wavelen > low_wavelen, inv_freq / r.factor, inv_freq);
    auto smooth = (old_len / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor);
    auto smoothed = (1 - smooth) * scaled / r.factor + smooth * scaled;
    auto medium = (wavelen >= high_wavelen).logical_and(wavelen <= low_wavelen);
    inv_freq = at::where(medium, smoothed, scaled);
  }
  return inv_freq.to(device);
}

// cos and sin of shape [B, 1, T, head_dim] in the activations' dtype (transformers casts them
// before use, so we do too).
std::pair<at::Tensor, at::Tensor> rope_cos_sin(const ModelConfig& c, const at::Tensor& positions,
                                               at::ScalarType dtype) {
  // Only dynamic scaling reads the longest position; reading it waits for the GPU.
  const int64_t max_position =
      c.rope.type == "dynamic" && positions.numel() ? positions.max().item<int64_t>() + 1 : 0;
  auto inv_freq = rope_inv_freq(c, max_position, positions.device());
  auto freqs = positions.to(at::kFloat).unsqueeze(-1) * inv_freq;  // [B, T, dim/2]
  auto emb = at::cat({freqs, freqs}, -1).unsqueeze(1);
  return {emb.cos().to(dtype), emb.sin().to(dtype)};
}

namespace {
at::Tensor rotate_half(const at::Tensor& x) {
  const int64_t h = x.size(-1) / 2;
  return at::cat({-x.narrow(-1, h, h), x.narrow(-1, 0, h)}, -1);
}

}  // namespace

at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t r = cos.size(-1);
  if (r == x.size(-1)) return x * cos + rotate_half(x) * sin;
  const auto rot = x.narrow(-1, 0, r);
  return at::cat({rot * cos + rotate_half(rot) * sin, x.narrow(-1, r, x.size(-1) - r)}, -1);
}

at::Tensor norm(const ModelConfig& c, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  if (!c.layernorm1p) return compat::rms_norm(x, weight, c.rms_norm_eps);
  return at::layer_norm(x, {x.size(-1)}, weight + 1, bias, c.rms_norm_eps);
}

at::Tensor head_norm(const ModelConfig& c, const at::Tensor& x, int64_t heads, const at::Tensor& weight) {
  auto sizes = x.sizes().vec();
  sizes.back() = heads;
  sizes.push_back(c.head_dim);
  return compat::rms_norm(x.view(sizes), weight, c.rms_norm_eps);
}

Qkv attention_heads(const ModelConfig& c, const Block& b, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t B = q.size(0), T = q.size(1), D = c.head_dim;
  auto qh = q.view({B, T, c.num_heads, D}), kh = k.view({B, T, c.num_kv_heads, D});
  if (c.qk_norm) {
    // Tensor parallel: each rank's heads add to the replicated norms' gradients.
    const auto replicated = [&](const at::Tensor& w) { return b.q.tp ? tp_copy(w, *b.q.tp) : w; };
    qh = head_norm(c, q, c.num_heads, replicated(b.q_norm));
    kh = head_norm(c, k, c.num_kv_heads, replicated(b.k_norm));
  }
  return {rotate_heads(qh, cos, sin), rotate_heads(kh, cos, sin),
          v.view({B, T, c.num_kv_heads, D}).transpose(1, 2)};
}

at::Tensor split_input(const Linear& l, const at::Tensor& x) {
  return l.split == Split::kColumn ? tp_copy(x, *l.tp) : x;
}

namespace {

// Which keys each query may see. Packed rows on a GPU with varlen flash attention: the runs of equal
// segment id (padding, segment 0, is a run of its own whose outputs are never read) as offsets into
// the flattened tokens. Otherwise a [B, 1, T, T] boolean mask, or none when plain causal attention is
// exact (no padding, no packing, window not reached), which lets torch use flash attention.
struct AttentionLayout {
  std::optional<at::Tensor> mask;
  at::Tensor cu_seqlens;  // int32 [runs + 1]; defined: varlen attention
  int64_t max_len = 0;
};

AttentionLayout attention_layout(const ForwardInput& in, int64_t window, int64_t T, int64_t head_dim,
                                 const at::Tensor& x) {
  const bool packed = in.segment_ids.defined();
  const bool windowed = window > 0 && window < T;
  if (packed && !windowed && compat::has_varlen_attention(x, head_dim)) {
    // Computed where the ids are: from host memory, nonzero's count and the longest run need no
    // read back from the GPU.
    const auto seg = in.segment_ids.reshape({-1});
    auto starts = at::ones_like(seg, seg.options().dtype(at::kBool));
    starts.narrow(0, 1, seg.size(0) - 1)
        .copy_(seg.narrow(0, 1, seg.size(0) - 1) != seg.narrow(0, 0, seg.size(0) - 1));
    starts.view({-1, T}).select(1, 0).fill_(true);
    const auto ends = at::full({1}, seg.size(0), seg.options());
    AttentionLayout l;
    const auto offsets = at::cat({starts.nonzero().reshape({-1}), ends}).to(at::kInt);
    l.max_len = (offsets.narrow(0, 1, offsets.size(0) - 1) - offsets.narrow(0, 0, offsets.size(0) - 1))
                    .max()
                    .item<int64_t>();
    l.cu_seqlens = offsets.to(x.device());
    return l;
  }
  const bool padded = in.attention_mask.defined() && !in.attention_mask.all().item<bool>();
  if (!padded && !packed && !windowed) return {};
  auto dev = in.input_ids.device();
  auto idx = at::arange(T, at::TensorOptions().dtype(at::kLong).device(dev));
  auto q = idx.unsqueeze(1), k = idx.unsqueeze(0);
  auto allowed = (k <= q);
  if (windowed) allowed = allowed.logical_and(q - k < window);
  allowed = allowed.unsqueeze(0);  // [1, T, T]
  if (padded) allowed = allowed.logical_and(in.attention_mask.to(at::kBool).unsqueeze(1));
  if (packed) {
    const auto seg = in.segment_ids.to(dev);
    allowed = allowed.logical_and(seg.unsqueeze(2) == seg.unsqueeze(1));
  }
  // A padding query that may see nothing would give NaN; letting it see itself keeps every row
  // finite, and padding outputs are never read.
  allowed = allowed.logical_or(at::eye(T, at::TensorOptions().dtype(at::kBool).device(dev)).unsqueeze(0));
  return {allowed.unsqueeze(1)};
}

// The q, k and v projections of h. On a GPU one GEMM over their weights joined (a copy of them, 10 MB
// a layer of a 1.1B model), which is faster than three, the key and value ones being narrow, and
// whose backward pass has no three input gradients to sum: 2.9 ms of a 1.1B model's step on an H200.
Qkv project_qkv(const Block& b, const at::Tensor& h) {
  bool joinable = h.is_cuda();
  for (const Linear* l : {&b.q, &b.k, &b.v})
    joinable = joinable && l->split == Split::kNone && !l->lora.a.defined() &&
               l->bias.defined() == b.q.bias.defined() && l->weight.scalar_type() == b.q.weight.scalar_type();
  if (!joinable) return {apply(b.q, h), apply(b.k, h), apply(b.v, h)};
  const auto bias =
      b.q.bias.defined() ? c10::optional<at::Tensor>(at::cat({b.q.bias, b.k.bias, b.v.bias})) : c10::nullopt;
  const auto y = at::linear(h, at::cat({b.q.weight, b.k.weight, b.v.weight}), bias);
  const auto parts = y.split_with_sizes({b.q.weight.size(0), b.k.weight.size(0), b.v.weight.size(0)}, -1);
  // v copied out: attention keeps it for the backward pass, and as a view it would keep all of y
  // (q and k, which the rotary embedding replaces) alive with it: 1.8 GB of a 1.1B model's step.
  return {parts[0], parts[1], parts[2].contiguous()};
}

at::Tensor attention(const ModelConfig& c, const Block& b, const at::Tensor& x, const at::Tensor& cos,
                     const at::Tensor& sin, const AttentionLayout& layout) {
  const int64_t B = x.size(0), T = x.size(1), D = c.head_dim;
  const auto p = project_qkv(b, split_input(b.q, x));
  const auto [q, k, v] = attention_heads(c, b, p.q, p.k, p.v, cos, sin);
  const double scale = 1.0 / std::sqrt((double)D);
  if (layout.cu_seqlens.defined()) {
    const auto tokens = [&](const at::Tensor& t) { return t.transpose(1, 2).reshape({B * T, t.size(1), D}); };
    auto out =
        compat::varlen_attention(tokens(q), tokens(k), tokens(v), layout.cu_seqlens, layout.max_len, scale);
    return apply(b.o, out.view({B, T, c.num_heads * D}));
  }
  auto out = compat::sdpa(q, k, v, layout.mask, /*is_causal=*/!layout.mask, scale);
  return apply(b.o, out.transpose(1, 2).reshape({B, T, c.num_heads * D}));
}

}  // namespace

RouterAuxLoss& router_aux_loss() {
  static thread_local RouterAuxLoss r;
  return r;
}

namespace {

// What the load-balancing loss needs from one training forward, over its layers: token choices
// and summed router probabilities per expert, over real tokens (`mask`, or all).
struct RouterStats : torch::CustomClassHolder {
  at::Tensor choices, probs;  // [experts] float32; probs detached
  at::Tensor mask;            // [tokens] float32, or undefined
  double tokens = 0;          // real tokens per layer
  int64_t layers = 0;
  bool complete = false;  // every layer counted: a recomputed (checkpointed) layer adds nothing
  double weight = 0;

  double value(int64_t experts) const {  // E x sum_e F_e P_e
    const double n = double(layers) * tokens;
    return double(experts) * (choices / n * (probs / n)).sum().item<double>();
  }
};

// The identity on a MoE layer's output, whose backward gives the layer's summed router
// probabilities the gradient of weight x the load-balancing loss: weight x E x F / (layers x
// tokens), F the choice fractions of the whole forward, complete by the time backward runs.
struct RouterAuxGrad : torch::autograd::Function<RouterAuxGrad> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& out,
                            const at::Tensor& prob_sum, c10::intrusive_ptr<RouterStats> stats) {
    ctx->saved_data["stats"] = c10::IValue::make_capsule(stats);
    return out;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto s = c10::static_intrusive_pointer_cast<RouterStats>(ctx->saved_data["stats"].toCapsule());
    const double n = double(s->layers) * s->tokens;
    const auto grad_probs = s->choices * (s->weight * double(s->choices.size(0)) / (n * n));
    return {grads[0], grad_probs, at::Tensor()};
  }
};

// Mixtral's sparse MoE, routed as transformers routes it (softmax in float32, top k, renormalised,
// cast to the activations' dtype). The token copies are sorted by expert, so that the experts run
// as one grouped GEMM per projection over all of their tokens; nothing waits for the device (a
// CUDA graph can capture it) where compat::grouped_mm is fused. With `stats` (a training forward
// with a load-balancing loss) the layer's routing is counted and its output carries the loss's
// gradient.
at::Tensor moe_mlp(const ModelConfig& c, const Moe& moe, const at::Tensor& h,
                   const c10::intrusive_ptr<RouterStats>& stats) {
  const int64_t H = h.size(-1), k = c.experts_per_token;
  // Tensor parallel: every rank routes alike, and its experts' slices add partial outputs (summed at the
  // end) and partial gradients of the routing weights, which the entered input and router sum.
  const auto x = (moe.tp ? tp_copy(h, *moe.tp) : h).reshape({-1, H});
  const auto logits = moe.tp ? at::linear(x, tp_copy(moe.router.weight, *moe.tp)) : apply(moe.router, x);
  const auto probs = at::softmax(logits.to(at::kFloat), -1);
  auto [weights, experts] = probs.topk(k, -1);
  weights = (weights / weights.sum(-1, true)).to(x.scalar_type());
  const auto flat = experts.reshape({-1});
  const auto [sorted, order] = at::sort(flat, /*stable=*/true, 0, false);
  const auto token = order.div(k, "floor");
  const auto ends = at::searchsorted(sorted, at::arange(c.num_experts, sorted.options()), /*out_int32=*/true,
                                     /*right=*/true);
  const auto xs = x.index_select(0, token);
  const auto gate = compat::grouped_mm(xs, moe.gate.transpose(1, 2), ends);
  const auto up = compat::grouped_mm(xs, moe.up.transpose(1, 2), ends);
  const auto ys = compat::grouped_mm(swiglu(gate, up), moe.down.transpose(1, 2), ends);
  const auto y = ys * weights.reshape({-1}).index_select(0, order).unsqueeze(1);
  auto out = at::zeros_like(x).index_add(0, token, y).view(h.sizes());
  if (moe.tp) out = tp_sum(out, *moe.tp);
  if (!stats) return out;
  const auto& m = stats->mask;
  const auto prob_sum = (m.defined() ? probs * m.unsqueeze(1) : probs).sum(0);
  if (!stats->complete) {
    // Counted without bincount, which reads its input's maximum on the host.
    const auto counted = m.defined() ? m.repeat_interleave(k) : at::ones_like(flat, probs.options());
    const auto chosen = at::zeros({c.num_experts}, probs.options()).index_add(0, flat, counted);
    stats->choices = stats->choices.defined() ? stats->choices + chosen : chosen;
    stats->probs = stats->probs.defined() ? stats->probs + prob_sum.detach() : prob_sum.detach();
    stats->layers += 1;
  }
  return RouterAuxGrad::apply(out, prob_sum, stats);
}

at::Tensor feed_forward(const ModelConfig& c, const Block& b, const at::Tensor& h,
                        const c10::intrusive_ptr<RouterStats>& stats) {
  if (c.num_experts > 0) return moe_mlp(c, b.moe, h, stats);
  return mlp(c, b, h);
}

}  // namespace

namespace {

// Two bias-free projections of one input, whose backward pass sums the input's two gradients inside
// the second GEMM (beta = 1) where autograd would add them in a pass of its own over the [tokens,
// hidden] gradient: 22 passes of a 1.1B model's step.
struct ProjectionPair : torch::autograd::Function<ProjectionPair> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                const at::Tensor& w1, const at::Tensor& w2) {
    ctx->save_for_backward({x, w1, w2});
    return {at::linear(x, w1), at::linear(x, w2)};
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &w1 = saved[1], &w2 = saved[2];
    const auto x2 = x.reshape({-1, x.size(-1)});
    const auto d1 = grads[0].reshape({-1, w1.size(0)}), d2 = grads[1].reshape({-1, w2.size(0)});
    at::Tensor gx, g1, g2;
    if (ctx->needs_input_grad(0)) gx = at::mm(d1, w1).addmm_(d2, w2).view(x.sizes());
    if (ctx->needs_input_grad(1)) g1 = at::mm(d1.t(), x2);
    if (ctx->needs_input_grad(2)) g2 = at::mm(d2.t(), x2);
    return {gx, g1, g2};
  }
};

// The gate and up projections of x; on a GPU, without adapters, tensor split or biases, as a
// ProjectionPair. The CPU keeps autograd's sum, whose rounding its reference values were made with.
std::pair<at::Tensor, at::Tensor> project_gate_up(const Block& b, const at::Tensor& x) {
  bool pair = x.is_cuda();
  for (const Linear* l : {&b.gate, &b.up})
    pair = pair && l->split == Split::kNone && !l->lora.a.defined() && !l->bias.defined();
  if (!pair) return {apply(b.gate, x), apply(b.up, x)};
  const auto y = ProjectionPair::apply(x, b.gate.weight, b.up.weight);
  return {y[0], y[1]};
}

}  // namespace

at::Tensor mlp(const ModelConfig& c, const Block& b, const at::Tensor& h) {
  if (c.num_experts > 0) return moe_mlp(c, b.moe, h, {});
  const auto x = split_input(b.up, h);
  if (!c.gated_mlp) return apply(b.down, at::relu(apply(b.up, x)).square());
  const auto [gate, up] = project_gate_up(b, x);
  return apply(b.down, swiglu(gate, up));
}

namespace {

// The hidden state between layers: the residual stream and the last feed-forward's output not yet
// added to it, which the next layer's norm adds in its own pass over the rows (add_norm): one pass
// over the hidden state a layer fewer than adding them apart.
struct Stream {
  at::Tensor x, delta;  // delta undefined: x is the whole state
};

at::Tensor whole(const Stream& s) {
  return s.delta.defined() ? s.x + s.delta : s.x;
}

Stream block_forward(const ModelConfig& c, const Block& b, const Stream& in, const at::Tensor& cos,
                     const at::Tensor& sin, const AttentionLayout& layout,
                     const c10::intrusive_ptr<RouterStats>& stats) {
  const auto [residual, n1] = add_norm(c, in.x, in.delta, b.input_norm, b.input_norm_bias);
  const auto [h, n2] = add_norm(c, residual, attention(c, b, n1, cos, sin, layout), b.post_attention_norm,
                                b.post_attention_norm_bias);
  return {h, feed_forward(c, b, n2, stats)};
}

// The layer to recompute, carried through the autograd graph in a capsule. A layer that draws
// random numbers (adapter dropout) keeps the generator's state from its first run, so that the
// recomputation draws the same masks.
struct Recompute : torch::CustomClassHolder {
  std::function<at::Tensor(const at::Tensor&)> fn;
  bool random = false;
  at::Tensor rng_state;
};

at::Generator default_generator(const at::Tensor& like) {
  return at::globalContext().defaultGenerator(like.device());
}

// Runs the layer without recording its graph; in the backward pass runs it again with the graph
// and backpropagates through that, which accumulates the layer's weight gradients directly.
struct CheckpointedLayer : torch::autograd::Function<CheckpointedLayer> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            c10::intrusive_ptr<Recompute> layer) {
    ctx->save_for_backward({x});
    if (layer->random) {
      auto gen = default_generator(x);
      std::lock_guard<std::mutex> lock(gen.mutex());
      layer->rng_state = gen.get_state();
    }
    ctx->saved_data["layer"] = c10::IValue::make_capsule(layer);
    const ForceAdapterDropout training;
    return layer->fn(x);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto x = ctx->get_saved_variables()[0].detach().requires_grad_(true);
    auto layer = c10::static_intrusive_pointer_cast<Recompute>(ctx->saved_data["layer"].toCapsule());
    at::Tensor out, rng_now;
    auto gen = default_generator(x);
    if (layer->random) {
      std::lock_guard<std::mutex> lock(gen.mutex());
      rng_now = gen.get_state();
      gen.set_state(layer->rng_state);
    }
    {
      at::AutoGradMode grad_mode(true);
      out = layer->fn(x);
    }
    if (layer->random) {
      std::lock_guard<std::mutex> lock(gen.mutex());
      gen.set_state(rng_now);
    }
    torch::autograd::backward({out}, {grads[0]});
    return {x.grad(), at::Tensor()};
  }
};

bool block_trains(const Block& b) {
  const auto trains = [](const at::Tensor& t) { return t.defined() && t.requires_grad(); };
  for (const Linear* l : {&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down})
    if (trains(l->weight) || trains(l->bias) || trains(l->lora.a) || trains(l->lora.b)) return true;
  for (const at::Tensor* t :
       {&b.input_norm, &b.post_attention_norm, &b.input_norm_bias, &b.post_attention_norm_bias, &b.q_norm,
        &b.k_norm, &b.moe.router.weight, &b.moe.gate, &b.moe.up, &b.moe.down})
    if (trains(*t)) return true;
  return false;
}

bool block_draws(const Block& b) {
  for (const Linear* l : {&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down})
    if (l->lora.a.defined() && l->lora.dropout > 0) return true;
  return false;
}

}  // namespace

at::Tensor forward_hidden(const Transformer& m, const ForwardInput& in) {
  const auto& c = m.cfg;
  const auto& ids = in.input_ids;
  if (ids.dim() != 2) fail("input_ids must be [batch, tokens], got {} dims", ids.dim());
  const int64_t B = ids.size(0), T = ids.size(1);
  for (const auto* t : {&in.attention_mask, &in.position_ids, &in.segment_ids})
    if (t->defined() && (t->dim() != 2 || t->size(0) != B || t->size(1) != T))
      fail("attention_mask, position_ids and segment_ids must match input_ids [{}, {}]", B, T);

  at::Tensor positions = in.position_ids;
  if (!positions.defined()) {
    if (in.attention_mask.defined())
      positions = (in.attention_mask.to(at::kLong).cumsum(-1) - 1).clamp_min(0);
    else
      positions = at::arange(T, ids.options().dtype(at::kLong)).unsqueeze(0).expand({B, T});
  }
  if (m.hooks) m.hooks->before_forward();
  auto x = embed_tokens(m, ids);
  if (m.hooks) m.hooks->after_embedding();
  auto [cos, sin] = rope_cos_sin(c, positions, x.scalar_type());

  // Layers share a layout when they share a window size.
  std::map<int64_t, AttentionLayout> layouts;
  for (int64_t w : c.window)
    if (!layouts.count(w)) layouts[w] = attention_layout(in, w, T, c.head_dim, x);

  const int64_t checkpointed = at::GradMode::is_enabled() ? in.checkpointed_layers : 0;
  c10::intrusive_ptr<RouterStats> stats;
  if (c.num_experts > 0 && at::GradMode::is_enabled() && router_aux_loss().weight > 0) {
    stats = c10::make_intrusive<RouterStats>();
    // Tensor parallel: each rank gives the router the loss's whole gradient, which tp_copy then sums.
    stats->weight = router_aux_loss().weight / (m.tp ? m.tp->size() : 1);
    if (in.attention_mask.defined()) stats->mask = in.attention_mask.reshape({-1}).to(at::kFloat);
    stats->tokens = stats->mask.defined() ? stats->mask.sum().item<double>() : double(B * T);
  }
  Stream s{x};
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const Block& b = m.layers[i];
    const auto& layout = layouts[c.window[i]];
    // Hooks and checkpointed layers take the state as one tensor.
    if (m.hooks) s = {m.hooks->before_layer(i, whole(s))};
    if (i < checkpointed) {
      x = whole(s);
      // A checkpointed layer's backward, which gives its weights their gradients, runs only if its
      // output needs one; when nothing before it trains (frozen embeddings, adapters only) its input
      // needs none, so it becomes a leaf that asks for one.
      if (!x.requires_grad() && block_trains(b)) x = x.detach().requires_grad_(true);
      auto layer = c10::make_intrusive<Recompute>();
      layer->random = block_draws(b);
      layer->fn = [&c, &b, cos = cos, sin = sin, layout, stats](const at::Tensor& h) {
        return whole(block_forward(c, b, {h}, cos, sin, layout, stats));
      };
      // GCC 13 sees an out-of-bounds memmove in libtorch's Function::apply (a false positive in
      // torch's header, not in this code).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Warray-bounds"
      s = {CheckpointedLayer::apply(x, layer)};
#pragma GCC diagnostic pop
    } else {
      s = block_forward(c, b, s, cos, sin, layout, stats);
    }
    if (m.hooks) s = {m.hooks->after_layer(i, whole(s))};
  }
  if (stats && stats->tokens > 0) {
    stats->complete = true;
    router_aux_loss().sum += stats->value(c.num_experts);
    router_aux_loss().count += 1;
  }
  if (m.hooks) m.hooks->before_head();
  return add_norm(c, s.x, s.delta, m.norm, m.norm_bias).second;
}

at::Tensor embed_tokens(const Transformer& m, const at::Tensor& ids) {
  return m.tp ? tensor_parallel_embedding(*m.tp, m.embed, ids) : at::embedding(m.embed, ids);
}

at::Tensor lm_logits(const Transformer& m, const at::Tensor& hidden) {
  if (!m.lm_head.weight.defined()) fail("this model is a sequence classifier: it has no lm_head");
  if (m.tp) return tp_gather_vocab(apply(m.lm_head, tp_copy(hidden, *m.tp)), *m.tp);
  return apply(m.lm_head, hidden);
}

namespace {

// The rows' and the weight's gradients of a loss read from a plain head's logits (rows x weight^T),
// each chunk's logits computed again rather than kept: dlogits(s, n, logits) turns the logits of
// rows s..s+n (float32, or float64) into d loss / d logits. The weight's gradient is summed over
// the chunks in float32 and rounded once, so that it arrives once (a gradient per chunk would reach
// data-parallel hooks as several gradients of one parameter).
template <typename F>
std::pair<at::Tensor, at::Tensor> head_backward(torch::autograd::AutogradContext* ctx, const at::Tensor& rows,
                                                const at::Tensor& weight, int64_t chunk, at::ScalarType fp,
                                                F&& dlogits) {
  const bool want_rows = ctx->needs_input_grad(0), want_weight = ctx->needs_input_grad(1);
  at::Tensor grad_rows = want_rows ? at::empty_like(rows) : at::Tensor();
  at::Tensor grad_weight = want_weight ? at::zeros_like(weight, weight.options().dtype(fp)) : at::Tensor();
  for (int64_t s = 0, N = rows.size(0); s < N; s += chunk) {
    const int64_t n = std::min(chunk, N - s);
    const auto r = rows.narrow(0, s, n);
    const auto d = dlogits(s, n, at::mm(r, weight.t()).to(fp)).to(rows.scalar_type());
    if (want_rows) grad_rows.narrow(0, s, n).copy_(at::mm(d, weight));
    if (want_weight) grad_weight.add_(at::mm(d.t(), r));
  }
  return {grad_rows, want_weight ? grad_weight.to(weight.scalar_type()) : at::Tensor()};
}

// head_logprobs with its own backward: what autograd would keep of the chunks (their float32
// log-softmax, 2 GB for 16k tokens of a 32k vocabulary) is not kept; the backward pass computes
// each chunk's logits again, d log p(t) / d logits = onehot(t) - softmax.
struct HeadLogprobs : torch::autograd::Function<HeadLogprobs> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& rows,
                            const at::Tensor& weight, const at::Tensor& targets, int64_t chunk) {
    const int64_t N = rows.size(0);
    const auto fp = at::promote_types(rows.scalar_type(), at::kFloat);
    auto out = at::empty({N}, rows.options().dtype(fp));
    auto lse = at::empty({N}, rows.options().dtype(fp));
    for (int64_t s = 0; s < N; s += chunk) {
      const int64_t n = std::min(chunk, N - s);
      const auto logits = at::mm(rows.narrow(0, s, n), weight.t()).to(fp);
      const auto tt = targets.narrow(0, s, n);
      const auto z = at::logsumexp(logits, 1);
      lse.narrow(0, s, n).copy_(z);
      const auto picked = logits.gather(1, tt.clamp_min(0).unsqueeze(1)).squeeze(1) - z;
      out.narrow(0, s, n).copy_(picked * (tt >= 0).to(fp));
    }
    ctx->save_for_backward({rows, weight, targets, lse});
    ctx->saved_data["chunk"] = chunk;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &targets = saved[2], &lse = saved[3];
    const auto& g = grads[0];
    auto [grad_rows, grad_weight] =
        head_backward(ctx, saved[0], saved[1], ctx->saved_data["chunk"].toInt(), lse.scalar_type(),
                      [&](int64_t s, int64_t n, const at::Tensor& logits) {
                        const auto tt = targets.narrow(0, s, n);
                        const auto gs = (g.narrow(0, s, n) * (tt >= 0).to(g.scalar_type())).unsqueeze(1);
                        auto d = at::exp(logits - lse.narrow(0, s, n).unsqueeze(1)).mul_(gs.neg());
                        return d.scatter_add_(1, tt.clamp_min(0).unsqueeze(1), gs);
                      });
    return {grad_rows, grad_weight, at::Tensor(), at::Tensor()};
  }
};

// head_topk_kd with its own backward, as HeadLogprobs: per row L = T^2 sum_j pt_j (log pt_j -
// log ps_j), and as the pt sum to 1, d L / d logits = T (softmax(logits / T) - scatter(ids, pt)).
struct HeadTopkKd : torch::autograd::Function<HeadTopkKd> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& rows,
                            const at::Tensor& weight, const at::Tensor& topk_values,
                            const at::Tensor& topk_ids, double temperature, int64_t chunk) {
    const int64_t N = rows.size(0);
    const auto fp = at::promote_types(rows.scalar_type(), at::kFloat);
    auto out = at::empty({N}, rows.options().dtype(fp));
    auto lse = at::empty({N}, rows.options().dtype(fp));
    const auto log_pt = at::log_softmax(topk_values.to(fp) / temperature, 1);
    const auto ids = topk_ids.to(at::kLong);
    for (int64_t s = 0; s < N; s += chunk) {
      const int64_t n = std::min(chunk, N - s);
      const auto z = at::mm(rows.narrow(0, s, n), weight.t()).to(fp).div_(temperature);
      const auto zl = at::logsumexp(z, 1);
      lse.narrow(0, s, n).copy_(zl);
      const auto log_ps = z.gather(1, ids.narrow(0, s, n)) - zl.unsqueeze(1);
      const auto lp = log_pt.narrow(0, s, n);
      out.narrow(0, s, n).copy_((lp.exp() * (lp - log_ps)).sum(1) * (temperature * temperature));
    }
    ctx->save_for_backward({rows, weight, ids, log_pt, lse});
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["chunk"] = chunk;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &ids = saved[2], &log_pt = saved[3], &lse = saved[4];
    const double T = ctx->saved_data["temperature"].toDouble();
    const auto& g = grads[0];
    auto [grad_rows, grad_weight] = head_backward(
        ctx, saved[0], saved[1], ctx->saved_data["chunk"].toInt(), lse.scalar_type(),
        [&](int64_t s, int64_t n, const at::Tensor& logits) {
          const auto gs = g.narrow(0, s, n).unsqueeze(1) * T;
          auto d = at::exp(logits / T - lse.narrow(0, s, n).unsqueeze(1)).mul_(gs);
          return d.scatter_add_(1, ids.narrow(0, s, n), log_pt.narrow(0, s, n).exp() * gs.neg());
        });
    return {grad_rows, grad_weight, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor head_logprobs(const at::Tensor& rows, const at::Tensor& weight, const at::Tensor& targets,
                         int64_t chunk_rows) {
  if (rows.dim() != 2 || weight.dim() != 2 || rows.size(1) != weight.size(1) || targets.dim() != 1 ||
      targets.size(0) != rows.size(0) || chunk_rows < 1)
    fail(
        "head_logprobs: rows [N, H], weight [V, H], targets [N] and chunk_rows >= 1, got [{}], [{}], [{}], "
        "{}",
        fmt::join(rows.sizes(), ", "), fmt::join(weight.sizes(), ", "), fmt::join(targets.sizes(), ", "),
        chunk_rows);
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Warray-bounds"
  return HeadLogprobs::apply(rows, weight, targets, chunk_rows);
#pragma GCC diagnostic pop
}

at::Tensor head_topk_kd(const at::Tensor& rows, const at::Tensor& weight, const at::Tensor& topk_values,
                        const at::Tensor& topk_ids, double temperature, int64_t chunk_rows) {
  if (rows.dim() != 2 || weight.dim() != 2 || rows.size(1) != weight.size(1) || topk_values.dim() != 2 ||
      topk_values.sizes() != topk_ids.sizes() || topk_values.size(0) != rows.size(0) || chunk_rows < 1 ||
      temperature <= 0)
    fail(
        "head_topk_kd: rows [N, H], weight [V, H], top-k values and ids [N, k], temperature > 0 and "
        "chunk_rows >= 1, got [{}], [{}], [{}], [{}], {}, {}",
        fmt::join(rows.sizes(), ", "), fmt::join(weight.sizes(), ", "), fmt::join(topk_values.sizes(), ", "),
        fmt::join(topk_ids.sizes(), ", "), temperature, chunk_rows);
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Warray-bounds"
  return HeadTopkKd::apply(rows, weight, topk_values, topk_ids, temperature, chunk_rows);
#pragma GCC diagnostic pop
}

int64_t logit_chunk_rows(const Transformer& m) {
  return std::max<int64_t>(1, (int64_t(64) << 20) / std::max<int64_t>(1, m.cfg.vocab_size));
}

bool recompute_head_logits(const Transformer& m, int64_t rows, int64_t kept_bytes_per_logit) {
  // Training with a large vocabulary: autograd would keep every row's logits, or what the loss made
  // of them, for the backward pass (4 to 8 GB for 16k tokens of Llama 3's 128k vocabulary). Below
  // that the kept copy is the faster choice: on an H200 the recompute took a 1.1B model's step (16k
  // tokens, 32k vocabulary: 2 GB in float32) from 291 to 300 ms, for 1.3 GB less.
  const auto& head = m.lm_head;
  if (!at::GradMode::is_enabled() || !head.weight.defined() || head.bias.defined() || head.lora.a.defined() ||
      m.tp)
    return false;
  return double(rows) * double(m.cfg.vocab_size) * double(kept_bytes_per_logit) > 4e9;
}

std::pair<at::Tensor, at::Tensor> lm_topk(const Transformer& m, const at::Tensor& rows, int64_t k,
                                          int64_t chunk) {
  if (rows.dim() != 2 || k < 1 || chunk < 1)
    fail("lm_topk: rows [N, H], k >= 1 and chunk >= 1, got [{}], {}, {}", fmt::join(rows.sizes(), ", "), k,
         chunk);
  k = std::min(k, m.cfg.vocab_size);
  std::vector<at::Tensor> values{at_least_float(rows.new_empty({0, k}))},
      ids{rows.new_empty({0, k}, at::kLong)};
  for (int64_t s = 0; s < rows.size(0); s += chunk) {
    auto top = at_least_float(lm_logits(m, rows.narrow(0, s, std::min(chunk, rows.size(0) - s)))).topk(k, -1);
    values.push_back(std::get<0>(top));
    ids.push_back(std::get<1>(top));
  }
  return {at::cat(values), at::cat(ids)};
}

at::Tensor token_logprobs(const Transformer& m, const at::Tensor& hidden, const at::Tensor& targets) {
  if (!m.lm_head.weight.defined()) fail("this model is a sequence classifier: it has no lm_head");
  const int64_t H = hidden.size(-1);
  auto h = hidden.reshape({-1, H});
  auto t = targets.reshape({-1});
  if (t.numel() != h.size(0)) fail("targets must have one entry per hidden state");
  const int64_t chunk = logit_chunk_rows(m);
  // Each rank's share of the vocabulary: as many more rows per chunk for the same memory.
  if (m.tp) return tensor_parallel_logprobs(m, h, t, chunk * m.tp->size()).view(targets.sizes());
  // target_logprobs keeps the logits in their own type on a GPU, their float32 log-softmax elsewhere.
  const auto& w = m.lm_head.weight;
  if (recompute_head_logits(m, h.size(0), w.is_cuda() ? w.element_size() : 4))
    return head_logprobs(h, m.lm_head.weight, t, chunk).view(targets.sizes());
  std::vector<at::Tensor> out;
  for (int64_t s = 0; s < h.size(0); s += chunk) {
    const int64_t n = std::min(chunk, h.size(0) - s);
    out.push_back(target_logprobs(lm_logits(m, h.narrow(0, s, n)), t.narrow(0, s, n)));
  }
  // No rows (a batch with nothing to score) gives an empty result rather than an error.
  if (out.empty()) return at_least_float(h.new_empty({0})).view(targets.sizes());
  return at::cat(out).view(targets.sizes());
}

at::Tensor sequence_scores(const Transformer& m, const at::Tensor& hidden, const ForwardInput& in) {
  if (!m.score.weight.defined()) fail("this model has no score head: it is not a sequence classifier");
  const int64_t B = hidden.size(0), T = hidden.size(1);
  auto keep = in.attention_mask.defined() ? in.attention_mask.to(at::kBool)
                                          : at::ones({B, T}, in.input_ids.options().dtype(at::kBool));
  if (m.cfg.pad_token_id) keep = keep.logical_and(in.input_ids != *m.cfg.pad_token_id);
  const auto positions = at::arange(T, in.input_ids.options().dtype(at::kLong));
  const auto last = (positions * keep.to(at::kLong)).argmax(-1);
  const auto rows = at::arange(B, last.options());
  return at_least_float(apply(m.score, hidden.index({rows, last})));
}

Transformer allocate_transformer(const ModelConfig& full, const at::TensorOptions& options,
                                 std::shared_ptr<const TensorSplit> split) {
  const ModelConfig cfg = split ? local_config(*split) : full;
  const int64_t V = split ? split->vocab_rows : cfg.vocab_size;
  auto empty = [&](std::vector<int64_t> shape) { return at::empty(shape, options); };
  auto linear = [&](int64_t out, int64_t in, bool bias) {
    return Linear{empty({out, in}), bias ? empty({out}) : at::Tensor()};
  };
  // Projections of the same input (q, k, v; gate, up) are rows of one buffer, each a view of its
  // own rows: autograd sees separate tensors (training's project_qkv joins a copy of them on a GPU),
  // generation runs them as one GEMM over the buffer itself (joined_linear).
  auto linears = [&](const std::vector<int64_t>& outs, int64_t in, bool bias) {
    int64_t rows = 0;
    for (int64_t o : outs) rows += o;
    const auto w = empty({rows, in}), b = bias ? empty({rows}) : at::Tensor();
    std::vector<Linear> parts;
    rows = 0;
    for (int64_t o : outs) {
      parts.push_back({w.narrow(0, rows, o), bias ? b.narrow(0, rows, o) : at::Tensor()});
      rows += o;
    }
    return parts;
  };
  const int64_t H = cfg.hidden_size, D = cfg.head_dim, I = cfg.intermediate_size;
  Transformer m;
  m.cfg = cfg;
  m.cfg.dtype = options.dtype().toScalarType();
  m.embed = empty({V, H});
  for (int64_t i = 0; i < cfg.num_layers; ++i) {
    Block b;
    b.input_norm = empty({H});
    b.post_attention_norm = empty({H});
    if (cfg.layernorm1p) {
      b.input_norm_bias = empty({H});
      b.post_attention_norm_bias = empty({H});
    }
    if (cfg.qk_norm) {
      b.q_norm = empty({D});
      b.k_norm = empty({D});
    }
    auto qkv = linears({cfg.num_heads * D, cfg.num_kv_heads * D, cfg.num_kv_heads * D}, H, cfg.qkv_bias);
    b.q = qkv[0], b.k = qkv[1], b.v = qkv[2];
    b.o = linear(H, cfg.num_heads * D, cfg.o_bias);
    if (cfg.num_experts > 0) {
      const int64_t E = cfg.num_experts;
      b.moe = Moe{linear(E, H, false), empty({E, I, H}), empty({E, I, H}), empty({E, H, I})};
    } else if (cfg.gated_mlp) {
      auto gate_up = linears({I, I}, H, cfg.mlp_bias);
      b.gate = gate_up[0], b.up = gate_up[1];
    } else {
      b.up = linear(I, H, cfg.mlp_bias);
    }
    if (cfg.num_experts == 0) b.down = linear(H, I, cfg.mlp_bias);
    m.layers.push_back(std::move(b));
  }
  m.norm = empty({H});
  if (cfg.layernorm1p) m.norm_bias = empty({H});
  if (cfg.num_labels > 0)
    m.score = linear(cfg.num_labels, H, false);
  else
    m.lm_head = cfg.tie_word_embeddings ? Linear{m.embed, {}} : linear(V, H, false);
  if (split) {
    m.tp = split;
    const auto set = [&](Linear& l, Split kind) {
      l.split = kind;
      l.tp = split;
    };
    for (auto& b : m.layers) {
      if (cfg.num_experts > 0) b.moe.tp = split;
      for (Linear* l : {&b.q, &b.k, &b.v, &b.gate, &b.up}) set(*l, Split::kColumn);
      for (Linear* l : {&b.o, &b.down}) set(*l, Split::kRow);
      b.k.shared = b.v.shared = split->kv_slots > 0;
    }
    if (m.lm_head.weight.defined()) set(m.lm_head, Split::kColumn);
  }
  return m;
}

Transformer allocate_like(const Transformer& m, const at::TensorOptions& options) {
  return allocate_transformer(m.tp ? m.tp->full : m.cfg, options, m.tp);
}

Transformer init_transformer(const ModelConfig& cfg, at::Device device, uint64_t seed) {
  Transformer m = allocate_transformer(cfg, at::TensorOptions().dtype(cfg.dtype).device(device));
  // Drawn in float32 on the CPU from one seeded generator, so the weights do not depend on the
  // device or dtype they end up in.
  auto gen = at::detail::createCPUGenerator(seed);
  at::NoGradGuard no_grad;
  for (auto& [name, t] : named_parameters(m)) {
    const bool is_norm = name.find("norm") != std::string::npos;
    const bool is_bias = name.size() > 5 && name.compare(name.size() - 5, 5, ".bias") == 0;
    // A layernorm1p weight of 0 scales by 1.
    if (is_bias || (is_norm && m.cfg.layernorm1p))
      t.zero_();
    else if (is_norm)
      t.fill_(1.0);
    else
      t.copy_(at::normal(0.0, 0.02, t.sizes(), gen, at::TensorOptions().dtype(at::kFloat)));
  }
  return m;
}

namespace {

// Every parameter of m (a Transformer, const or not) as f(Hugging Face name, its tensor).
template <class M, class F>
void visit_parameters(M& m, F&& f) {
  const auto weight_and_bias = [&](const std::string& name, auto& weight, auto& bias) {
    f(name + ".weight", weight);
    if (bias.defined()) f(name + ".bias", bias);
  };
  const auto linear = [&](const std::string& name, auto& l) { weight_and_bias(name, l.weight, l.bias); };
  f("model.embed_tokens.weight", m.embed);
  for (size_t i = 0; i < m.layers.size(); ++i) {
    auto& b = m.layers[i];
    const std::string p = fmt::format("model.layers.{}.", i);
    weight_and_bias(p + "input_layernorm", b.input_norm, b.input_norm_bias);
    linear(p + "self_attn.q_proj", b.q);
    linear(p + "self_attn.k_proj", b.k);
    linear(p + "self_attn.v_proj", b.v);
    linear(p + "self_attn.o_proj", b.o);
    if (b.q_norm.defined()) {
      f(p + "self_attn.q_norm.weight", b.q_norm);
      f(p + "self_attn.k_norm.weight", b.k_norm);
    }
    weight_and_bias(p + "post_attention_layernorm", b.post_attention_norm, b.post_attention_norm_bias);
    if (b.moe.router.weight.defined()) {
      linear(p + "block_sparse_moe.gate", b.moe.router);
      f(p + "block_sparse_moe.experts.w1", b.moe.gate);
      f(p + "block_sparse_moe.experts.w2", b.moe.down);
      f(p + "block_sparse_moe.experts.w3", b.moe.up);
      continue;
    }
    if (b.gate.weight.defined()) linear(p + "mlp.gate_proj", b.gate);
    linear(p + "mlp.up_proj", b.up);
    linear(p + "mlp.down_proj", b.down);
  }
  weight_and_bias("model.norm", m.norm, m.norm_bias);
  if (m.cfg.num_labels > 0)
    linear("score", m.score);
  else if (!m.cfg.tie_word_embeddings)
    linear("lm_head", m.lm_head);
}

}  // namespace

std::vector<std::pair<std::string, at::Tensor>> named_parameters(const Transformer& m) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  visit_parameters(m, [&](const std::string& name, const at::Tensor& t) { out.emplace_back(name, t); });
  return out;
}

std::vector<std::pair<std::string, at::Tensor*>> parameter_slots(Transformer& m) {
  std::vector<std::pair<std::string, at::Tensor*>> out;
  visit_parameters(m, [&](const std::string& name, at::Tensor& t) { out.emplace_back(name, &t); });
  return out;
}

std::vector<std::pair<std::string, at::Tensor>> checkpoint_tensors(const Transformer& m) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  const std::string stack = ".experts.w";
  for (auto& [name, t] : named_parameters(m)) {
    const size_t at = name.rfind(stack);
    if (at == std::string::npos || at + stack.size() + 1 != name.size()) {
      out.emplace_back(name, t);
      continue;
    }
    const std::string prefix = name.substr(0, at + 9), w = name.substr(at + 9);  // "...experts.", "w1"
    for (int64_t e = 0; e < t.size(0); ++e)
      out.emplace_back(fmt::format("{}{}.{}.weight", prefix, e, w), t[e]);
  }
  return out;
}

}  // namespace aligner
