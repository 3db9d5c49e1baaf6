// Every GEMM shape of bench/sft_bench's step (1.1B TinyLlama shape, 8 x 2048 tokens): the forward,
// input-gradient and weight-gradient products of q/k/v (joined), o, gate, up, down and the head, as
// torch calls cuBLAS for them, timed with cuBLAS's default algorithm (what torch gets) against each
// of cuBLASLt's heuristic candidates, and summed over a step (22 layers, one head). It tells whether
// choosing algorithms per shape could speed the step up. All with beta = 0 (the up projection's input
// gradient runs with beta = 1 in the step, summing into gate's). On the GPU machine:
//   nvcc -std=c++17 -arch=sm_90 -O2 bench/gemm_shapes.cu -o /tmp/gemm_shapes -lcublasLt -lcublas &&
//   /tmp/gemm_shapes
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>
#define CK(x)                                                        \
  do {                                                               \
    auto s_ = (x);                                                   \
    if ((int)s_ != 0) {                                              \
      std::printf("err %d at %s:%d\n", (int)s_, __FILE__, __LINE__); \
      std::exit(1);                                                  \
    }                                                                \
  } while (0)

// Small pseudo-random values: products of zeros draw less power and would run at higher clocks.
__global__ void fill(__nv_bfloat16* p, size_t n, unsigned seed) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    unsigned x = (unsigned)i * 2654435761u ^ seed;
    x ^= x >> 13;
    x *= 0x5bd1e995;
    x ^= x >> 15;
    p[i] = __float2bfloat16(((x & 0xffff) / 65536.f - 0.5f) * 0.1f);
  }
}
struct Shape {
  const char* name;
  int m, n, k;
  bool ta, tb;
  int count;
};

int main() {
  const int T = 16384, H = 2048;
  struct Lin {
    const char* name;
    int in, out, count;
  };
  std::vector<Lin> lins = {{"qkv", H, 2560, 22}, {"o", H, H, 22},       {"gate", H, 5632, 22},
                           {"up", H, 5632, 22},  {"down", 5632, H, 22}, {"head", H, 32000, 1}};
  std::vector<Shape> shapes;
  for (auto& l : lins) {
    // column-major, as torch calls cuBLAS for y = x W^T
    shapes.push_back({l.name, l.out, T, l.in, true, false, l.count});   // fwd
    shapes.push_back({l.name, l.in, T, l.out, false, false, l.count});  // dgrad
    shapes.push_back({l.name, l.in, l.out, T, false, true, l.count});   // wgrad
  }
  const char* kind[3] = {"fwd", "dgrad", "wgrad"};
  size_t maxe = (size_t)T * 32000;
  __nv_bfloat16 *A, *B, *C;
  CK(cudaMalloc(&A, maxe * 2));
  CK(cudaMalloc(&B, maxe * 2));
  CK(cudaMalloc(&C, maxe * 2));
  fill<<<1024, 256>>>(A, maxe, 1);
  fill<<<1024, 256>>>(B, maxe, 2);
  size_t ws_size = 32 << 20;
  void* ws;
  CK(cudaMalloc(&ws, ws_size));
  cublasHandle_t h;
  CK(cublasCreate(&h));
  cublasLtHandle_t lt;
  CK(cublasLtCreate(&lt));
  CK(cublasSetWorkspace(h, ws, ws_size));
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  float alpha = 1, beta = 0;
  double tot_def = 0, tot_best = 0, tot_first = 0, flops_all = 0;
  for (size_t si = 0; si < shapes.size(); ++si) {
    auto s = shapes[si];
    int lda = s.ta ? s.k : s.m, ldb = s.tb ? s.n : s.k, ldc = s.m;
    auto time = [&](auto fn) {
      for (int i = 0; i < 3; ++i) fn();
      cudaEventRecord(e0);
      for (int i = 0; i < 20; ++i) fn();
      cudaEventRecord(e1);
      cudaEventSynchronize(e1);
      float ms;
      cudaEventElapsedTime(&ms, e0, e1);
      return ms / 20;
    };
    float t_def = time([&] {
      CK(cublasGemmEx(h, s.ta ? CUBLAS_OP_T : CUBLAS_OP_N, s.tb ? CUBLAS_OP_T : CUBLAS_OP_N, s.m, s.n, s.k,
                      &alpha, A, CUDA_R_16BF, lda, B, CUDA_R_16BF, ldb, &beta, C, CUDA_R_16BF, ldc,
                      CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT_TENSOR_OP));
    });
    cublasLtMatmulDesc_t desc;
    CK(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    cublasOperation_t ta = s.ta ? CUBLAS_OP_T : CUBLAS_OP_N, tb = s.tb ? CUBLAS_OP_T : CUBLAS_OP_N;
    CK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
    CK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
    cublasLtMatrixLayout_t la, lb, lc;
    CK(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, s.ta ? s.k : s.m, s.ta ? s.m : s.k, lda));
    CK(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, s.tb ? s.n : s.k, s.tb ? s.k : s.n, ldb));
    CK(cublasLtMatrixLayoutCreate(&lc, CUDA_R_16BF, s.m, s.n, ldc));
    cublasLtMatmulPreference_t pref;
    CK(cublasLtMatmulPreferenceCreate(&pref));
    CK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_size,
                                            sizeof(ws_size)));
    cublasLtMatmulHeuristicResult_t res[64];
    int nres = 0;
    CK(cublasLtMatmulAlgoGetHeuristic(lt, desc, la, lb, lc, lc, pref, 64, res, &nres));
    float best = 1e9, first = 0;
    int bi = -1;
    for (int i = 0; i < nres; ++i) {
      float t = time([&] {
        CK(cublasLtMatmul(lt, desc, &alpha, A, la, B, lb, &beta, C, lc, C, lc, &res[i].algo, ws, ws_size, 0));
      });
      if (i == 0) first = t;
      if (t < best) {
        best = t;
        bi = i;
      }
    }
    CK(cublasLtMatmulPreferenceDestroy(pref));
    for (auto l : {la, lb, lc}) CK(cublasLtMatrixLayoutDestroy(l));
    CK(cublasLtMatmulDescDestroy(desc));
    double fl = 2.0 * s.m * s.n * s.k;
    std::printf(
        "%-5s %-5s m=%5d n=%5d k=%5d  default %.3f ms (%4.0f TF)  lt#0 %.3f  best(#%d of %d) %.3f ms (%4.0f "
        "TF)\n",
        s.name, kind[si % 3], s.m, s.n, s.k, t_def, fl / t_def / 1e9, first, bi, nres, best, fl / best / 1e9);
    tot_def += t_def * s.count;
    tot_best += std::min(best, t_def) * s.count;
    tot_first += first * s.count;
    flops_all += fl * s.count;
  }
  std::printf("step GEMMs: default %.1f ms (%.0f TF), lt#0 %.1f ms, best %.1f ms (%.0f TF)\n", tot_def,
              flops_all / tot_def / 1e9, tot_first, tot_best, flops_all / tot_best / 1e9);
}
