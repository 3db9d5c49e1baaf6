// log_softmax(logits)[target] per row in one pass over the logits in their own type, and its
// backward pass in one more, where ATen casts the logits to float32, keeps their float32
// log-softmax for the backward pass, and fills, scatters and casts a float32 gradient of them.
#include <cmath>
#include <type_traits>

#include "kernels/element.cuh"
#include "kernels/layer_kernels.h"

namespace aligner::kernels {
namespace {

constexpr int kRowThreads = 512;

// A running maximum m and sum s of exp(x - m), as one pass over a row builds it.
struct MaxSum {
  float m = -INFINITY, s = 0.f;
  __device__ void add(float x) {
    if (x > m) {
      s = s * expf(m - x) + 1.f;
      m = x;
    } else if (x != -INFINITY) {  // -inf - -inf would be NaN; exp(-inf) adds nothing
      s += expf(x - m);
    }
  }
  // Eight values with one rescale: the pack's maximum first, so that each value costs one exp and
  // none waits on the previous one's. A +inf logit makes the row NaN (inf - inf), as a second one
  // did through add(); either way the step's loss is not finite and its update is refused.
  __device__ void add8(const float (&f)[8]) {
    float top = f[0];
#pragma unroll
    for (int k = 1; k < 8; ++k) top = fmaxf(top, f[k]);
    if (top == -INFINITY) return;
    if (top > m) {
      s *= expf(m - top);
      m = top;
    }
    float e[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) e[k] = expf(f[k] - m);
    s += ((e[0] + e[1]) + (e[2] + e[3])) + ((e[4] + e[5]) + (e[6] + e[7]));
  }
  __device__ void merge(MaxSum o) {
    if (o.m == -INFINITY) return;
    if (m == -INFINITY) {
      *this = o;
      return;
    }
    const float top = fmaxf(m, o.m);
    s = s * expf(m - top) + o.s * expf(o.m - top);
    m = top;
  }
};

// The row's MaxSum over all of the block's threads.
__device__ MaxSum block_max_sum(MaxSum v) {
  __shared__ float ms[kRowThreads / 32], ss[kRowThreads / 32];
  for (int off = 16; off > 0; off /= 2) {
    MaxSum o;
    o.m = __shfl_xor_sync(0xffffffffu, v.m, off);
    o.s = __shfl_xor_sync(0xffffffffu, v.s, off);
    v.merge(o);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) ms[warp] = v.m, ss[warp] = v.s;
  __syncthreads();
  MaxSum all;
  for (int w = 0; w < int(blockDim.x / 32); ++w) {
    MaxSum o;
    o.m = ms[w], o.s = ss[w];
    all.merge(o);
  }
  return all;
}

template <typename T, bool kPacked>
__global__ void target_logprobs_kernel(const T* logits, const int64_t* targets, float* out, float* lse,
                                       int64_t vocab) {
  const T* x = logits + blockIdx.x * vocab;
  MaxSum v;
  if constexpr (kPacked) {
    // kInFlight packs loaded before any is summed: the loads overlap instead of each waiting on
    // the sum of the one before.
    constexpr int kInFlight = 4;
    const int64_t step = int64_t(blockDim.x) * 8;
    for (int64_t c0 = threadIdx.x * 8; c0 < vocab; c0 += step * kInFlight) {
      Pack8<T> p[kInFlight];
#pragma unroll
      for (int u = 0; u < kInFlight; ++u)
        if (c0 + u * step < vocab) p[u] = load8(x + c0 + u * step);
#pragma unroll
      for (int u = 0; u < kInFlight; ++u)
        if (c0 + u * step < vocab) {
          float f[8];
          unpack8(p[u], f);
          v.add8(f);
        }
    }
  } else {
    for (int64_t c = threadIdx.x; c < vocab; c += blockDim.x) v.add(to_float(x[c]));
  }
  const MaxSum all = block_max_sum(v);
  if (threadIdx.x != 0) return;
  const float z = all.m + logf(all.s);
  lse[blockIdx.x] = z;
  const int64_t t = targets[blockIdx.x];
  // A target past the vocabulary gives NaN (the step's loss, and so its update, is then refused).
  out[blockIdx.x] = t < 0 ? 0.f : t < vocab ? to_float(x[t]) - z : NAN;
}

// d/dx log_softmax(x)[t] x g = g (onehot(t) - softmax(x)), rounded once into the logits' type.
template <typename T, bool kPacked>
__global__ void target_logprobs_backward_kernel(const T* logits, const int64_t* targets, const float* lse,
                                                const float* grad, T* grad_logits, int64_t vocab) {
  const int64_t row = blockIdx.x, t = targets[row];
  const float g = t < 0 ? 0.f : grad[row], z = lse[row];
  const T* x = logits + row * vocab;
  T* d = grad_logits + row * vocab;
  if constexpr (kPacked) {
    for (int64_t c = threadIdx.x * 8; c < vocab; c += int64_t(blockDim.x) * 8) {
      float f[8];
      unpack8(load8(x + c), f);
      alignas(16) T o[8];
#pragma unroll
      for (int k = 0; k < 8; ++k) o[k] = from_float<T>((c + k == t ? g : 0.f) - g * expf(f[k] - z));
      *reinterpret_cast<Pack8<T>*>(d + c) = *reinterpret_cast<const Pack8<T>*>(o);
    }
  } else {
    for (int64_t c = threadIdx.x; c < vocab; c += blockDim.x)
      d[c] = from_float<T>((c == t ? g : 0.f) - g * expf(to_float(x[c]) - z));
  }
}

}  // namespace

cudaError_t target_logprobs(DType dtype, const void* logits, const int64_t* targets, float* out, float* lse,
                            int64_t rows, int64_t vocab, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  dispatch(dtype, [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    const auto* x = static_cast<const T*>(logits);
    if (vocab % 8 == 0 && aligned8<T>(x))
      target_logprobs_kernel<T, true><<<rows, kRowThreads, 0, stream>>>(x, targets, out, lse, vocab);
    else
      target_logprobs_kernel<T, false><<<rows, kRowThreads, 0, stream>>>(x, targets, out, lse, vocab);
  });
  return cudaGetLastError();
}

cudaError_t target_logprobs_backward(DType dtype, const void* logits, const int64_t* targets,
                                     const float* lse, const float* grad, void* grad_logits, int64_t rows,
                                     int64_t vocab, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  dispatch(dtype, [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    const auto* x = static_cast<const T*>(logits);
    auto* d = static_cast<T*>(grad_logits);
    if (vocab % 8 == 0 && aligned8<T>(x) && aligned8<T>(d))
      target_logprobs_backward_kernel<T, true>
          <<<rows, kRowThreads, 0, stream>>>(x, targets, lse, grad, d, vocab);
    else
      target_logprobs_backward_kernel<T, false>
          <<<rows, kRowThreads, 0, stream>>>(x, targets, lse, grad, d, vocab);
  });
  return cudaGetLastError();
}

}  // namespace aligner::kernels
