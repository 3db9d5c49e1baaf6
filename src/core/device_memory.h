// How much GPU memory the run has used and has left, for the trainer's start-up check and the
// online algorithms' metrics; on the CPU there is nothing to measure.
#pragma once
#include <ATen/ATen.h>

namespace aligner {

// The most memory the run has had allocated on `device`'s GPU so far, in GB (0 on the CPU).
double peak_memory_gb(at::Device device);

// Bytes that new tensors on `device`'s GPU can still take: what the device has free plus what
// torch's caching allocator holds unused; -1 on the CPU (not measured).
double device_memory_available(at::Device device);

}  // namespace aligner
