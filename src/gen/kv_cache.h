// Keys and values of past tokens for decoding, one row ("slot") per sequence being generated.
// Allocated once at full size for the batch, so that no step allocates or copies the cache, and a
// finished sequence's slot is reused by the next prompt (continuous batching).
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "model/config.h"

namespace aligner {

struct KvCache {
  std::vector<at::Tensor> k, v;  // per layer [slots, kv_heads, max_tokens, head_dim], after RoPE
  // [slots] int64 on the cache's device: tokens cached per slot, which is also the position of the
  // slot's next token. Kept on the device so that a decoding step needs nothing from the host.
  at::Tensor lengths;
  // [head_dim / 2] float32 rotary inverse frequencies (rope_inv_freq), made once: recomputing them
  // per step would copy from the host each time.
  at::Tensor inv_freq;
};

// Zero-filled (a slot that holds no sequence still takes part in the batched step, and must not
// read uninitialised memory that could be NaN), in `options`' dtype and device.
KvCache allocate_kv_cache(const ModelConfig& cfg, int64_t slots, int64_t max_tokens,
                          const at::TensorOptions& options);
// Bytes of keys and values that one cached token takes, over all layers.
int64_t kv_bytes_per_token(const ModelConfig& cfg, at::ScalarType dtype);
inline int64_t kv_slots(const KvCache& c) {
  return c.lengths.size(0);
}
inline int64_t kv_max_tokens(const KvCache& c) {
  return c.k.front().size(2);
}

// Stores keys/values [n, kv_heads, T, head_dim] of positions [0, T) of row i in slot slots[i] (the
// prompt of a prefill). Positions past a slot's length are never attended to, so padding stored
// there does no harm.
void store_prompt(KvCache& c, int64_t layer, const at::Tensor& slots, const at::Tensor& k,
                  const at::Tensor& v);
// Stores one key/value [n, kv_heads, 1, head_dim] for each slot in [0, n), at the slot's length.
void store_step(KvCache& c, int64_t layer, const at::Tensor& k, const at::Tensor& v);
// Keys and values of slots [0, n), positions [0, span): views into the cache, no copy.
std::pair<at::Tensor, at::Tensor> cached_kv(const KvCache& c, int64_t layer, int64_t n, int64_t span);

}  // namespace aligner
