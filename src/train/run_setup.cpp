#include "train/run_setup.h"

#include "core/error.h"
#include "core/log.h"

namespace aligner {

RunContext init_run(const Config& cfg) {
  const auto env = dist::read_dist_env();
  set_log_rank(env.rank);
  const std::string want = cfg.get_string("model.device");
  bool cuda = false;
  if (want == "cuda") {
    if (!at::hasCUDA()) fail("model.device=cuda, but this build of aligner has no CUDA or no GPU is visible");
    cuda = true;
  } else if (want == "auto") {
    cuda = at::hasCUDA();
  } else if (want != "cpu") {
    fail("config key 'model.device' expects auto, cpu or cuda, got '{}'", want);
  }
  const at::Device device = cuda ? at::Device(at::kCUDA, env.local_rank) : at::Device(at::kCPU);
  RunContext ctx{env.world_size > 1 ? dist::Dist::init(env, device) : dist::Dist(), device};
  at::manual_seed(cfg.get_int("trainer.seed"));
  return ctx;
}

}  // namespace aligner
