// Attention of one new token per sequence over its KV cache, with the rotary embedding of the new
// query and key and the store of its key/value fused in: one kernel per layer where the ATen
// version runs about fifteen.
//
// One block per (sequence, KV head) serves the query heads that share the KV head (grouped-query
// attention; kGroup of them per pass), so each cached key and value is read from memory once per
// pass. Its warps take chunks of 32 keys in turn and never wait for each other until the end:
//   scores: a lane per key, its whole key row against the queries (in shared memory);
//   softmax: online per warp (running maximum and sum per head, as flash attention);
//   values:  a lane per D / 32 dimensions of every row, so that a warp reads whole rows;
// and the warps' partial results are merged once in shared memory.
#include <cfloat>
#include <type_traits>

#include "kernels/element.cuh"

namespace aligner::kernels {
namespace {

constexpr int kWarps = 2;  // measured best of 1, 2, 4 and 8 on the H100 (bench/generate_bench.py)

// E consecutive elements as float32 in one load (zeros for a null row).
template <int E, typename T>
__device__ inline void load_dims(const T* p, float (&v)[E]) {
  struct alignas(sizeof(T) * E) Vec {
    T x[E];
  };
  if (!p) {
#pragma unroll
    for (int e = 0; e < E; ++e) v[e] = 0;
    return;
  }
  const Vec r = *reinterpret_cast<const Vec*>(p);
#pragma unroll
  for (int e = 0; e < E; ++e) v[e] = to_float(r.x[e]);
}
constexpr int kThreads = 32 * kWarps;

// Tensor cores (mma.sync m16n8k16, 16-bit inputs, float32 accumulation), for 16-bit caches.
__device__ inline uint16_t bits16(__nv_bfloat16 x) {
  return __bfloat16_as_ushort(x);
}
__device__ inline uint16_t bits16(__half x) {
  return __half_as_ushort(x);
}
template <typename T>
__device__ inline uint32_t pack2(T lo, T hi) {  // the first element in the low half, as mma reads pairs
  return uint32_t(bits16(lo)) | (uint32_t(bits16(hi)) << 16);
}
template <typename T>
__device__ inline uint32_t pack2(float lo, float hi) {
  return pack2(from_float<T>(lo), from_float<T>(hi));
}
template <typename T>
__device__ inline void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <typename T, int D, int kGroup>
__global__ void __launch_bounds__(kThreads) decode_attention_kernel(DecodeAttentionArgs a) {
  constexpr bool kTensorCores = !std::is_same_v<T, float>;
  static_assert(!kTensorCores || kGroup == 8, "tensor-core tiles take 8 heads");
  constexpr int kDims = D >= 32 ? D / 32 : 1;  // value dimensions per lane
  static_assert(D % 8 == 0 && D <= 128, "head size");
  __shared__ float cos_s[D / 2], sin_s[D / 2];
  __shared__ __align__(16) float q_s[kGroup][D];
  __shared__ __align__(16) float p_s[kTensorCores ? 1 : kWarps][kGroup][32];
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

  // Dimension i < R pairs with i +- R / 2 (rotate-half over the first R); the rest pass through.
  const int R = a.rotary_dim, half = R / 2;
  for (int i = tid; i < half; i += kThreads) sincosf(float(pos) * a.inv_freq[i], &sin_s[i], &cos_s[i]);
  __syncthreads();
  const auto rotated = [&](const T* x, int i) {
    if (i >= R) return to_float(x[i]);
    if (i < half) return to_float(x[i]) * cos_s[i] - to_float(x[i + half]) * sin_s[i];
    return to_float(x[i]) * cos_s[i - half] + to_float(x[i - half]) * sin_s[i - half];
  };
  for (int i = tid; i < D; i += kThreads)
    kc[pos * D + i] = from_float<T>(rotated(static_cast<const T*>(a.k) + b * a.k_stride + kvh * D, i));
  for (int i = tid; i < D; i += kThreads)
    vc[pos * D + i] = static_cast<const T*>(a.v)[b * a.v_stride + kvh * D + i];

  const int dim0 = lane * kDims;
  for (int g0 = 0; g0 < group; g0 += kGroup) {
    const int heads = min(kGroup, group - g0);
    for (int i = tid; i < kGroup * D; i += kThreads) {
      const int g = i / D, d = i % D;
      const T* q = static_cast<const T*>(a.q) + b * a.q_stride + (int64_t(kvh) * group + g0 + g) * D;
      q_s[g][d] = g < heads ? rotated(q, d) * a.scale : 0.f;
    }
    // Also makes the new key and value stored above visible to the whole block.
    __syncthreads();

    if constexpr (kTensorCores) {
      // Heads are the rows of the 16 x 8 tiles (rows 8-15 unused), keys the columns of the scores
      // and the rows of the values; the scores' accumulators are laid out as the next product's
      // operand, so the probabilities never leave registers. A lane holds head `row`'s scores for
      // keys 8 n + 2 col + {0, 1}, and its outputs for dimensions 8 n + 2 col + {0, 1}.
      const int row = lane / 4, col = lane % 4;
      uint32_t qf[D / 16][2];
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) {
        qf[ks][0] = pack2<T>(q_s[row][ks * 16 + col * 2], q_s[row][ks * 16 + col * 2 + 1]);
        qf[ks][1] = pack2<T>(q_s[row][ks * 16 + 8 + col * 2], q_s[row][ks * 16 + 8 + col * 2 + 1]);
      }
      float m = -INFINITY, l = 0, o[D / 8][4];
#pragma unroll
      for (int n = 0; n < D / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[n][e] = 0;
      const T zero = from_float<T>(0.f);
      for (int64_t c0 = first + 32 * warp; c0 <= pos; c0 += 32 * kWarps) {
        uint32_t kf[4][D / 16][2];
#pragma unroll
        for (int n = 0; n < 4; ++n) {
          const int64_t key = c0 + n * 8 + row;
#pragma unroll
          for (int ks = 0; ks < D / 16; ++ks) {
            const T* k = kc + key * D + ks * 16 + col * 2;
            kf[n][ks][0] = key <= pos ? *reinterpret_cast<const uint32_t*>(k) : 0u;
            kf[n][ks][1] = key <= pos ? *reinterpret_cast<const uint32_t*>(k + 8) : 0u;
          }
        }
        float s[4][4], mc = -INFINITY;
#pragma unroll
        for (int n = 0; n < 4; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) s[n][e] = 0;
#pragma unroll
          for (int ks = 0; ks < D / 16; ++ks)
            mma16816<T>(s[n], {qf[ks][0], 0u, qf[ks][1], 0u}, kf[n][ks][0], kf[n][ks][1]);
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            if (c0 + n * 8 + col * 2 + j > pos) s[n][j] = -INFINITY;
            mc = fmaxf(mc, s[n][j]);
          }
        }
        // Online softmax for head `row`, whose chunk is spread over the four lanes of a quad; key
        // c0 is always valid, so the maximum is finite.
        mc = fmaxf(mc, __shfl_xor_sync(0xffffffffu, mc, 1));
        mc = fmaxf(mc, __shfl_xor_sync(0xffffffffu, mc, 2));
        const float m_new = fmaxf(m, mc), alpha = __expf(m - m_new);
        float sum = 0;
        uint32_t pf[2][4];
#pragma unroll
        for (int kk = 0; kk < 2; ++kk) {
          float p[2][2];
#pragma unroll
          for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int j = 0; j < 2; ++j) sum += p[h][j] = __expf(s[2 * kk + h][j] - m_new);
          pf[kk][0] = pack2<T>(p[0][0], p[0][1]);
          pf[kk][1] = 0u;
          pf[kk][2] = pack2<T>(p[1][0], p[1][1]);
          pf[kk][3] = 0u;
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        l = l * alpha + sum;
        m = m_new;
#pragma unroll
        for (int n = 0; n < D / 8; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) o[n][e] *= alpha;
            // Values: keys c0 + 16 kk + 2 col + {0, 1} (+ 8) by dimension 8 n + row, zero past pos.
#pragma unroll
        for (int kk = 0; kk < 2; ++kk) {
          const int64_t k0 = c0 + kk * 16 + col * 2;
#pragma unroll
          for (int n = 0; n < D / 8; ++n) {
            const T* v = vc + k0 * D + n * 8 + row;
            const uint32_t b0 = pack2<T>(k0 <= pos ? v[0] : zero, k0 + 1 <= pos ? v[D] : zero);
            const uint32_t b1 = pack2<T>(k0 + 8 <= pos ? v[8 * D] : zero, k0 + 9 <= pos ? v[9 * D] : zero);
            mma16816<T>(o[n], pf[kk], b0, b1);
          }
        }
      }
#pragma unroll
      for (int n = 0; n < D / 8; ++n)
#pragma unroll
        for (int j = 0; j < 2; ++j) acc_s[warp][row][n * 8 + col * 2 + j] = o[n][j];
      if (col == 0) m_s[warp][row] = m, l_s[warp][row] = l;
    } else {
      float m[kGroup], l[kGroup], acc[kGroup][kDims];
#pragma unroll
      for (int g = 0; g < kGroup; ++g) {
        m[g] = -INFINITY, l[g] = 0;
#pragma unroll
        for (int e = 0; e < kDims; ++e) acc[g][e] = 0;
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
          for (int e = 0; e < kDims; ++e) acc[g][e] *= alpha;
        }
        __syncwarp();
        // Values: every row of the chunk, this lane's kDims dimensions.
        const int rows = int(min(int64_t(32), pos - c0 + 1));
        if (lane < D / kDims)
          for (int r0 = 0; r0 < rows; r0 += 8) {
            float v[8][kDims];
#pragma unroll
            for (int r = 0; r < 8; ++r)
              load_dims<kDims>(r0 + r < rows ? vc + (c0 + r0 + r) * D + dim0 : nullptr, v[r]);
#pragma unroll
            for (int g = 0; g < kGroup; ++g) {
              const float4 pa = *reinterpret_cast<const float4*>(&p_s[warp][g][r0]);
              const float4 pb = *reinterpret_cast<const float4*>(&p_s[warp][g][r0 + 4]);
              const float p[8] = {pa.x, pa.y, pa.z, pa.w, pb.x, pb.y, pb.z, pb.w};
#pragma unroll
              for (int r = 0; r < 8; ++r)
#pragma unroll
                for (int e = 0; e < kDims; ++e) acc[g][e] += p[r] * v[r][e];
            }
          }
        __syncwarp();  // the next chunk rewrites p_s
      }
      if (lane < D / kDims)
#pragma unroll
        for (int g = 0; g < kGroup; ++g)
#pragma unroll
          for (int e = 0; e < kDims; ++e) acc_s[warp][g][dim0 + e] = acc[g][e];
      if (lane == 0)
#pragma unroll
        for (int g = 0; g < kGroup; ++g) m_s[warp][g] = m[g], l_s[warp][g] = l[g];
    }
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
  if constexpr (!std::is_same_v<T, float>)
    decode_attention_kernel<T, D, 8><<<grid, kThreads, 0, stream>>>(a);
  else if (group >= 8)
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
