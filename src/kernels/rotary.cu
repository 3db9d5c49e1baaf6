// The rotary embedding of training and prefill in one pass, where ATen's rotate-half form takes six
// (negate, concatenate, two products, a sum, and a copy into the layout attention reads): a thread
// per pair of dimensions that turn together (or per eight pairs), writing the token-major layout
// flash attention reads.
#include <algorithm>
#include <type_traits>

#include "kernels/element.cuh"
#include "kernels/layer_kernels.h"

namespace aligner::kernels {
namespace {

template <typename T>
__global__ void rotary_kernel(RotaryArgs a, const T* x, const T* cos, const T* sin, T* out) {
  const int half_dim = a.head_dim / 2, half_rot = a.rotary_dim / 2;
  const int64_t n = a.batch * a.tokens * a.heads * half_dim;
  const float turn = a.inverse ? -1.f : 1.f;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int j = int(i % half_dim);
    const int64_t row = i / half_dim;  // (b, t, h)
    const int h = int(row % a.heads);
    const int64_t bt = row / a.heads, t = bt % a.tokens, b = bt / a.tokens;
    const T* xr = x + b * a.sb + t * a.st + h * a.sh;
    T* o = out + row * a.head_dim;
    if (j < half_rot) {
      // The two halves' angles are equal: one cos and sin serve the pair.
      const int64_t at = b * a.cb + t * a.ct + j;
      const float c = to_float(cos[at]), s = turn * to_float(sin[at]);
      const float x1 = to_float(xr[j]), x2 = to_float(xr[j + half_rot]);
      o[j] = from_float<T>(x1 * c - x2 * s);
      o[j + half_rot] = from_float<T>(x2 * c + x1 * s);
    } else {
      const int e = a.rotary_dim + 2 * (j - half_rot);
      o[e] = xr[e];
      o[e + 1] = xr[e + 1];
    }
  }
}

// The same where whole heads rotate, eight pairs a thread: 16-byte loads of each half of the head
// and of cos and sin (the launcher checks that the sizes and strides allow it).
template <typename T>
__global__ void rotary8_kernel(RotaryArgs a, const T* x, const T* cos, const T* sin, T* out) {
  const int packs = a.head_dim / 16;  // packs of 8 pairs in a head
  const int half = a.head_dim / 2;
  const int64_t n = a.batch * a.tokens * a.heads * packs;
  const float turn = a.inverse ? -1.f : 1.f;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int j = int(i % packs) * 8;
    const int64_t row = i / packs;
    const int h = int(row % a.heads);
    const int64_t bt = row / a.heads, t = bt % a.tokens, b = bt / a.tokens;
    const T* xr = x + b * a.sb + t * a.st + h * a.sh;
    const int64_t at = b * a.cb + t * a.ct + j;
    float x1[8], x2[8], c[8], s[8];
    unpack8(load8(xr + j), x1);
    unpack8(load8(xr + j + half), x2);
    unpack8(load8(cos + at), c);
    unpack8(load8(sin + at), s);
    T y1[8], y2[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      y1[k] = from_float<T>(x1[k] * c[k] - x2[k] * turn * s[k]);
      y2[k] = from_float<T>(x2[k] * c[k] + x1[k] * turn * s[k]);
    }
    T* o = out + row * a.head_dim;
    *reinterpret_cast<Pack8<T>*>(o + j) = *reinterpret_cast<const Pack8<T>*>(y1);
    *reinterpret_cast<Pack8<T>*>(o + j + half) = *reinterpret_cast<const Pack8<T>*>(y2);
  }
}

}  // namespace

cudaError_t rotary(const RotaryArgs& a, cudaStream_t stream) {
  const int64_t n = a.batch * a.tokens * a.heads * (a.head_dim / 2);
  if (n == 0) return cudaSuccess;
  if (a.head_dim % 2 != 0 || a.rotary_dim % 2 != 0 || a.rotary_dim > a.head_dim) return cudaErrorInvalidValue;
  dispatch(a.dtype, [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    const bool packed = a.rotary_dim == a.head_dim && a.head_dim % 16 == 0 && a.sb % 8 == 0 &&
                        a.st % 8 == 0 && a.sh % 8 == 0 && a.cb % 8 == 0 && a.ct % 8 == 0 &&
                        aligned8<T>(a.x) && aligned8<T>(a.cos) && aligned8<T>(a.sin) && aligned8<T>(a.out);
    const auto *x = static_cast<const T*>(a.x), *cos = static_cast<const T*>(a.cos),
               *sin = static_cast<const T*>(a.sin);
    if (packed)
      rotary8_kernel<T>
          <<<grid_blocks(n / 8), kGridThreads, 0, stream>>>(a, x, cos, sin, static_cast<T*>(a.out));
    else
      rotary_kernel<T><<<grid_blocks(n), kGridThreads, 0, stream>>>(a, x, cos, sin, static_cast<T*>(a.out));
  });
  return cudaGetLastError();
}

}  // namespace aligner::kernels
