// `aligner serve-reward --model DIR [--port P] [--host H]`: a reward model served over HTTP
// (reward/reward_server.h, README.md "Reward server API") until SIGINT or SIGTERM, which stop it
// after answering the requests under way; it then exits 0. configs/serve-reward.yaml is the schema.
#include <chrono>
#include <csignal>
#include <thread>

#include "command_config.h"
#include "commands.h"
#include "core/error.h"
#include "core/log.h"
#include "io/hf_checkpoint.h"
#include "reward/reward_server.h"

namespace aligner::cli {
namespace {

volatile std::sig_atomic_t stop_signal = 0;

// The handler puts the default back, so a second signal kills at once.
void on_stop_signal(int sig) {
  stop_signal = sig;
}

int64_t positive(const Config& cfg, const std::string& key) {
  const int64_t v = cfg.get_int(key);
  if (v < 1) fail("config key '{}' must be at least 1, got {}", key, v);
  return v;
}

void run(const Config& cfg) {
  RewardModelOptions model;
  model.path = cfg.get_string("model.path");
  model.device = parse_device_name(cfg.get_string("model.device"), "model.device");
  model.dtype = parse_compute_dtype(cfg.get_string("model.dtype"), model.device, "model.dtype");
  model.attribute_weights = cfg.get_float_list("reward.attribute_weights");
  model.batch_size = positive(cfg, "server.batch_size");
  RewardServerOptions opt;
  opt.max_tokens_per_batch = positive(cfg, "server.max_tokens_per_batch");
  opt.max_request_sequences = positive(cfg, "server.max_request_sequences");
  opt.max_request_bytes = positive(cfg, "server.max_request_bytes");
  opt.threads = int(std::min<int64_t>(positive(cfg, "server.threads"), 1024));
  const std::string host = cfg.get_string("server.host");
  const int64_t port = cfg.get_int("server.port");
  if (port < 0 || port > 65535) fail("config key 'server.port' must be in [0, 65535], got {}", port);

  RewardServer server(load_reward_scorer(model), opt);
  struct sigaction sa = {};
  sa.sa_handler = on_stop_signal;
  sa.sa_flags = SA_RESETHAND;
  sigemptyset(&sa.sa_mask);
  ::sigaction(SIGTERM, &sa, nullptr);
  ::sigaction(SIGINT, &sa, nullptr);
  server.start(host, int(port));
  while (stop_signal == 0) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  log_info("{}: stopping the reward server", strsignal(stop_signal));
  server.stop();
}

}  // namespace

void add_serve_reward(CLI::App& app) {
  auto* cmd =
      app.add_subcommand("serve-reward", "Serve a reward model over HTTP, for online RL (reward.url)");
  auto aliases = model_aliases(true);
  aliases.insert(aliases.end(), {{"--port", "server.port"}, {"--host", "server.host"}});
  add_config_options(*cmd, "serve-reward", aliases, run);
}

}  // namespace aligner::cli
