#include "train/step_profiler.h"

#include <cstdio>
#include <cstdlib>

#include "core/error.h"
#include "core/log.h"

#ifdef ALIGNER_WITH_CUDA
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/autograd/profiler_kineto.h>
#endif

namespace aligner {

StepProfiler::StepProfiler(const std::string& output_dir, int rank) {
  const char* v = std::getenv("ALIGNER_PROFILE_STEPS");
  if (!v || !*v) return;
  long long a = 0, b = 0;
  if (std::sscanf(v, "%lld:%lld", &a, &b) != 2 || a < 1 || b < a)
    fail("ALIGNER_PROFILE_STEPS='{}': expected FIRST:LAST, steps counted from 1", v);
#ifdef ALIGNER_WITH_CUDA
  first_ = a, last_ = b;
  path_ = fmt::format("{}/profile.rank-{}.json", output_dir, rank);
#else
  (void)output_dir, (void)rank;
  log_warn("ALIGNER_PROFILE_STEPS is set, but this build has no CUDA profiler: nothing is recorded");
#endif
}

#ifdef ALIGNER_WITH_CUDA
namespace {
using torch::autograd::profiler::ProfilerConfig;
using torch::autograd::profiler::ProfilerState;
const std::set<torch::profiler::impl::ActivityType> kActivities{torch::profiler::impl::ActivityType::CPU,
                                                                torch::profiler::impl::ActivityType::CUDA};
}  // namespace

void StepProfiler::before_step(int64_t step) {
  if (step != first_) return;
  const ProfilerConfig config(ProfilerState::KINETO);
  torch::autograd::profiler::prepareProfiler(config, kActivities);
  c10::cuda::device_synchronize();
  torch::autograd::profiler::enableProfiler(config, kActivities);
  on_ = true;
}

void StepProfiler::after_step(int64_t step) {
  if (!on_ || step != last_) return;
  c10::cuda::device_synchronize();
  torch::autograd::profiler::disableProfiler()->save(path_);
  on_ = false;
  log_info("profiled steps {}..{}: {}", first_, last_, path_);
}

StepProfiler::~StepProfiler() {
  if (!on_) return;
  try {
    torch::autograd::profiler::disableProfiler()->save(path_);
  } catch (const std::exception& e) {
    log_warn("the profile of steps {}..{} could not be written to {}: {}", first_, last_, path_, e.what());
  }
}
#else
void StepProfiler::before_step(int64_t) {}
void StepProfiler::after_step(int64_t) {}
StepProfiler::~StepProfiler() = default;
#endif

}  // namespace aligner
