#include "core/device_memory.h"

#ifdef ALIGNER_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#endif

namespace aligner {

double peak_memory_gb(at::Device device) {
#ifdef ALIGNER_WITH_CUDA
  if (device.is_cuda()) {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
    return double(stats.allocated_bytes[size_t(c10::CachingAllocator::StatType::AGGREGATE)].peak) / 1e9;
  }
#endif
  (void)device;
  return 0;
}

double device_memory_available(at::Device device) {
#ifdef ALIGNER_WITH_CUDA
  if (device.is_cuda()) {
    const c10::cuda::CUDAGuard guard(device);
    size_t free = 0, total = 0;
    if (cudaMemGetInfo(&free, &total) != cudaSuccess) return -1;
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
    const auto all = size_t(c10::CachingAllocator::StatType::AGGREGATE);
    return double(free) + double(stats.reserved_bytes[all].current - stats.allocated_bytes[all].current);
  }
#endif
  (void)device;
  return -1;
}

}  // namespace aligner
