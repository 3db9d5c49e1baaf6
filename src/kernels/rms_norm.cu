// The residual add and the RMSNorm that follows it, in one pass over the hidden state (a warp per
// row for 16-bit rows of up to 2048, else a block per row), and its backward pass (a block per row). Rounded
// as transformers rounds: the sum to the element type, the normalised value to the element type before the
// weight multiplies it.
#include <algorithm>
#include <type_traits>

#include "kernels/element.cuh"
#include "kernels/layer_kernels.h"

namespace aligner::kernels {
namespace {

constexpr int kThreads = 256;

constexpr int kKept = 4;  // packs of 8 a thread keeps in registers between passes over a row

// The sum of v over the block's threads, in every thread. `partial` is reusable once it returns.
__device__ inline float block_sum(float v, float* partial) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  float total = 0;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) total += partial[w];
  __syncthreads();
  return total;
}

// In the forward pass rows of up to kWarpCols 16-bit columns take a warp each, every lane holding
// its packs of the row in registers: all of a row's loads are in flight at once and no block-wide
// barrier waits on them. On a 1.1B model's rows of 2048 (H200) a block per row moved 2.4 TB/s, a
// warp 3.8. (The backward pass, tried the same way, was no faster than its block per row.)
constexpr int kRowWarps = 4, kWarpCols = 32 * 8 * 8;

__device__ inline float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__device__ inline Pack8<T> pack8(const float (&v)[8]) {
  alignas(16) T t[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) t[i] = from_float<T>(v[i]);
  return *reinterpret_cast<const Pack8<T>*>(t);
}

// add_rms_norm_kernel's arithmetic with a warp per row; lane l holds columns (p x 32 + l) x 8 + [0, 8).
template <typename T, int Packs>
__global__ void __launch_bounds__(kRowWarps * 32)
    add_rms_norm_warp_kernel(const T* x, const T* delta, int64_t delta_stride, const T* weight, float eps,
                             T* sum_out, T* out, float* rstd, int64_t rows, int cols) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kRowWarps + threadIdx.x / 32;
  if (row >= rows) return;
  const T* xr = x + row * cols;
  const T* dr = delta ? delta + row * delta_stride : nullptr;
  Pack8<T> xs[Packs], ds[Packs];
#pragma unroll
  for (int p = 0; p < Packs; ++p) {
    const int c = (p * 32 + lane) * 8;
    if (c >= cols) break;
    xs[p] = load8(xr + c);
    if (dr) ds[p] = load8(dr + c);
  }
  float sq = 0;
#pragma unroll
  for (int p = 0; p < Packs; ++p) {
    const int c = (p * 32 + lane) * 8;
    if (c >= cols) break;
    float v[8];
    unpack8(xs[p], v);
    if (dr) {
      float d[8];
      unpack8(ds[p], d);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] += d[i];
      xs[p] = pack8<T>(v);  // the sum rounded to T, as the norm then reads it
      unpack8(xs[p], v);
      *reinterpret_cast<Pack8<T>*>(sum_out + row * cols + c) = xs[p];
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) sq += v[i] * v[i];
  }
  const float scale = rsqrtf(warp_sum(sq) / float(cols) + eps);
  if (rstd && lane == 0) rstd[row] = scale;
#pragma unroll
  for (int p = 0; p < Packs; ++p) {
    const int c = (p * 32 + lane) * 8;
    if (c >= cols) break;
    float v[8], w[8], y[8];
    unpack8(xs[p], v);
    unpack8(load8(weight + c), w);
#pragma unroll
    for (int i = 0; i < 8; ++i) y[i] = w[i] * to_float(from_float<T>(v[i] * scale));
    *reinterpret_cast<Pack8<T>*>(out + row * cols + c) = pack8<T>(y);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    add_rms_norm_kernel(const T* x, const T* delta, int64_t delta_stride, const T* weight, float eps,
                        T* sum_out, T* out, float* rstd, int64_t /*rows: one per block*/, int cols) {
  __shared__ float partial[kThreads / 32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * cols;
  const T* dr = delta ? delta + row * delta_stride : nullptr;
  T* sr = dr ? sum_out + row * cols : nullptr;
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
      *reinterpret_cast<Pack8<T>*>(sr + c) = *reinterpret_cast<const Pack8<T>*>(s);
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) sum += v[i] * v[i];
#pragma unroll
    for (int k = 0; k < kKept; ++k)
      if (k == p)
#pragma unroll
        for (int i = 0; i < 8; ++i) kept[k][i] = v[i];
  }
  const float scale = rsqrtf(block_sum(sum, partial) / float(cols) + eps);
  if (rstd && threadIdx.x == 0) rstd[row] = scale;
  for (int c = threadIdx.x * 8, p = 0; c < cols; c += kThreads * 8, ++p) {
    float v[8], w[8];
    if (p < kKept) {
#pragma unroll
      for (int k = 0; k < kKept; ++k)
        if (k == p)
#pragma unroll
          for (int i = 0; i < 8; ++i) v[i] = kept[k][i];
    } else {
      unpack8(load8((sr ? sr : xr) + c), v);
    }
    unpack8(load8(weight + c), w);
    T y[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) y[i] = from_float<T>(w[i] * to_float(from_float<T>(v[i] * scale)));
    *reinterpret_cast<Pack8<T>*>(out + row * cols + c) = *reinterpret_cast<const Pack8<T>*>(y);
  }
}

// One block per row strided over the grid: grad_in of the row, and each thread's columns' share of
// grad_weight summed over the block's rows into workspace[block]. A thread keeps Packs packs of 8
// of a row in registers (cols <= kThreads x 8 x Packs), as few as the row needs.
template <typename T, int Packs>
__global__ void __launch_bounds__(kThreads)
    rms_norm_backward_kernel(const T* grad_out, const T* grad_sum, const T* sum, const T* weight,
                             const float* rstd, T* grad_in, float* workspace, int64_t rows, int cols) {
  __shared__ float partial[kThreads / 32];
  float dw[Packs][8] = {};
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const float r = rstd[row];
    float xhat[Packs][8], wdy[Packs][8], dot = 0;
#pragma unroll
    for (int p = 0; p < Packs; ++p) {
      const int c = (p * kThreads + threadIdx.x) * 8;
      if (c >= cols) break;
      float s[8], dy[8], w[8];
      unpack8(load8(sum + row * cols + c), s);
      unpack8(load8(grad_out + row * cols + c), dy);
      unpack8(load8(weight + c), w);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        xhat[p][i] = s[i] * r;
        wdy[p][i] = w[i] * dy[i];
        dot += wdy[p][i] * xhat[p][i];
        dw[p][i] += dy[i] * to_float(from_float<T>(xhat[p][i]));
      }
    }
    const float mean = block_sum(dot, partial) / float(cols);
#pragma unroll
    for (int p = 0; p < Packs; ++p) {
      const int c = (p * kThreads + threadIdx.x) * 8;
      if (c >= cols) break;
      float g[8] = {};
      if (grad_sum) unpack8(load8(grad_sum + row * cols + c), g);
      T y[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) y[i] = from_float<T>(g[i] + (wdy[p][i] - xhat[p][i] * mean) * r);
      *reinterpret_cast<Pack8<T>*>(grad_in + row * cols + c) = *reinterpret_cast<const Pack8<T>*>(y);
    }
  }
#pragma unroll
  for (int p = 0; p < Packs; ++p) {
    const int c = (p * kThreads + threadIdx.x) * 8;
    if (c >= cols) break;
#pragma unroll
    for (int i = 0; i < 8; ++i) workspace[int64_t(blockIdx.x) * cols + c + i] = dw[p][i];
  }
}

// grad_weight[c] = the sum over the blocks' partial sums: a block per 32 columns, whose 8 warps
// each sum every 8th partial of them (a warp reading 128 contiguous bytes), then one another's.
constexpr int kPartialCols = 32, kPartialLanes = 8;
template <typename T>
__global__ void sum_partials_kernel(const float* workspace, int blocks, int cols, T* grad_weight) {
  __shared__ float sums[kPartialLanes][kPartialCols];
  const int c = blockIdx.x * kPartialCols + threadIdx.x % kPartialCols, lane = threadIdx.x / kPartialCols;
  float total = 0;
  if (c < cols)
    for (int b = lane; b < blocks; b += kPartialLanes) total += workspace[int64_t(b) * cols + c];
  sums[lane][threadIdx.x % kPartialCols] = total;
  __syncthreads();
  if (lane != 0 || c >= cols) return;
  for (int l = 1; l < kPartialLanes; ++l) total += sums[l][threadIdx.x];
  grad_weight[c] = from_float<T>(total);
}

int64_t backward_blocks(int64_t rows) {
  return std::min<int64_t>(rows, 1024);
}

}  // namespace

int64_t rms_norm_backward_workspace(int64_t rows, int64_t cols) {
  return backward_blocks(rows) * cols;
}

cudaError_t rms_norm_backward(DType dtype, const void* grad_out, const void* grad_sum, const void* sum,
                              const void* weight, const float* rstd, void* grad_in, void* grad_weight,
                              float* workspace, int64_t rows, int64_t cols, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  cudaError_t err = cudaSuccess;
  dispatch(dtype, [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    static_assert(rms_norm_backward_max_cols == kThreads * 8 * kKept);
    if (cols % 8 != 0 || cols > rms_norm_backward_max_cols || !aligned8<T>(grad_out) ||
        !aligned8<T>(grad_sum) || !aligned8<T>(sum) || !aligned8<T>(weight) || !aligned8<T>(grad_in)) {
      err = cudaErrorInvalidValue;
      return;
    }
    const int blocks = int(backward_blocks(rows));
    const auto launch = [&](auto kernel) {
      kernel<<<blocks, kThreads, 0, stream>>>(
          static_cast<const T*>(grad_out), static_cast<const T*>(grad_sum), static_cast<const T*>(sum),
          static_cast<const T*>(weight), rstd, static_cast<T*>(grad_in), workspace, rows, int(cols));
    };
    const int64_t packs = (cols + kThreads * 8 - 1) / (kThreads * 8);
    if (packs == 1)
      launch(rms_norm_backward_kernel<T, 1>);
    else if (packs == 2)
      launch(rms_norm_backward_kernel<T, 2>);
    else
      launch(rms_norm_backward_kernel<T, kKept>);
    if (grad_weight)
      sum_partials_kernel<T>
          <<<unsigned((cols + kPartialCols - 1) / kPartialCols), kPartialCols * kPartialLanes, 0, stream>>>(
              workspace, blocks, int(cols), static_cast<T*>(grad_weight));
  });
  return err != cudaSuccess ? err : cudaGetLastError();
}

cudaError_t add_rms_norm(DType dtype, const void* x, const void* delta, int64_t delta_stride,
                         const void* weight, float eps, void* sum, void* out, float* rstd, int64_t rows,
                         int64_t cols, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  cudaError_t err = cudaSuccess;
  dispatch(dtype, [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    if (cols % 8 != 0 || delta_stride % 8 != 0 || !aligned8<T>(x) || !aligned8<T>(delta) ||
        !aligned8<T>(weight) || !aligned8<T>(sum) || !aligned8<T>(out) || (delta && !sum)) {
      err = cudaErrorInvalidValue;
      return;
    }
    const auto args = [&](auto kernel, unsigned blocks, int threads) {
      kernel<<<blocks, threads, 0, stream>>>(
          static_cast<const T*>(x), static_cast<const T*>(delta), delta_stride, static_cast<const T*>(weight),
          eps, static_cast<T*>(sum), static_cast<T*>(out), rstd, rows, int(cols));
    };
    const unsigned by_warp = unsigned((rows + kRowWarps - 1) / kRowWarps);
    const int64_t warp_packs = (cols + 255) / 256;
    if constexpr (sizeof(T) == 2) {
      if (cols <= kWarpCols) {
        if (warp_packs == 1)
          args(add_rms_norm_warp_kernel<T, 1>, by_warp, kRowWarps * 32);
        else if (warp_packs == 2)
          args(add_rms_norm_warp_kernel<T, 2>, by_warp, kRowWarps * 32);
        else if (warp_packs <= 4)
          args(add_rms_norm_warp_kernel<T, 4>, by_warp, kRowWarps * 32);
        else
          args(add_rms_norm_warp_kernel<T, 8>, by_warp, kRowWarps * 32);
        return;
      }
    }
    args(add_rms_norm_kernel<T>, unsigned(rows), kThreads);
  });
  return err != cudaSuccess ? err : cudaGetLastError();
}

}  // namespace aligner::kernels
