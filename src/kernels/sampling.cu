// Choosing the next token: one block per row of logits, each thread owning a contiguous run of the
// vocabulary. Everything is summed in a fixed order, so that a seed gives the same tokens on every
// run. The filters become one threshold on the ordered bit pattern of the scaled logits (keep a
// token iff its key is at least the threshold), found by bisection over the 2^32 keys:
//   top-k: the k-th largest key (ties with it kept);
//   top-p: the smallest key v at which the mass of kept tokens above v is less than top_p of the
//          kept mass, which keeps exactly the tokens that transformers' TopPLogitsWarper keeps
//          (it drops a token when the ascending cumulative mass up to it is at most 1 - top_p).
// The draw is inverse-CDF: a uniform times the kept mass, located by walking the per-thread sums.
#include <climits>
#include <type_traits>

#include "gen/sequence_stream.h"
#include "kernels/element.cuh"

namespace aligner::kernels {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;

__device__ inline uint32_t order_key(float f) {  // monotone: a < b iff key(a) < key(b)
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Block-wide sum or maximum, the same on every thread; the order of the additions is fixed.
template <typename V, typename Op>
__device__ V block_reduce(V x, Op op, V* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = op(x, __shfl_xor_sync(0xffffffffu, x, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = scratch[lane];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = op(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

struct Add {
  template <typename V>
  __device__ V operator()(V a, V b) const {
    return a + b;
  }
};
// (value, index) packed as key << 32 | ~index: the larger value wins, then the smaller index.
struct MaxU64 {
  __device__ unsigned long long operator()(unsigned long long a, unsigned long long b) const {
    return a > b ? a : b;
  }
};

// Calls f(i, x[i] as float) over a thread's run [begin, end) in order, 16 bytes per load where the
// run is aligned for it.
template <typename T, typename F>
__device__ inline void for_run(const T* x, int begin, int end, F&& f) {
  int i = begin;
  if (reinterpret_cast<uintptr_t>(x + i) % sizeof(Pack8<T>) == 0)
    for (; i + 8 <= end; i += 8) {
      float v[8];
      unpack8(load8(x + i), v);
#pragma unroll
      for (int k = 0; k < 8; ++k) f(i + k, v[k]);
    }
  for (; i < end; ++i) f(i, to_float(x[i]));
}

template <typename T>
__global__ void __launch_bounds__(kThreads) sample_kernel(SampleArgs a) {
  __shared__ float f_scratch[kWarps];
  __shared__ unsigned long long u_scratch[kWarps];
  __shared__ float thread_mass[kThreads];
  __shared__ float lane_mass[32];
  __shared__ int chosen_thread;
  __shared__ float residual;

  const int row = blockIdx.x, tid = threadIdx.x;
  const int64_t slot = a.slots ? a.slots[row] : row;
  const T* x = static_cast<const T*>(a.logits) + row * a.row_stride;
  const int per = (a.vocab + kThreads - 1) / kThreads;
  const int begin = min(tid * per, a.vocab), end = min(begin + per, a.vocab);

  // The raw distribution: its maximum (first index among equals, as argmax) and log-normaliser.
  unsigned long long best = 0;
  for_run(x, begin, end, [&](int i, float v) {
    const unsigned long long key = (static_cast<unsigned long long>(order_key(v)) << 32) |
                                   static_cast<uint32_t>(~static_cast<uint32_t>(i));
    best = key > best ? key : best;
  });
  best = block_reduce(best, MaxU64{}, u_scratch);
  const int argmax = int(~static_cast<uint32_t>(best & 0xffffffffu));
  const float raw_max = to_float(x[argmax]);
  float raw_mine = 0;
  for_run(x, begin, end, [&](int, float v) { raw_mine += __expf(v - raw_max); });
  const float log_norm = raw_max + logf(block_reduce(raw_mine, Add{}, f_scratch));

  int token = argmax;
  if (!a.greedy) {
    // Scaled logits z = x / temperature, and their weights exp(z - max z) (unnormalised).
    const float z_max = raw_max / a.temperature;
    uint32_t threshold = 0;
    if (a.top_k > 0 && a.top_k < a.vocab) {
      uint32_t lo = 0, hi = 0xffffffffu;  // count(key >= lo) >= top_k holds throughout
      while (lo < hi) {
        const uint32_t mid = lo + uint32_t((uint64_t(hi) - lo + 1) / 2);
        int count = 0;
        for_run(x, begin, end, [&](int, float v) { count += order_key(v / a.temperature) >= mid; });
        if (block_reduce(count, Add{}, reinterpret_cast<int*>(f_scratch)) >= a.top_k)
          lo = mid;
        else
          hi = mid - 1;
      }
      threshold = lo;
    }
    if (a.top_p < 1.f) {
      float kept = 0;
      for_run(x, begin, end, [&](int, float v) {
        const float z = v / a.temperature;
        if (order_key(z) >= threshold) kept += __expf(z - z_max);
      });
      const float bar = a.top_p * block_reduce(kept, Add{}, f_scratch);
      uint32_t lo = threshold, hi = 0xffffffffu;  // the answer is in [lo, hi]
      while (lo < hi) {
        const uint32_t mid = lo + (hi - lo) / 2;
        float above = 0;
        for_run(x, begin, end, [&](int, float v) {
          const float z = v / a.temperature;
          const uint32_t k = order_key(z);
          if (k >= threshold && k > mid) above += __expf(z - z_max);
        });
        if (block_reduce(above, Add{}, f_scratch) < bar)
          hi = mid;
        else
          lo = mid + 1;
      }
      threshold = lo;
    }

    // Unscaled and unfiltered, the weights are those of the normaliser: no second pass.
    float mine = 0;
    if (a.temperature == 1.f && threshold == 0)
      mine = raw_mine;
    else
      for_run(x, begin, end, [&](int, float v) {
        const float z = v / a.temperature;
        if (order_key(z) >= threshold) mine += __expf(z - z_max);
      });
    thread_mass[tid] = mine;
    __syncthreads();
    if (tid < 32) {
      float s = 0;
      for (int t = tid * 32; t < tid * 32 + 32; ++t) s += thread_mass[t];
      lane_mass[tid] = s;
    }
    __syncthreads();
    if (tid == 0) {
      // The position of the token being chosen: where the slot's cache ends (after this step's
      // token is counted, for a decoding step).
      int64_t position = a.lengths[slot];
      if (a.advance) a.lengths[slot] = min(position + 1, a.max_tokens - 1), position += 1;
      const float u = stream_uniform(uint64_t(a.streams[slot]), position);
      float total = 0;
      for (int l = 0; l < 32; ++l) total += lane_mass[l];
      // Walk down: the group of 32 threads, then the thread, whose mass the target falls in; the
      // last one with any mass where rounding leaves the target past the end.
      float r = u * total;
      int group = -1;
      for (int l = 0; l < 32; ++l) {
        if (lane_mass[l] <= 0) continue;
        group = l;
        if (r < lane_mass[l]) break;
        r -= lane_mass[l];
      }
      int t_hit = -1;
      for (int t = group * 32; t < group * 32 + 32; ++t) {
        if (thread_mass[t] <= 0) continue;
        t_hit = t;
        if (r < thread_mass[t]) break;
        r -= thread_mass[t];
      }
      chosen_thread = t_hit;
      residual = r;
    }
    __syncthreads();
    if (tid == chosen_thread) {
      float r = residual;
      bool found = false;
      for_run(x, begin, end, [&](int i, float v) {
        const float z = v / a.temperature;
        if (found || order_key(z) < threshold) return;
        token = i;
        const float w = __expf(z - z_max);
        if (r < w)
          found = true;
        else
          r -= w;
      });
      a.tokens[slot] = token;
      a.logprobs[row] = to_float(x[token]) - log_norm;
    }
  } else if (tid == 0) {
    if (a.advance) a.lengths[slot] = min(a.lengths[slot] + 1, a.max_tokens - 1);
    a.tokens[slot] = token;
    a.logprobs[row] = raw_max - log_norm;
  }
}

}  // namespace

cudaError_t sample(const SampleArgs& a, cudaStream_t stream) {
  dispatch(a.dtype, [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    sample_kernel<T><<<a.rows, kThreads, 0, stream>>>(a);
  });
  return cudaGetLastError();
}

}  // namespace aligner::kernels
