// AdamW in one pass per tensor: each element's gradient, weight and moments are read once and the
// weight, moments and (for a master weight) the rounded parameter written once, four elements a
// thread in 16-byte loads where the tensors are aligned for them.
#include <algorithm>
#include <type_traits>

#include "kernels/element.cuh"
#include "kernels/optimizer_kernels.h"

namespace aligner::kernels {
namespace {

// Each line one of ATen's foreach operations, rounded where they round, but the clipped gradient:
// ATen's clipping rounds g x grad_scale into the gradient's type, here it stays in float32.
__device__ inline void adamw_update(const AdamWArgs& a, float g, float& w, float& m, float& v) {
  g = g * a.grad_scale;
  w = w * a.decay;
  m = m * a.beta1;
  m = m + a.one_minus_beta1 * g;
  v = v * a.beta2;
  v = v + a.one_minus_beta2 * g * g;
  float denom = sqrtf(v);
  denom = denom / a.bias2_sqrt;
  denom = denom + a.eps;
  w = w + a.step_size * (m / denom);
}

template <typename G, typename P>
__global__ void adamw_kernel(AdamWArgs a, const G* grad, P* param) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < a.n;
       i += int64_t(gridDim.x) * blockDim.x) {
    float w = a.weight[i], m = a.exp_avg[i], v = a.exp_avg_sq[i];
    adamw_update(a, to_float(grad[i]), w, m, v);
    a.weight[i] = w;
    a.exp_avg[i] = m;
    a.exp_avg_sq[i] = v;
    if constexpr (!std::is_same_v<P, void>) param[i] = from_float<P>(w);
  }
}

// Four elements of T as one load or store: 16 bytes of float, 8 of a 16-bit type.
template <typename T>
struct alignas(4 * sizeof(T)) Quad {
  T x[4];
};

template <typename G, typename P>
__global__ void adamw4_kernel(AdamWArgs a, const G* grad, P* param) {
  const int64_t quads = a.n / 4;
  for (int64_t q = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; q < quads;
       q += int64_t(gridDim.x) * blockDim.x) {
    const Quad<G> g = reinterpret_cast<const Quad<G>*>(grad)[q];
    Quad<float> w = reinterpret_cast<const Quad<float>*>(a.weight)[q];
    Quad<float> m = reinterpret_cast<const Quad<float>*>(a.exp_avg)[q];
    Quad<float> v = reinterpret_cast<const Quad<float>*>(a.exp_avg_sq)[q];
#pragma unroll
    for (int k = 0; k < 4; ++k) adamw_update(a, to_float(g.x[k]), w.x[k], m.x[k], v.x[k]);
    reinterpret_cast<Quad<float>*>(a.weight)[q] = w;
    reinterpret_cast<Quad<float>*>(a.exp_avg)[q] = m;
    reinterpret_cast<Quad<float>*>(a.exp_avg_sq)[q] = v;
    if constexpr (!std::is_same_v<P, void>) {
      Quad<P> p;
#pragma unroll
      for (int k = 0; k < 4; ++k) p.x[k] = from_float<P>(w.x[k]);
      reinterpret_cast<Quad<P>*>(param)[q] = p;
    }
  }
}

template <typename T>
bool aligned4(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % sizeof(Quad<T>) == 0;
}

template <typename G, typename P>
void launch(const AdamWArgs& a, const G* g, P* p, cudaStream_t stream) {
  const int threads = 256;
  bool quads = a.n % 4 == 0 && aligned4<G>(g) && aligned4<float>(a.weight) && aligned4<float>(a.exp_avg) &&
               aligned4<float>(a.exp_avg_sq);
  if constexpr (!std::is_same_v<P, void>) quads = quads && aligned4<P>(p);
  const int64_t items = quads ? a.n / 4 : a.n;
  const int blocks = int(std::min<int64_t>((items + threads - 1) / threads, 132 * 16));
  if (quads)
    adamw4_kernel<G, P><<<blocks, threads, 0, stream>>>(a, g, p);
  else
    adamw_kernel<G, P><<<blocks, threads, 0, stream>>>(a, g, p);
}

}  // namespace

cudaError_t adamw_step(const AdamWArgs& a, cudaStream_t stream) {
  if (a.n == 0) return cudaSuccess;
  dispatch(a.grad_dtype, [&](auto* g_type) {
    using G = std::remove_pointer_t<decltype(g_type)>;
    const auto* g = static_cast<const G*>(a.grad);
    if (a.param == nullptr) {
      launch<G, void>(a, g, nullptr, stream);
      return;
    }
    dispatch(a.param_dtype, [&](auto* p_type) {
      using P = std::remove_pointer_t<decltype(p_type)>;
      launch<G, P>(a, g, static_cast<P*>(a.param), stream);
    });
  });
  return cudaGetLastError();
}

}  // namespace aligner::kernels
