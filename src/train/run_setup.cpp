#include "train/run_setup.h"

#include "core/error.h"
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

Policy load_policy(const std::string& dir, const std::string& key, at::Device device, at::ScalarType dtype) {
  if (dir.empty()) fail("config key '{}' must be set", key);
  Policy p{load_transformer(dir, device, dtype), load_tokenizer(dir)};
  if (p.model.cfg.num_labels > 0)
    fail("{} {} is a reward model (a sequence classifier), not a causal LM", key, dir);
  if (p.tok->vocab_size() > p.model.cfg.vocab_size)
    fail("{}: the tokenizer has {} tokens but the model's vocabulary is {}", dir, p.tok->vocab_size(),
         p.model.cfg.vocab_size);
  return p;
}

}  // namespace aligner
