// The one place where differences between libtorch versions live: Debian's 1.13 on CPU and the
// 2.x inside PyTorch on the GPU machine.
#pragma once
#include <ATen/ATen.h>
#include <torch/version.h>
#ifdef ALIGNER_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#endif

#include <cmath>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <vector>

#define ALIGNER_TORCH_2 (TORCH_VERSION_MAJOR >= 2)
#define ALIGNER_TORCH_2_5 (TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 5))

namespace aligner::compat {

// Scaled dot-product attention over [B, H, T, D] tensors. `mask` is boolean (true = may attend)
// and broadcastable to [B, H, Tq, Tk]. Key/value may have fewer heads than the query (grouped
// query attention): query head h reads key/value head h / (H / Hkv), as transformers' repeat_kv.
// On torch 2.x this reaches the fused kernels (flash when there is no mask); 1.13 has no public
// fused op, so the math is written out, in the same order as PyTorch's reference implementation.
inline at::Tensor repeat_kv(const at::Tensor& x, int64_t groups) {
  if (groups == 1) return x;
  const auto B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3);
  return x.unsqueeze(2).expand({B, H, groups, T, D}).reshape({B, H * groups, T, D});
}

// Which shapes of causal, unmasked attention on a GPU take cuDNN's kernel. Plain causal rows are its
// best case on Hopper (the 1.1B step's 22 layers: 15 ms a step less than flash attention, sft_bench
// 241 -> 226 ms on an H200), but it builds an execution plan for every new shape, ~110 ms of host
// time (bench/attention_bench.py). A shape goes to cuDNN once the time flash attention has lost on
// it in training passes would have paid for the plan (ski rental): rows of one length, as
// fixed-length training repeats them, switch within a few steps, and lengths that vary from batch to
// batch never cost more than about twice the better choice. The switch takes effect between
// training steps (choose_attention_kernels), so that every pass of a step (the forward, recomputed
// layers, PPO's old log-probs and its first update) runs one kernel.
struct CudnnAttentionShapes {
  std::mutex mutex;
  std::map<std::vector<int64_t>, double> lost;  // per shape: ms flash attention has cost extra
  std::set<std::vector<int64_t>> taken;
};

inline CudnnAttentionShapes& cudnn_attention_shapes() {
  static CudnnAttentionShapes shapes;
  return shapes;
}

#if ALIGNER_TORCH_2_5
inline bool cudnn_attention_takes(const at::Tensor& q, const at::Tensor& k, bool training) {
  constexpr double kSavedMsPerFlop = 15.0 / (22 * 4.81e11);  // the step above: 15 ms over 22 layer calls
  std::vector<int64_t> shape = q.sizes().vec();
  shape.insert(shape.end(), {k.size(1), k.size(2), int64_t(q.scalar_type())});
  auto& s = cudnn_attention_shapes();
  std::lock_guard<std::mutex> lock(s.mutex);
  if (s.taken.count(shape)) return true;
  // Forward (2 matmuls over the causal half of the scores) and backward (2.5 forwards).
  if (training)
    s.lost[shape] += kSavedMsPerFlop * 7.0 * double(q.size(0) * q.size(1)) * double(q.size(2) * k.size(2)) *
                     double(q.size(3));
  return false;
}
#endif

// Called by the trainer before each step: shapes whose lost time has paid for a plan take cuDNN's
// attention from this step on.
inline void choose_attention_kernels() {
  constexpr double kPlanMs = 110;
  auto& s = cudnn_attention_shapes();
  std::lock_guard<std::mutex> lock(s.mutex);
  for (const auto& [shape, ms] : s.lost)
    if (ms >= kPlanMs) s.taken.insert(shape);
}

inline at::Tensor sdpa(const at::Tensor& q, const at::Tensor& k_in, const at::Tensor& v_in,
                       const std::optional<at::Tensor>& mask, bool is_causal, double scale) {
  const int64_t groups = q.size(1) / k_in.size(1);
#if ALIGNER_TORCH_2_5
  // With a mask torch picks cuDNN's attention on Hopper, which builds its execution plan on the host
  // at every call (~25 ms a layer, measured with scripts/profile_train.py: three quarters of an SFT
  // step on packed rows). The memory-efficient kernel takes the same masks without that, but not
  // grouped key/value heads (those it leaves to the unfused math): they are repeated for it.
  // Never in deterministic runs: cuDNN's attention backward pass is not deterministic, and torch
  // only warns of it.
  at::globalContext().setSDPUseCuDNN(!mask && is_causal && q.is_cuda() &&
                                     !at::globalContext().deterministicAlgorithms() &&
                                     cudnn_attention_takes(q, k_in, at::GradMode::is_enabled()));
  if (mask && groups > 1)
    return at::scaled_dot_product_attention(q, repeat_kv(k_in, groups), repeat_kv(v_in, groups), mask, 0.0,
                                            is_causal, scale);
  return at::scaled_dot_product_attention(q, k_in, v_in, mask, 0.0, is_causal, scale,
                                          /*enable_gqa=*/groups > 1);
#elif ALIGNER_TORCH_2
  return at::scaled_dot_product_attention(q, repeat_kv(k_in, groups), repeat_kv(v_in, groups), mask, 0.0,
                                          is_causal, scale);
#else
  auto k = repeat_kv(k_in, groups), v = repeat_kv(v_in, groups);
  auto scores = at::matmul(q, k.transpose(-2, -1)) * scale;
  if (is_causal) {
    auto causal = at::ones({q.size(-2), k.size(-2)}, q.options().dtype(at::kBool)).tril();
    scores = scores.masked_fill(causal.logical_not(), -INFINITY);
  }
  if (mask) scores = scores.masked_fill(mask->logical_not(), -INFINITY);
  return at::matmul(at::softmax(scores, -1), v);
#endif
}

// Causal attention within each of several sequences packed into one run of tokens ("varlen" flash
// attention): q [N, H, D], k and v [N, Hkv, D] (Hkv dividing H), the sequences given by int32 offsets
// cu_seqlens [S + 1] into the N tokens, the longest max_len long. It never builds a [T, T] mask and
// skips the blocks two sequences would share. Torch 2.5+ on CUDA in half precision and head sizes
// flash takes; elsewhere callers use sdpa with a block-diagonal mask.
inline bool has_varlen_attention(const at::Tensor& like, int64_t head_dim) {
#if ALIGNER_TORCH_2_5 && defined(ALIGNER_WITH_CUDA)
  return like.is_cuda() && (like.scalar_type() == at::kBFloat16 || like.scalar_type() == at::kHalf) &&
         head_dim % 8 == 0 && head_dim <= 256 && at::cuda::getDeviceProperties(like.get_device())->major >= 8;
#else
  (void)like, (void)head_dim;
  return false;
#endif
}

inline at::Tensor varlen_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& cu_seqlens, int64_t max_len, double scale) {
#if ALIGNER_TORCH_2_5 && defined(ALIGNER_WITH_CUDA)
  return std::get<0>(at::_flash_attention_forward(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, 0.0,
                                                  /*is_causal=*/true, /*return_debug_mask=*/false, scale));
#else
  (void)q, (void)k, (void)v, (void)cu_seqlens, (void)max_len, (void)scale;
  TORCH_CHECK(false, "varlen attention needs torch 2.5+ with CUDA (see has_varlen_attention)");
#endif
}

// RMSNorm as transformers' LlamaRMSNorm computes it: normalise in float32, then scale. Torch 2.8+
// has a fused kernel (one read, one write); older versions get the same math op by op, rounding
// to the input dtype before the scale exactly as transformers does.
inline at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
  if (x.is_cuda()) return at::rms_norm(x, {x.size(-1)}, weight, eps);
#endif
  auto xf = x.to(at::promote_types(x.scalar_type(), at::kFloat));  // float64 stays float64
  auto normed = xf * at::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return weight * normed.to(x.scalar_type());
}

// Each tensor's L2 norm in float32 (accumulated in float32 also for bf16/fp16 tensors): one
// multi-tensor kernel in torch 2.5+, a reduction per tensor before.
inline std::vector<at::Tensor> float_norms(const std::vector<at::Tensor>& ts) {
#if ALIGNER_TORCH_2_5
  return at::_foreach_norm(ts, 2, at::kFloat);
#else
  std::vector<at::Tensor> out;
  for (const auto& t : ts) out.push_back(at::linalg_vector_norm(t, 2, c10::nullopt, false, at::kFloat));
  return out;
#endif
}

inline constexpr bool kTorch2 = ALIGNER_TORCH_2;

// Whether grouped_mm below runs as one fused kernel, without the host reading the group sizes
// (so that it can be captured in a CUDA graph), for rows of x of `k` and outputs of `n` elements:
// torch 2.8+ has one for bfloat16 on Hopper and later (its fallback for the rest reads the sizes).
inline bool fused_grouped_mm(const at::Tensor& x, int64_t k, int64_t n) {
#if (TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)) && \
    defined(ALIGNER_WITH_CUDA)
  return x.is_cuda() && x.scalar_type() == at::kBFloat16 && k % 8 == 0 && n % 8 == 0 &&
         at::cuda::getDeviceProperties(x.get_device())->major >= 9;
#else
  (void)x, (void)k, (void)n;
  return false;
#endif
}

// Rows [ends[g-1], ends[g]) of x [M, K] times w[g] [K, N], for the groups g of w [G, K, N]: one
// grouped GEMM where fused_grouped_mm (differentiable), else one GEMM per group after the host
// reads the ends (int32 [G], cumulative).
inline at::Tensor grouped_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& ends) {
#if (TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)) && \
    defined(ALIGNER_WITH_CUDA)
  if (fused_grouped_mm(x, w.size(1), w.size(2))) return at::_grouped_mm(x, w, ends);
#endif
  const auto host = ends.to(at::kCPU, at::kLong);
  std::vector<at::Tensor> ys;
  int64_t start = 0;
  for (int64_t g = 0; g < w.size(0); ++g) {
    const int64_t end = host[g].item<int64_t>();
    if (end > start) ys.push_back(at::matmul(x.narrow(0, start, end - start), w[g]));
    start = end;
  }
  return ys.empty() ? at::zeros({0, w.size(2)}, x.options()) : at::cat(ys);
}

}  // namespace aligner::compat

// ---- c10d ----
// Torch 2 moved the collectives out of c10d::ProcessGroup into c10d::Backend, which is what
// ProcessGroupGloo and ProcessGroupNCCL derive from there; in 1.13 they derive from ProcessGroup.
// dist/ calls the collectives on that object directly, so only its type differs, plus the
// shutdown that 2.x's NCCL backend expects before destruction (Backend::shutdown, from 2.4).
// Gloo needs its own headers: Debian's libgloo-dev matches its libtorch; PyTorch's wheels ship
// none. Torch's CMake targets define USE_C10D_GLOO and, for CUDA builds, USE_C10D_NCCL.
namespace c10d {
class Backend;
class ProcessGroup;
}  // namespace c10d

#if defined(USE_C10D_GLOO) && __has_include(<gloo/algorithm.h>)
#define ALIGNER_HAS_GLOO 1
#else
#define ALIGNER_HAS_GLOO 0
#endif
#if defined(ALIGNER_WITH_CUDA) && ALIGNER_TORCH_2 && defined(USE_C10D_NCCL)
#define ALIGNER_HAS_NCCL 1
#else
#define ALIGNER_HAS_NCCL 0
#endif

namespace aligner::compat {

#if ALIGNER_TORCH_2
using CommBackend = c10d::Backend;
#else
using CommBackend = c10d::ProcessGroup;
#endif

template <class Backend>
void shutdown_comm(Backend& backend) {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
  backend.shutdown();
#else
  (void)backend;
#endif
}

}  // namespace aligner::compat
