#include "train/run_setup.h"

#include "core/log.h"
#include "io/hf_checkpoint.h"

namespace aligner {

RunContext init_run(const Config& cfg) {
  const auto env = dist::read_dist_env();
  set_log_rank(env.rank);
  at::Device device = parse_device_name(cfg.get_string("model.device"), "model.device");
  if (device.is_cuda()) device = at::Device(at::kCUDA, env.local_rank);
  RunContext ctx{env.world_size > 1 ? dist::Dist::init(env, device) : dist::Dist(), device};
  at::manual_seed(cfg.get_int("trainer.seed"));
  return ctx;
}

}  // namespace aligner
