// ALIGNER_PROFILE_STEPS=A:B records the host's operators and the GPU kernels of training steps A..B (counted
// from 1) with the torch profiler (Kineto) and writes them as a Chrome trace to
// OUTPUT_DIR/profile.rank-R.json, for scripts/profile_train.py to sum by kernel family. CUDA builds only;
// elsewhere the variable is reported as unused.
#pragma once
#include <cstdint>
#include <string>

namespace aligner {

class StepProfiler {
 public:
  StepProfiler(const std::string& output_dir, int rank);
  ~StepProfiler();                 // a run that ends inside the range still writes what was recorded
  void before_step(int64_t step);  // `step`: the step about to run, from 1
  void after_step(int64_t step);

 private:
  // Read only by the CUDA build's profiler.
  [[maybe_unused]] int64_t first_ = 0, last_ = -1;
  std::string path_;
  [[maybe_unused]] bool on_ = false;
};

}  // namespace aligner
