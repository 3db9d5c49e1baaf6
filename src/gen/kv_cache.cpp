#include "gen/kv_cache.h"

#include "core/error.h"
#include "model/layers.h"

namespace aligner {

KvCache allocate_kv_cache(const ModelConfig& cfg, int64_t slots, int64_t max_tokens,
                          const at::TensorOptions& options) {
  if (slots < 1 || max_tokens < 1)
    fail("KV cache: need at least one slot and one token, got {} x {}", slots, max_tokens);
  KvCache c;
  for (int64_t i = 0; i < cfg.num_layers; ++i) {
    c.k.push_back(at::zeros({slots, cfg.num_kv_heads, max_tokens, cfg.head_dim}, options));
    c.v.push_back(at::zeros({slots, cfg.num_kv_heads, max_tokens, cfg.head_dim}, options));
  }
  c.lengths = at::zeros({slots}, options.dtype(at::kLong));
  // max_position 0: no dynamic-rope rescaling, which generation never reaches (context_length).
  c.inv_freq = rope_inv_freq(cfg, 0, options.device());
  return c;
}

int64_t kv_bytes_per_token(const ModelConfig& cfg, at::ScalarType dtype) {
  return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * int64_t(c10::elementSize(dtype));
}

void store_prompt(KvCache& c, int64_t layer, const at::Tensor& slots, const at::Tensor& k,
                  const at::Tensor& v) {
  const int64_t T = k.size(2);
  c.k[layer].narrow(2, 0, T).index_copy_(0, slots, k);
  c.v[layer].narrow(2, 0, T).index_copy_(0, slots, v);
}

void store_step(KvCache& c, int64_t layer, const at::Tensor& k, const at::Tensor& v) {
  const int64_t n = k.size(0);
  const auto index = c.lengths.narrow(0, 0, n).view({n, 1, 1, 1}).expand({n, k.size(1), 1, k.size(3)});
  c.k[layer].narrow(0, 0, n).scatter_(2, index, k);
  c.v[layer].narrow(0, 0, n).scatter_(2, index, v);
}

std::pair<at::Tensor, at::Tensor> cached_kv(const KvCache& c, int64_t layer, int64_t n, int64_t span) {
  return {c.k[layer].narrow(0, 0, n).narrow(2, 0, span), c.v[layer].narrow(0, 0, n).narrow(2, 0, span)};
}

}  // namespace aligner
