// CUDA kernels of the generation engine's decoding step (gen/cuda_decoder.cpp), on raw device
// pointers so that they compile without libtorch's headers; each returns its launch's error. Each
// has a reference in plain ATen (gen/engine.cpp's decode_step, gen/sampling.cpp) that tests
// compare it with.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace aligner::kernels {

enum class DType { kFloat32, kBFloat16, kFloat16 };

// One new token per slot b < batch: its key (rotated at position lengths[b]) and value go into the
// cache at that position, and each query head (rotated likewise) attends over the slot's cached
// positions [max(0, p - window + 1), p], p = lengths[b]. Rotary embedding is the rotate-half form
// of Llama-family models over each head's first rotary_dim dimensions (the rest pass through),
// angles position * inv_freq[i] in float32.
struct DecodeAttentionArgs {
  DType dtype;
  int batch, heads, kv_heads, head_dim;
  const void *q, *k, *v;  // [batch, heads * head_dim], [batch, kv_heads * head_dim] x 2, rows at *_stride
  int64_t q_stride, k_stride, v_stride;
  void *k_cache, *v_cache;  // [slots >= batch, kv_heads, max_tokens, head_dim], contiguous
  int64_t max_tokens;
  const int64_t* lengths;  // [batch]: the new token's position
  int rotary_dim;          // even, <= head_dim
  const float* inv_freq;   // [rotary_dim / 2]
  int64_t window;          // keys within this many positions (the token's own included); 0: all
  float scale;             // applied to the scores
  void* out;               // [batch, heads * head_dim], contiguous
};
bool decode_attention_supported(int head_dim);
cudaError_t decode_attention(const DecodeAttentionArgs& a, cudaStream_t stream);

// Chooses one token per row of logits [rows, vocab] and its log-probability, as gen/sampling.h
// defines them (temperature, then top-k with ties kept, then top-p, as transformers' warpers;
// greedy: the first maximum of the raw logits), by inverse-CDF sampling with the uniform
// stream_uniform(streams[slot], position of the token being chosen) (gen/sequence_stream.h).
struct SampleArgs {
  DType dtype;
  const void* logits;
  int rows, vocab;
  int64_t row_stride;
  const int64_t* slots;    // [rows]: each row's slot; nullptr: row i is slot i
  const int64_t* streams;  // [slots]: the sequence_stream of the sequence in the slot
  // [slots]: tokens in the slot's cache. With `advance` (a decoding step, which has just cached
  // the slot's previous token) each row's entry first grows by one, clamped to max_tokens - 1.
  int64_t* lengths;
  int64_t max_tokens;
  bool advance;
  int64_t* tokens;  // [slots]: the chosen token, written at the row's slot
  float* logprobs;  // [rows]: log_softmax of the raw logits (temperature 1, unfiltered) at it
  bool greedy;
  float temperature;
  int top_k;  // 0: off
  float top_p;
};
cudaError_t sample(const SampleArgs& a, cudaStream_t stream);

}  // namespace aligner::kernels
