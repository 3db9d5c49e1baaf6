#include "gen/cuda_decoder.h"

#include "core/error.h"

#ifdef ALIGNER_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>

#include <cmath>
#include <limits>

#include "core/torch_compat.h"
#include "kernels/aten_dtype.h"
#include "kernels/decode_kernels.h"
#include "kernels/layer_kernels.h"
#include "model/layers.h"
#endif

namespace aligner {

#ifdef ALIGNER_WITH_CUDA

namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) fail("CUDA decoding: {} failed: {}", what, cudaGetErrorString(e));
}

// Launches the sampling kernel on the current stream (kernels::SampleArgs says what each is).
void launch_sample(const at::Tensor& logits, const SamplingParams& p, const int64_t* slots,
                   const at::Tensor& streams, const at::Tensor& lengths, int64_t max_tokens, bool advance,
                   at::Tensor& tokens, at::Tensor& logprobs) {
  if (logits.dim() != 2 || logits.stride(1) != 1) fail("CUDA sampling: logits must be [rows, vocab] rows");
  kernels::SampleArgs a{};
  a.dtype = kernels::dtype_of(logits.scalar_type());
  a.logits = logits.data_ptr();
  a.rows = int(logits.size(0));
  a.vocab = int(logits.size(1));
  a.row_stride = logits.stride(0);
  a.slots = slots;
  a.streams = streams.data_ptr<int64_t>();
  a.lengths = lengths.data_ptr<int64_t>();
  a.max_tokens = max_tokens;
  a.advance = advance;
  a.tokens = tokens.data_ptr<int64_t>();
  a.logprobs = logprobs.data_ptr<float>();
  a.greedy = is_greedy(p);
  a.temperature = float(p.temperature);
  a.top_k = int(p.top_k);
  a.top_p = float(p.top_p);
  check(kernels::sample(a, at::cuda::getCurrentCUDAStream().stream()), "sampling");
}

}  // namespace

std::pair<at::Tensor, at::Tensor> cuda_sample(const at::Tensor& logits, const SamplingParams& p,
                                              const at::Tensor& streams, const at::Tensor& positions) {
  check_sampling_params(p);
  const int64_t rows = logits.size(0);
  for (const auto* t : {&streams, &positions})
    if (!t->is_cuda() || t->scalar_type() != at::kLong || t->numel() != rows)
      fail("CUDA sampling: streams and positions must be int64 [rows] on the device");
  auto tokens = at::empty({rows}, streams.options());
  auto logprobs = at::empty({rows}, streams.options().dtype(at::kFloat));
  launch_sample(logits.contiguous(), p, nullptr, streams.contiguous(), positions.contiguous(),
                std::numeric_limits<int64_t>::max(), /*advance=*/false, tokens, logprobs);
  return {tokens, logprobs};
}

bool cuda_decoding_supported(const Transformer& m) {
  const auto t = m.embed.scalar_type();
  const auto& c = m.cfg;
  // A mixture of experts is captured only where its grouped GEMMs need no group sizes on the host.
  if (c.num_experts > 0 && !compat::fused_grouped_mm(m.embed, c.hidden_size, c.intermediate_size))
    return false;
  return m.embed.is_cuda() && m.lm_head.weight.defined() &&
         (t == at::kFloat || t == at::kBFloat16 || t == at::kHalf) &&
         kernels::decode_attention_supported(int(c.head_dim)) && c.rotary_dim % 2 == 0 &&
         c.rotary_dim <= c.head_dim && c.num_heads % c.num_kv_heads == 0 && c.hidden_size % 8 == 0;
}

struct CudaDecoder::Graphs {
  const Transformer& m;
  KvCache& cache;
  SamplingParams sampling;
  at::Tensor streams;            // [slots] int64: the sequence_stream of each slot's sequence
  at::cuda::CUDAStream capture;  // graphs must be captured on a stream other than the default
  std::map<int64_t, std::unique_ptr<at::cuda::CUDAGraph>> by_width;
  // Per layer, q|k|v and gate|up as one projection each where the weights allow (joined_linear).
  std::vector<c10::optional<Linear>> qkv, gate_up;
  // Two steps' results on the host (pinned), and the events that say they have arrived.
  at::Tensor host_tokens[2], host_logprobs[2];
  at::cuda::CUDAEvent arrived[2];
  int64_t tickets = 0;

  // Samples rows of logits for their slots (nullptr: row i is slot i) on the current stream.
  void sample(const at::Tensor& logits, const int64_t* slots, bool advance, at::Tensor& tokens,
              at::Tensor& logprobs) {
    launch_sample(logits, sampling, slots, streams, cache.lengths, kv_max_tokens(cache), advance, tokens,
                  logprobs);
  }

  // A dense gated SiLU feed-forward with the activation as one kernel.
  at::Tensor gated_mlp(int64_t l, const at::Tensor& h) {
    const Block& b = m.layers[l];
    const auto stream = at::cuda::getCurrentCUDAStream().stream();
    at::Tensor gate, up, act;
    if (gate_up[l]) {
      const auto y = apply(*gate_up[l], h);
      const int64_t I = b.gate.weight.size(0);
      gate = y.narrow(1, 0, I), up = y.narrow(1, I, I);
      act = at::empty({h.size(0), I}, y.options());
    } else {
      gate = apply(b.gate, h), up = apply(b.up, h);
      act = gate;  // elementwise: written where it is read
    }
    check(kernels::silu_mul(kernels::dtype_of(h.scalar_type()), gate.data_ptr(), up.data_ptr(),
                            gate.stride(0), act.data_ptr(), h.size(0), act.size(1), stream),
          "silu_mul");
    return apply(b.down, act);
  }

  // decode_step for slots [0, n) followed by sampling, with nothing that waits for the device,
  // so that it can be captured.
  void step(int64_t n, at::Tensor& tokens, at::Tensor& logprobs) {
    const ModelConfig& c = m.cfg;
    const auto stream = at::cuda::getCurrentCUDAStream().stream();
    const auto dtype = kernels::dtype_of(m.embed.scalar_type());
    // x: the residual stream; h: its normalised copy, which the next projections read. RMSNorm is
    // one fused kernel with the residual add; other norms run as layers.h defines them.
    auto x = embed_tokens(m, tokens.narrow(0, 0, n));
    auto h = at::empty_like(x);
    const auto add_norm = [&](const at::Tensor* delta, const at::Tensor& weight, const at::Tensor& bias) {
      if (c.layernorm1p) {
        if (delta) x.add_(*delta);
        h.copy_(norm(c, x, weight, bias));
        return;
      }
      check(kernels::add_rms_norm(dtype, x.data_ptr(), delta ? delta->data_ptr() : nullptr,
                                  delta ? delta->stride(0) : 0, weight.data_ptr(), float(c.rms_norm_eps),
                                  x.data_ptr(), h.data_ptr(), /*rstd=*/nullptr, n, c.hidden_size, stream),
            "rms_norm");
    };
    add_norm(nullptr, m.layers[0].input_norm, m.layers[0].input_norm_bias);
    auto attn = at::empty({n, c.num_heads * c.head_dim}, x.options());
    for (int64_t l = 0; l < c.num_layers; ++l) {
      const Block& b = m.layers[l];
      at::Tensor q, k, v;
      if (qkv[l]) {
        const auto y = apply(*qkv[l], h);
        const int64_t nq = c.num_heads * c.head_dim, nkv = c.num_kv_heads * c.head_dim;
        q = y.narrow(1, 0, nq), k = y.narrow(1, nq, nkv), v = y.narrow(1, nq + nkv, nkv);
      } else {
        q = apply(b.q, h), k = apply(b.k, h), v = apply(b.v, h);
      }
      if (c.qk_norm) {
        q = head_norm(c, q, c.num_heads, b.q_norm).view({n, -1});
        k = head_norm(c, k, c.num_kv_heads, b.k_norm).view({n, -1});
      }
      kernels::DecodeAttentionArgs a{};
      a.dtype = dtype;
      a.batch = int(n);
      a.heads = int(c.num_heads);
      a.kv_heads = int(c.num_kv_heads);
      a.head_dim = int(c.head_dim);
      a.q = q.data_ptr(), a.k = k.data_ptr(), a.v = v.data_ptr();
      a.q_stride = q.stride(0), a.k_stride = k.stride(0), a.v_stride = v.stride(0);
      a.k_cache = cache.k[l].data_ptr();
      a.v_cache = cache.v[l].data_ptr();
      a.max_tokens = kv_max_tokens(cache);
      a.lengths = cache.lengths.data_ptr<int64_t>();
      a.rotary_dim = int(c.rotary_dim);
      a.inv_freq = cache.inv_freq.data_ptr<float>();
      a.window = c.window[l];
      a.scale = float(1.0 / std::sqrt(double(c.head_dim)));
      a.out = attn.data_ptr();
      check(kernels::decode_attention(a, stream), "attention");
      const auto o = apply(b.o, attn);
      add_norm(&o, b.post_attention_norm, b.post_attention_norm_bias);
      const auto down = c.gated_mlp && c.num_experts == 0 ? gated_mlp(l, h) : mlp(c, b, h);
      if (l + 1 < c.num_layers)
        add_norm(&down, m.layers[l + 1].input_norm, m.layers[l + 1].input_norm_bias);
      else
        add_norm(&down, m.norm, m.norm_bias);
    }
    const auto logits = lm_logits(m, h);
    sample(logits, nullptr, /*advance=*/true, tokens, logprobs);
  }
};

CudaDecoder::CudaDecoder(const Transformer& m, KvCache& cache, const SamplingParams& sampling) {
  if (!cuda_decoding_supported(m)) fail("CUDA decoding: this model or device is not supported");
  for (const auto& t : cache.k)
    if (!t.is_contiguous() || t.scalar_type() != m.embed.scalar_type() || t.device() != m.embed.device())
      fail("CUDA decoding: the KV cache must be contiguous, in the model's dtype and on its device");
  const int64_t slots = kv_slots(cache);
  const auto device = m.embed.device();
  graphs_.reset(new Graphs{m,
                           cache,
                           sampling,
                           at::zeros({slots}, at::TensorOptions().dtype(at::kLong).device(device)),
                           at::cuda::getStreamFromPool(false, device.index()),
                           {},
                           {},
                           {},
                           {},
                           {},
                           {},
                           0});
  for (const Block& b : m.layers) {
    graphs_->qkv.push_back(joined_linear({&b.q, &b.k, &b.v}));
    graphs_->gate_up.push_back(m.cfg.gated_mlp && m.cfg.num_experts == 0 ? joined_linear({&b.gate, &b.up})
                                                                         : c10::nullopt);
  }
  for (int i = 0; i < 2; ++i) {
    graphs_->host_tokens[i] = at::empty({slots}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    graphs_->host_logprobs[i] = at::empty({slots}, at::TensorOptions().dtype(at::kFloat).pinned_memory(true));
  }
  tokens = at::zeros({slots}, at::TensorOptions().dtype(at::kLong).device(device));
  logprobs = at::zeros({slots}, at::TensorOptions().dtype(at::kFloat).device(device));

  // One uncaptured step first, so that every lazy initialisation (cuBLAS handles and workspaces
  // for the capture stream) happens outside a capture. The cache holds nothing yet: what it
  // writes at position 0 is overwritten by the prefills, and lengths and tokens are reset.
  c10::cuda::device_synchronize();
  {
    c10::cuda::CUDAStreamGuard guard(graphs_->capture);
    graphs_->step(slots, tokens, logprobs);
  }
  c10::cuda::device_synchronize();
  cache.lengths.zero_();
  tokens.zero_();
}

CudaDecoder::~CudaDecoder() = default;

void CudaDecoder::set_streams(const at::Tensor& slots, const at::Tensor& streams) {
  graphs_->streams.index_copy_(0, slots, streams);
}

void CudaDecoder::sample(const at::Tensor& logits, const at::Tensor& slots) {
  if (slots.scalar_type() != at::kLong || slots.numel() != logits.size(0))
    fail("CUDA decoding: need one int64 slot per row of logits");
  graphs_->sample(logits.contiguous(), slots.contiguous().data_ptr<int64_t>(), /*advance=*/false, tokens,
                  logprobs);
}

int64_t CudaDecoder::step(int64_t n) {
  const int64_t slots = kv_slots(graphs_->cache);
  if (n < 1 || n > slots) fail("CUDA decoding: step of {} slots, the cache has {}", n, slots);
  // Graphs for power-of-two widths: a step of n slots runs the narrowest graph that covers them
  // (the slots past n hold no sequence, and their outputs are not read).
  int64_t width = 1;
  while (width < n) width *= 2;
  width = std::min(width, slots);
  auto& graph = graphs_->by_width[width];
  if (!graph) {
    graph = std::make_unique<at::cuda::CUDAGraph>();
    c10::cuda::CUDAStreamGuard guard(graphs_->capture);
    graph->capture_begin();
    graphs_->step(width, tokens, logprobs);
    graph->capture_end();
  }
  graph->replay();
  const int64_t ticket = graphs_->tickets++;
  const int b = int(ticket % 2);
  graphs_->host_tokens[b].narrow(0, 0, n).copy_(tokens.narrow(0, 0, n), /*non_blocking=*/true);
  graphs_->host_logprobs[b].narrow(0, 0, n).copy_(logprobs.narrow(0, 0, n), /*non_blocking=*/true);
  graphs_->arrived[b].record(at::cuda::getCurrentCUDAStream());
  return ticket;
}

void CudaDecoder::wait(int64_t ticket) {
  graphs_->arrived[ticket % 2].synchronize();
}
const int64_t* CudaDecoder::host_tokens(int64_t ticket) const {
  return graphs_->host_tokens[ticket % 2].data_ptr<int64_t>();
}
const float* CudaDecoder::host_logprobs(int64_t ticket) const {
  return graphs_->host_logprobs[ticket % 2].data_ptr<float>();
}

#else

bool cuda_decoding_supported(const Transformer&) {
  return false;
}
struct CudaDecoder::Graphs {};
CudaDecoder::CudaDecoder(const Transformer&, KvCache&, const SamplingParams&) {
  fail("CUDA decoding needs a CUDA build");
}
CudaDecoder::~CudaDecoder() = default;
void CudaDecoder::set_streams(const at::Tensor&, const at::Tensor&) {}
void CudaDecoder::sample(const at::Tensor&, const at::Tensor&) {}
int64_t CudaDecoder::step(int64_t) {
  return 0;
}
void CudaDecoder::wait(int64_t) {}
const int64_t* CudaDecoder::host_tokens(int64_t) const {
  return nullptr;
}
const float* CudaDecoder::host_logprobs(int64_t) const {
  return nullptr;
}
std::pair<at::Tensor, at::Tensor> cuda_sample(const at::Tensor&, const SamplingParams&, const at::Tensor&,
                                              const at::Tensor&) {
  fail("CUDA sampling needs a CUDA build");
}

#endif

}  // namespace aligner
