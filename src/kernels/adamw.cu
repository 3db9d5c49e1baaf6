// AdamW in one pass per tensor: each element's gradient, weight and moments are read once and the
// weight, moments and (for a master weight) the rounded parameter written once.
#include <algorithm>
#include <type_traits>

#include "kernels/element.cuh"
#include "kernels/optimizer_kernels.h"

namespace aligner::kernels {
namespace {

template <typename G, typename P>
__global__ void adamw_kernel(AdamWArgs a, const G* grad, P* param) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < a.n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float g = to_float(grad[i]);
    // Each line one of ATen's foreach operations, rounded where they round.
    float w = a.weight[i] * a.decay;
    float m = a.exp_avg[i] * a.beta1;
    m = m + a.one_minus_beta1 * g;
    float v = a.exp_avg_sq[i] * a.beta2;
    v = v + a.one_minus_beta2 * g * g;
    float denom = sqrtf(v);
    denom = denom / a.bias2_sqrt;
    denom = denom + a.eps;
    w = w + a.step_size * (m / denom);
    a.weight[i] = w;
    a.exp_avg[i] = m;
    a.exp_avg_sq[i] = v;
    if constexpr (!std::is_same_v<P, void>) param[i] = from_float<P>(w);
  }
}

}  // namespace

cudaError_t adamw_step(const AdamWArgs& a, cudaStream_t stream) {
  if (a.n == 0) return cudaSuccess;
  const int threads = 256;
  const int blocks = int(std::min<int64_t>((a.n + threads - 1) / threads, 132 * 16));
  dispatch(a.grad_dtype, [&](auto* g_type) {
    using G = std::remove_pointer_t<decltype(g_type)>;
    const auto* g = static_cast<const G*>(a.grad);
    if (a.param == nullptr) {
      adamw_kernel<G, void><<<blocks, threads, 0, stream>>>(a, g, nullptr);
      return;
    }
    dispatch(a.param_dtype, [&](auto* p_type) {
      using P = std::remove_pointer_t<decltype(p_type)>;
      adamw_kernel<G, P><<<blocks, threads, 0, stream>>>(a, g, static_cast<P*>(a.param));
    });
  });
  return cudaGetLastError();
}

}  // namespace aligner::kernels
