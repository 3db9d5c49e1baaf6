#include "train/run_setup.h"

#include <algorithm>
#include <charconv>
#include <cstdlib>

#include "core/error.h"
#include "core/log.h"
#include "io/hf_checkpoint.h"
#include "io/peft_adapter.h"

namespace aligner {

RunContext init_run(const Config& cfg) {
  // First: it sets an environment variable, which is safe only before the process group's threads.
  if (cfg.get_bool("trainer.deterministic")) use_deterministic_kernels();
  const auto env = dist::read_dist_env();
  set_log_rank(env.rank);
  at::Device device = parse_device_name(cfg.get_string("model.device"), "model.device");
  if (device.is_cuda()) device = at::Device(at::kCUDA, env.local_rank);
  dist::Dist world = env.world_size > 1 ? dist::Dist::init(env, device) : dist::Dist();
  const int64_t tp = cfg.has("trainer.tensor_parallel") ? cfg.get_int("trainer.tensor_parallel") : 1;
  RunContext ctx{split_tensor_parallel(std::move(world), tp, "trainer.tensor_parallel"), device};
  at::manual_seed(cfg.get_int("trainer.seed"));
  return ctx;
}

void use_deterministic_kernels() {
  // cuBLAS is deterministic on one stream only with a fixed workspace; it reads this variable when
  // its first handle is made, after this (no GEMM has run yet). A value the user set is kept.
  setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8", /*overwrite=*/0);
  auto& ctx = at::globalContext();
  ctx.setDeterministicCuDNN(true);
  ctx.setBenchmarkCuDNN(false);
  // Not warn_only: with it torch keeps some non-deterministic kernels (the memory-efficient
  // attention's backward pass) and only warns; without it an op that has no deterministic kernel
  // stops the run with an error naming it.
  ctx.setDeterministicAlgorithms(true, /*warn_only=*/false);
}

bool init_inference_ranks(const Config& cfg, at::Device& device) {
  const auto env = dist::read_dist_env();
  const int64_t tp = cfg.get_int("model.tensor_parallel");
  if (tp < 1) fail("config key 'model.tensor_parallel' must be at least 1, got {}", tp);
  if (env.world_size != tp)
    fail("model.tensor_parallel={} (--tensor-parallel) needs as many ranks, and {} were started{}", tp,
         env.world_size, tp > 1 ? fmt::format(": run it under aligner launch --nproc-per-node {}", tp) : "");
  if (tp == 1) return true;
  set_log_rank(env.rank);
  if (device.is_cuda()) device = at::Device(at::kCUDA, env.local_rank);
  static dist::Dist group;  // the ranks' own group, for the process's lifetime
  group = split_tensor_parallel(dist::Dist::init(env, device), tp, "model.tensor_parallel");
  return group.is_main();
}

dist::Dist split_tensor_parallel(dist::Dist world, int64_t tensor_parallel, const std::string& key) {
  const int64_t n = tensor_parallel, ranks = world.world_size();
  if (n < 1) fail("{} must be at least 1, got {}", key, n);
  if (ranks % n != 0) fail("{}={} must divide the number of ranks ({})", key, n, ranks);
  if (n == 1) {
    set_process_tensor_parallel(std::nullopt);
    return world;
  }
  // Consecutive ranks split the layers (on one node: NVLink); rank r is tensor rank r % n of data
  // rank r / n.
  const int r = world.rank(), data_rank = r / int(n), tensor_rank = r % int(n);
  std::vector<int> tensor_ranks, data_ranks;
  for (int i = 0; i < int(n); ++i) tensor_ranks.push_back(data_rank * int(n) + i);
  for (int i = 0; i < int(ranks / n); ++i) data_ranks.push_back(i * int(n) + tensor_rank);
  auto tensor = std::make_shared<dist::Dist>(world.subgroup(tensor_ranks, fmt::format("tp{}", data_rank)));
  set_process_tensor_parallel(TensorParallel{tensor});
  log_info("tensor parallel: {} ranks per model, {} data-parallel replicas", n, ranks / n);
  return world.subgroup(data_ranks, fmt::format("dp{}", tensor_rank));
}

Policy load_policy(const std::string& dir, const std::string& key, at::Device device, at::ScalarType dtype) {
  if (dir.empty()) fail("config key '{}' must be set", key);
  Policy p{load_transformer(dir, device, dtype), load_tokenizer(dir)};
  if (p.model.cfg.num_labels > 0)
    fail("{} {} is a reward model (a sequence classifier), not a causal LM", key, dir);
  check_tokenizer_fits(*p.tok, p.model.cfg.vocab_size, dir);
  return p;
}

bool read_lora_gaussian_init(const Config& cfg) {
  const std::string init = cfg.get_string("lora.init");
  if (init != "default" && init != "gaussian")
    fail("config key 'lora.init' expects default or gaussian, got '{}'", init);
  return init == "gaussian";
}

int64_t checkpointed_layers(const Config& cfg) {
  const char* key = "model.activation_checkpointing_layers";  // null: a string key
  const std::string text = cfg.get_string(key);
  if (!cfg.get_bool("model.activation_checkpointing")) {
    // A count without checkpointing turned on would be silently ignored.
    if (!text.empty()) fail("config key '{}' needs model.activation_checkpointing=true", key);
    return 0;
  }
  if (text.empty()) return kAllLayers;
  int64_t n = -1;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), n);
  if (ec != std::errc() || end != text.data() + text.size() || n < 0)
    fail("config key '{}' expects a number of layers >= 0 or null, got '{}'", key, text);
  return n;
}

LoraConfig read_lora_config(const Config& cfg) {
  LoraConfig c;
  c.rank = cfg.get_int("lora.rank");
  c.alpha = cfg.get_float("lora.alpha");
  c.dropout = cfg.get_float("lora.dropout");
  c.gaussian_init = read_lora_gaussian_init(cfg);
  for (const auto& t : cfg.get_string_list("lora.target_modules")) {
    if (t == "all-linear") {
      for (const auto& all : kLoraTargets)
        if (std::find(c.targets.begin(), c.targets.end(), all) == c.targets.end()) c.targets.push_back(all);
      continue;
    }
    if (std::find(kLoraTargets.begin(), kLoraTargets.end(), t) == kLoraTargets.end())
      fail("config key 'lora.target_modules': unknown module '{}' (expected {} or all-linear)", t,
           fmt::join(kLoraTargets, ", "));
    if (std::find(c.targets.begin(), c.targets.end(), t) == c.targets.end()) c.targets.push_back(t);
  }
  if (c.rank < 0) fail("config key 'lora.rank' must be >= 0 (0: LoRA off), got {}", c.rank);
  if (c.rank == 0 && cfg.get_string("lora.from").empty()) {
    for (const char* key :
         {"lora.alpha", "lora.dropout", "lora.target_modules", "lora.init", "lora.merge_on_save"})
      if (!cfg.is_default(key))
        fail("config key '{}' is set, but LoRA is off (lora.rank is 0): set lora.rank or lora.from", key);
    return c;
  }
  if (!(c.alpha > 0)) fail("config key 'lora.alpha' must be > 0, got {}", c.alpha);
  if (!(c.dropout >= 0 && c.dropout < 1))
    fail("config key 'lora.dropout' must be in [0, 1), got {}", c.dropout);
  if (c.targets.empty()) fail("config key 'lora.target_modules' is empty");
  return c;
}

TrainableModule trainable_model(Transformer& model, const Config& cfg, OptimizerSettings optim,
                                const std::string& model_dir, std::string name) {
  LoraConfig lora = read_lora_config(cfg);
  const std::string from = cfg.get_string("lora.from");
  if (lora.rank == 0 && from.empty()) return whole_model(model, std::move(optim), model_dir, std::move(name));
  if (!from.empty()) {
    // The folder's adapter decides what is adapted: the run may not say otherwise.
    if (lora.rank > 0)
      fail("config key 'lora.rank' is set, but lora.from {} decides the adapter's shape: leave it out", from);
    for (const char* key : {"lora.alpha", "lora.target_modules", "lora.init"})
      if (!cfg.is_default(key))
        fail("config key '{}' is set, but lora.from {} decides the adapter's shape: leave it out", key, from);
    const LoraConfig loaded = load_peft_adapter(model, from);
    const double dropout = lora.dropout;
    lora = loaded;
    if (!cfg.is_default("lora.dropout")) lora.dropout = dropout;
    for (auto& [module, l] : layer_linears(model))
      if (l->lora.a.defined()) l->lora.dropout = lora.dropout;
  } else {
    add_adapters(model, lora, uint64_t(cfg.get_int("trainer.seed")));
  }
  return adapter_module(model, lora, std::move(optim), model_dir, std::move(name),
                        cfg.get_bool("lora.merge_on_save"));
}

TrainableModule adapter_module(Transformer& model, const LoraConfig& lora, OptimizerSettings optim,
                               const std::string& model_dir, std::string name, bool merge_on_save) {
  TrainableModule m;
  m.name = std::move(name);
  m.model = &model;
  m.params = adapter_parameters(model);
  if (m.params.empty()) fail("module '{}' trains adapters, but its model has none", m.name);
  if (model.score.weight.defined()) m.params.emplace_back("score.weight", model.score.weight);
  m.optim = std::move(optim);
  m.tokenizer_dir = model_dir;
  m.lora = lora;
  m.merge_on_save = merge_on_save;
  return m;
}

}  // namespace aligner
