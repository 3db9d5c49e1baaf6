// Attention of one new token per sequence over its KV cache, with the rotary embedding of the new
// query and key and the store of its key/value fused in: one kernel per layer where the ATen
// version runs about fifteen.
//
// One block per (sequence, KV head) serves the query heads that share the KV head (grouped-query
// attention; kGroup of them per pass), so each cached key and value is read from memory once per
// pass. Its warps take chunks of 32 keys in turn and never wait for each other until the end:
//   scores: a lane per key, its whole key row against the queries (in shared memory);
//   softmax: online per warp (running maximum and sum per head, as flash attention);
//   values:  a lane per 8 dimensions of a quarter of the chunk's keys (for head size 64), so that
//            a warp's loads are 16 bytes per lane over consecutive rows;
// and the warps' partial results are merged once in shared memory.
#include <cfloat>
#include <type_traits>

#include "kernels/element.cuh"

namespace aligner::kernels {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;

template <typename T, int D, int kGroup>
__global__ void __launch_bounds__(kThreads) decode_attention_kernel(DecodeAttentionArgs a) {
  constexpr int kLanesPerRow = D / 8;              // lanes sharing a value row, 8 dimensions each
  constexpr int kRowsPerLoad = 32 / kLanesPerRow;  // value rows a warp loads at once
  static_assert(D % 8 == 0 && kLanesPerRow <= 32, "head size");
  __shared__ float cos_s[D / 2], sin_s[D / 2];
  __shared__ __align__(16) float q_s[kGroup][D];
  __shared__ float p_s[kWarps][kGroup][32];
  __shared__ float m_s[kWarps][kGroup], l_s[kWarps][kGroup];
  __shared__ float acc_s[kWarps][kGroup][D];

  const int b = blockIdx.x, kvh = blockIdx.y, tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int group = a.heads / a.kv_heads;
  // Clamped as the ATen step clamps: a free slot's output is never read, but stays in bounds.
  const int64_t pos = min(max(a.lengths[b], int64_t(0)), a.max_tokens - 1);
  const int64_t first = a.window > 0 ? max(int64_t(0), pos - a.window + 1) : int64_t(0);
  const int64_t head_offset = (int64_t(b) * a.kv_heads + kvh) * a.max_tokens * D;
  T* kc = static_cast<T*>(a.k_cache) + head_offset;
  T* vc = static_cast<T*>(a.v_cache) + head_offset;

  for (int i = tid; i < D / 2; i += kThreads) sincosf(float(pos) * a.inv_freq[i], &sin_s[i], &cos_s[i]);
  __syncthreads();
  for (int i = tid; i < D / 2; i += kThreads) {
    const T* k = static_cast<const T*>(a.k) + b * a.k_stride + kvh * D;
    const float x0 = to_float(k[i]), x1 = to_float(k[i + D / 2]);
    kc[pos * D + i] = from_float<T>(x0 * cos_s[i] - x1 * sin_s[i]);
    kc[pos * D + i + D / 2] = from_float<T>(x1 * cos_s[i] + x0 * sin_s[i]);
  }
  for (int i = tid; i < D; i += kThreads)
    vc[pos * D + i] = static_cast<const T*>(a.v)[b * a.v_stride + kvh * D + i];

  const int row_in_load = lane / kLanesPerRow, dim0 = (lane % kLanesPerRow) * 8;
  for (int g0 = 0; g0 < group; g0 += kGroup) {
    const int heads = min(kGroup, group - g0);
    for (int i = tid; i < kGroup * (D / 2); i += kThreads) {
      const int g = i / (D / 2), d = i % (D / 2);
      float y0 = 0, y1 = 0;
      if (g < heads) {
        const T* q = static_cast<const T*>(a.q) + b * a.q_stride + (int64_t(kvh) * group + g0 + g) * D;
        const float x0 = to_float(q[d]), x1 = to_float(q[d + D / 2]);
        y0 = (x0 * cos_s[d] - x1 * sin_s[d]) * a.scale;
        y1 = (x1 * cos_s[d] + x0 * sin_s[d]) * a.scale;
      }
      q_s[g][d] = y0;
      q_s[g][d + D / 2] = y1;
    }
    // Also makes the new key and value stored above visible to the whole block.
    __syncthreads();

    float m[kGroup], l[kGroup], acc[kGroup][8];
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      m[g] = -INFINITY, l[g] = 0;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[g][i] = 0;
    }
    for (int64_t c0 = first + 32 * warp; c0 <= pos; c0 += 32 * kWarps) {
      // Scores of key c0 + lane.
      const int64_t j = c0 + lane;
      float s[kGroup];
#pragma unroll
      for (int g = 0; g < kGroup; ++g) s[g] = 0;
      if (j <= pos) {
        Pack8<T> kp[D / 8];
#pragma unroll
        for (int c = 0; c < D / 8; ++c) kp[c] = load8(kc + j * D + 8 * c);
#pragma unroll
        for (int c = 0; c < D / 8; ++c) {
          float k[8];
          unpack8(kp[c], k);
#pragma unroll
          for (int g = 0; g < kGroup; ++g) {
            const float4 qa = *reinterpret_cast<const float4*>(&q_s[g][8 * c]);
            const float4 qb = *reinterpret_cast<const float4*>(&q_s[g][8 * c + 4]);
            s[g] += qa.x * k[0] + qa.y * k[1] + qa.z * k[2] + qa.w * k[3] + qb.x * k[4] + qb.y * k[5] +
                    qb.z * k[6] + qb.w * k[7];
          }
        }
      }
      // Online softmax over the chunk; key c0 (lane 0) is always valid, so the maximum is finite.
#pragma unroll
      for (int g = 0; g < kGroup; ++g) {
        const float sg = j <= pos ? s[g] : -INFINITY;
        float mc = sg;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) mc = fmaxf(mc, __shfl_xor_sync(0xffffffffu, mc, o));
        const float m_new = fmaxf(m[g], mc);
        const float p = __expf(sg - m_new), alpha = __expf(m[g] - m_new);
        float sum = p;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
        l[g] = l[g] * alpha + sum;
        m[g] = m_new;
        p_s[warp][g][lane] = p;
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[g][i] *= alpha;
      }
      __syncwarp();
      // Values: rows c0 + r * kRowsPerLoad + row_in_load, this lane's 8 dimensions.
      Pack8<T> vp[kLanesPerRow];
#pragma unroll
      for (int r = 0; r < kLanesPerRow; ++r) {
        const int64_t jv = c0 + r * kRowsPerLoad + row_in_load;
        vp[r] = jv <= pos ? load8(vc + jv * D + dim0) : zero8<T>();
      }
#pragma unroll
      for (int r = 0; r < kLanesPerRow; ++r) {
        float v[8];
        unpack8(vp[r], v);
        const int jj = r * kRowsPerLoad + row_in_load;
#pragma unroll
        for (int g = 0; g < kGroup; ++g) {
          const float p = p_s[warp][g][jj];
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[g][i] += p * v[i];
        }
      }
      __syncwarp();  // the next chunk rewrites p_s
    }
    // The lanes sharing dimensions hold sums over different rows: add them up, then merge warps.
#pragma unroll
    for (int o = kLanesPerRow; o < 32; o <<= 1)
#pragma unroll
      for (int g = 0; g < kGroup; ++g)
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[g][i] += __shfl_xor_sync(0xffffffffu, acc[g][i], o);
    if (row_in_load == 0)
#pragma unroll
      for (int g = 0; g < kGroup; ++g)
#pragma unroll
        for (int i = 0; i < 8; ++i) acc_s[warp][g][dim0 + i] = acc[g][i];
    if (lane == 0)
#pragma unroll
      for (int g = 0; g < kGroup; ++g) m_s[warp][g] = m[g], l_s[warp][g] = l[g];
    __syncthreads();
    T* out = static_cast<T*>(a.out) + int64_t(b) * a.heads * D;
    for (int i = tid; i < heads * D; i += kThreads) {
      const int g = i / D, d = i % D;
      float mx = -INFINITY;
      for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, m_s[w][g]);
      float o = 0, norm = 0;
      for (int w = 0; w < kWarps; ++w) {
        const float e = m_s[w][g] == -INFINITY ? 0.f : __expf(m_s[w][g] - mx);  // a warp without keys
        o += e * acc_s[w][g][d];
        norm += e * l_s[w][g];
      }
      out[(int64_t(kvh) * group + g0 + g) * D + d] = from_float<T>(o / norm);
    }
    __syncthreads();  // the next group of heads reuses shared memory
  }
}

template <typename T, int D>
cudaError_t launch(const DecodeAttentionArgs& a, cudaStream_t stream) {
  const dim3 grid(a.batch, a.kv_heads);
  const int group = a.heads / a.kv_heads;
  if (group >= 8)
    decode_attention_kernel<T, D, 8><<<grid, kThreads, 0, stream>>>(a);
  else if (group >= 4)
    decode_attention_kernel<T, D, 4><<<grid, kThreads, 0, stream>>>(a);
  else if (group >= 2)
    decode_attention_kernel<T, D, 2><<<grid, kThreads, 0, stream>>>(a);
  else
    decode_attention_kernel<T, D, 1><<<grid, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

bool decode_attention_supported(int head_dim) {
  return head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 128;
}

cudaError_t decode_attention(const DecodeAttentionArgs& a, cudaStream_t stream) {
  cudaError_t err = cudaErrorInvalidValue;
  dispatch(a.dtype, [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    switch (a.head_dim) {
      case 16:
        err = launch<T, 16>(a, stream);
        break;
      case 32:
        err = launch<T, 32>(a, stream);
        break;
      case 64:
        err = launch<T, 64>(a, stream);
        break;
      case 128:
        err = launch<T, 128>(a, stream);
        break;
    }
  });
  return err;
}

}  // namespace aligner::kernels
