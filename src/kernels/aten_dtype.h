// For the ATen-side callers of src/kernels (which itself never sees libtorch): the kernels' name
// for a tensor's element type.
#pragma once
#include <c10/core/ScalarType.h>

#include "core/error.h"
#include "kernels/decode_kernels.h"

namespace aligner::kernels {

inline DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kHalf:
      return DType::kFloat16;
    default:
      fail("no CUDA kernels for {} tensors", c10::toString(t));
  }
}

}  // namespace aligner::kernels
