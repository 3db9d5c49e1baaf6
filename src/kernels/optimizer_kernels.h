// The optimizer's update as one CUDA kernel per tensor (train/optimizer.cpp), on raw device
// pointers like the decoding kernels. Its reference is the multi-tensor ATen sequence that
// AdamW::step runs everywhere else, which tests compare it with.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/decode_kernels.h"

namespace aligner::kernels {

// One AdamW update of n contiguous elements, in float32, in torch::optim::AdamW's order, of the
// gradient g times grad_scale (gradient clipping's coefficient):
//   w *= decay;  m = m * beta1 + (1 - beta1) g;  v = v * beta2 + (1 - beta2) g g;
//   w += step_size * m / (sqrt(v) / bias2_sqrt + eps);  param = w rounded to param's type.
// One pass over memory where ATen's sequence takes ten: g is read in its own type (no float32
// copy), and the low-precision parameter is written from the master weight in the same pass.
struct AdamWArgs {
  int64_t n;
  float *weight, *exp_avg, *exp_avg_sq;  // the float32 working weights (a master, or the parameter)
  const void* grad;
  DType grad_dtype;
  void* param;  // the bf16/fp16 parameter its master rounds into; nullptr: weight is the parameter
  DType param_dtype;
  float decay;  // 1 - lr x weight_decay, or 1
  float beta1, one_minus_beta1, beta2, one_minus_beta2;
  float step_size;   // -lr / (1 - beta1^step)
  float bias2_sqrt;  // sqrt(1 - beta2^step)
  float eps;
  float grad_scale = 1.f;  // or the clipping coefficient
};
cudaError_t adamw_step(const AdamWArgs& a, cudaStream_t stream);

}  // namespace aligner::kernels
