// What every training command does first: join the data-parallel group that the launcher
// describes, choose the device, and quiet the other ranks' logs.
#pragma once
#include "core/config.h"
#include "dist/process_group.h"

namespace aligner {

struct RunContext {
  dist::Dist dist;
  at::Device device{at::kCPU};
};

// model.device: auto (CUDA when present) | cpu | cuda; each rank takes GPU LOCAL_RANK.
RunContext init_run(const Config& cfg);

}  // namespace aligner
