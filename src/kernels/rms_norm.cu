// The residual add and the RMSNorm that follows it, in one pass over the hidden state: a block
// per row. Rounded as transformers rounds: the sum to the element type, the normalised value to
// the element type before the weight multiplies it.
#include <type_traits>

#include "kernels/element.cuh"

namespace aligner::kernels {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    add_rms_norm_kernel(T* x, const T* delta, int64_t delta_stride, const T* weight, float eps, T* out,
                        int cols) {
  constexpr int kKept = 4;  // packs of 8 a thread keeps in registers between the passes
  __shared__ float partial[kThreads / 32];
  const int64_t row = blockIdx.x;
  T* xr = x + row * cols;
  const T* dr = delta ? delta + row * delta_stride : nullptr;
  // Eight elements at a time (the launcher checks that rows allow it).
  float kept[kKept][8], sum = 0;
  for (int c = threadIdx.x * 8, p = 0; c < cols; c += kThreads * 8, ++p) {
    float v[8];
    unpack8(load8(xr + c), v);
    if (dr) {
      float d[8];
      unpack8(load8(dr + c), d);
      T s[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) s[i] = from_float<T>(v[i] + d[i]), v[i] = to_float(s[i]);
      *reinterpret_cast<Pack8<T>*>(xr + c) = *reinterpret_cast<const Pack8<T>*>(s);
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) sum += v[i] * v[i];
#pragma unroll
    for (int k = 0; k < kKept; ++k)
      if (k == p)
#pragma unroll
        for (int i = 0; i < 8; ++i) kept[k][i] = v[i];
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = sum;
  __syncthreads();
  float total = 0;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) total += partial[w];
  const float scale = rsqrtf(total / float(cols) + eps);
  for (int c = threadIdx.x * 8, p = 0; c < cols; c += kThreads * 8, ++p) {
    float v[8], w[8];
    if (p < kKept) {
#pragma unroll
      for (int k = 0; k < kKept; ++k)
        if (k == p)
#pragma unroll
          for (int i = 0; i < 8; ++i) v[i] = kept[k][i];
    } else {
      unpack8(load8(xr + c), v);
    }
    unpack8(load8(weight + c), w);
    T y[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) y[i] = from_float<T>(w[i] * to_float(from_float<T>(v[i] * scale)));
    *reinterpret_cast<Pack8<T>*>(out + row * cols + c) = *reinterpret_cast<const Pack8<T>*>(y);
  }
}

}  // namespace

cudaError_t add_rms_norm(DType dtype, void* x, const void* delta, int64_t delta_stride, const void* weight,
                         float eps, void* out, int64_t rows, int64_t cols, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  cudaError_t err = cudaSuccess;
  dispatch(dtype, [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % sizeof(Pack8<T>) == 0; };
    if (cols % 8 != 0 || delta_stride % 8 != 0 || !aligned(x) || !aligned(delta) || !aligned(weight) ||
        !aligned(out)) {
      err = cudaErrorInvalidValue;
      return;
    }
    add_rms_norm_kernel<T><<<unsigned(rows), kThreads, 0, stream>>>(
        static_cast<T*>(x), static_cast<const T*>(delta), delta_stride, static_cast<const T*>(weight), eps,
        static_cast<T*>(out), int(cols));
  });
  return err != cudaSuccess ? err : cudaGetLastError();
}

}  // namespace aligner::kernels
