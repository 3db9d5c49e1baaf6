#include "algo/spin.h"

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <memory>
#include <optional>
#include <set>

#include "algo/data_stream.h"
#include "algo/dpo.h"
#include "algo/rollout.h"
#include "core/error.h"
#include "core/log.h"
#include "data/packing.h"
#include "data/sampler.h"
#include "data/sft_data.h"
#include "gen/generation_config.h"
#include "io/hf_checkpoint.h"
#include "io/peft_adapter.h"
#include "text/chat_template.h"
#include "train/run_setup.h"
#include "train/trainer.h"

namespace aligner {
namespace fs = std::filesystem;

std::vector<double> spin_betas(const std::vector<double>& given, int64_t iterations) {
  if (given.size() != 1 && int64_t(given.size()) != iterations)
    fail(
        "config key 'spin.beta' holds {} values: give one, for every iteration, or one per iteration "
        "(spin.iterations is {})",
        given.size(), iterations);
  for (double beta : given)
    if (!(beta > 0)) fail("config key 'spin.beta' must hold positive numbers, got {}", beta);
  return given.size() == 1 ? std::vector<double>(size_t(iterations), given[0]) : given;
}

SpinTerms spin_terms(double beta, const at::Tensor& policy, const at::Tensor& reference) {
  const int64_t B = policy.size(0) / 2;
  const auto pi_real = policy.narrow(0, 0, B), pi_generated = policy.narrow(0, B, B);
  const auto ref_real = reference.narrow(0, 0, B), ref_generated = reference.narrow(0, B, B);
  PreferenceLossOptions o;
  o.beta = beta;
  return {preference_loss(o, pi_real, pi_generated, ref_real, ref_generated),
          beta * (pi_real - ref_real).detach(), beta * (pi_generated - ref_generated).detach()};
}

namespace {

// An SFT example as SPIN reads it: its last reply (the last run of loss tokens) is the real
// response, and everything before it, earlier replies included, is the prompt to generate from.
struct SpinExample {
  Sequence real;  // prompt + real response; the loss mask covers the response only
  int64_t prompt_length = 0;
};

std::optional<SpinExample> spin_example(SftDataset& ds, int64_t index) {
  auto seq = sft_example(ds, index);
  if (!seq) return std::nullopt;
  const auto& mask = seq->loss_mask;
  size_t end = mask.size();
  while (end > 0 && !mask[end - 1]) --end;
  size_t start = end;
  while (start > 0 && mask[start - 1]) --start;
  if (start == 0)
    fail("{}: SPIN needs a prompt and a response to it, and this example has no {}", ds.file.where(index),
         end == 0 ? "response" : "prompt");
  SpinExample ex;
  ex.prompt_length = int64_t(start);
  // What follows the reply (a template's newline after the end of turn) is no part of it, and a
  // generated response has nothing there either.
  ex.real.input_ids.assign(seq->input_ids.begin(), seq->input_ids.begin() + end);
  ex.real.loss_mask.assign(end, 0);
  std::fill(ex.real.loss_mask.begin() + start, ex.real.loss_mask.end(), 1);
  return ex;
}

// One micro-batch of a step: each example's real response and the one the reference generated.
struct MicroBatch {
  PreferenceBatch batch;  // rows [0, B) the real responses, [B, 2B) the generated ones
  at::Tensor reference;   // [2B]: the reference's log-prob sums over those rows' responses
  double generated_tokens = 0;
};

// The folder name of a checkpoint or a reference snapshot, "step_N": N; nullopt for anything else
// (a folder still being written).
std::optional<int64_t> step_of(const fs::path& p) {
  const std::string name = p.filename().string();
  if (name.rfind("step_", 0) != 0 || name.size() == 5) return std::nullopt;
  for (size_t i = 5; i < name.size(); ++i)
    if (!std::isdigit(static_cast<unsigned char>(name[i]))) return std::nullopt;
  return std::stoll(name.substr(5));
}

class Spin final : public Algorithm {
 public:
  Spin(const Config& cfg, const Tokenizer& tok, Transformer& policy, Reference& reference,
       std::string model_dir, dist::Dist& dist)
      : policy_(policy), reference_(reference), model_dir_(std::move(model_dir)), dist_(dist) {
    iterations_ = cfg.get_int("spin.iterations");
    if (iterations_ < 1) fail("config key 'spin.iterations' must be at least 1, got {}", iterations_);
    betas_ = spin_betas(cfg.get_float_list("spin.beta"), iterations_);
    gen_ = read_generation_options(cfg, "spin.max_new_tokens");  // one response per prompt
    gen_.tokenizer = &tok;
    check_generation_options(gen_);
    if (gen_.max_new_tokens >= context_length(policy.cfg))
      fail("config key 'spin.max_new_tokens' ({}) leaves no room for a prompt in the model's context ({})",
           gen_.max_new_tokens, context_length(policy.cfg));

    const DataOptions options = read_data_options(cfg, policy.cfg);
    const auto tmpl = resolve_chat_template(cfg.get_string("data.template"), tok);
    std::tie(train_, val_, sampler_) = open_train_data<SftDataset>(
        cfg, dist.rank(), dist.world_size(),
        [&](const std::string& path) { return open_sft_dataset(path, tok, tmpl, options); });
    if (const auto text = train_->stats.layouts.find("text"); text != train_->stats.layouts.end())
      fail("data.train {}: {} records are plain text; SPIN needs prompts and their responses",
           train_->file.path(), text->second);
    micro_batch_size_ = cfg.get_int("trainer.micro_batch_size");
    checkpointed_layers_ = checkpointed_layers(cfg);
    pad_id_ = pad_id_for(tok);
    output_dir_ = cfg.get_string("output_dir");

    // NeMo-Aligner's SPIN counts in steps too: an iteration is max_epochs epochs of whole global
    // batches, and iteration k is steps [k x that, (k + 1) x that) whatever the data drops.
    const int64_t epochs = cfg.get_int("trainer.max_epochs"),
                  batch = cfg.get_int("trainer.global_batch_size");
    if (epochs < 1) fail("config key 'trainer.max_epochs' (epochs per SPIN iteration) must be at least 1");
    if (dataset_size(*train_) < batch)
      fail("trainer.global_batch_size ({}) is larger than the training data ({} examples)", batch,
           dataset_size(*train_));
    steps_per_iteration_ = epochs * (dataset_size(*train_) / batch);
  }

  // trainer.max_steps caps the run; 0: every iteration in full.
  int64_t run_steps(int64_t max_steps) const {
    const int64_t all = iterations_ * steps_per_iteration_;
    return max_steps > 0 ? std::min(max_steps, all) : all;
  }

  int64_t train_examples() const override { return dataset_size(*train_); }
  bool generates() const override { return true; }

  bool next_step(int64_t n) override {
    begin_iteration();
    // The data repeats: the run ends after its steps (run_steps), not with an epoch.
    const auto examples = next_micro_batches(sampler_, 0, micro_batch_size_, n, [&](int64_t index) {
      auto ex = spin_example(*train_, index);
      misses_ = ex ? 0 : misses_ + 1;
      if (misses_ > dataset_size(*train_))
        fail("data.train {}: this rank's share has no example left to train on (all dropped or skipped)",
             train_->file.path());
      return ex;
    });
    std::vector<std::vector<int32_t>> prompts;
    for (const auto& batch : examples)
      for (const auto& e : batch)
        prompts.emplace_back(e.example.real.input_ids.begin(),
                             e.example.real.input_ids.begin() + e.example.prompt_length);
    GenerationOptions g = gen_;
    g.seed = step_seed(gen_.seed, step_, dist_.rank(), 0);
    micro_.clear();
    // The reference generates, and scores both responses, in one swap; its log-probs are computed
    // on the micro-batches as loss() batches them, so that while the policy is the reference (an
    // iteration's first step) the two agree to the bit.
    reference_.with_model(policy_, [&](const Transformer& ref) {
      const GenerationResult result = generate(ref, prompts, g);
      size_t k = 0;
      for (const auto& batch : examples) {
        MicroBatch mb;
        std::vector<PreferenceExample> pairs;
        for (const auto& e : batch) {
          const size_t j = k++;
          const auto& generated = result.sequences[j].tokens;  // one per prompt, in order
          PreferenceExample p;
          p.chosen = e.example.real;
          p.prompt_length = e.example.prompt_length;
          p.rejected.input_ids = prompts[j];
          p.rejected.input_ids.insert(p.rejected.input_ids.end(), generated.begin(), generated.end());
          p.rejected.loss_mask.assign(p.rejected.input_ids.size(), 0);
          std::fill(p.rejected.loss_mask.begin() + p.prompt_length, p.rejected.loss_mask.end(), 1);
          mb.generated_tokens += double(generated.size());
          pairs.push_back(std::move(p));
        }
        mb.batch = collate_preferences(pairs, pad_id_);
        mb.reference = response_logprobs(ref, mb.batch.seqs).sum;
        micro_.push_back(std::move(mb));
      }
    });
    return true;
  }

  double units(int64_t i) const override { return double(micro_.at(i).batch.prompt_lengths.size(0)); }

  LossSums loss(int64_t i) override {
    const auto& mb = micro_.at(i);
    const auto policy = response_logprobs(policy_, mb.batch.seqs, checkpointed_layers_).sum;
    const auto t = spin_terms(beta(), policy, mb.reference.to(policy.scalar_type()));
    LossSums out;
    out.loss = t.loss.sum();
    out.units = units(i);
    out.tokens = mb.batch.seqs.attention_mask.sum().item<int64_t>();
    // Means per example; the iteration and its beta once per rank (micro-batch 0).
    const double once = i == 0 ? 1.0 : 0.0;
    out.metrics = {{"rewards_real", t.rewards_real.sum().item<double>(), out.units},
                   {"rewards_generated", t.rewards_generated.sum().item<double>(), out.units},
                   {"accuracy", (t.rewards_real > t.rewards_generated).sum().item<double>(), out.units},
                   {"generated_length", mb.generated_tokens, out.units},
                   {"iteration", once * double(iteration() + 1), once},
                   {"beta", once * beta(), once}};
    return out;
  }

  void after_optimizer_step(int64_t step) override { step_ = step; }

  // The SFT loss of data.validation: the mean negative log-likelihood per response token, as
  // `aligner sft` reports it.
  ValidationSums validate() override {
    ValidationSums out;
    if (!val_) return out;
    for (const auto& batch :
         validation_batches(dataset_size(*val_), micro_batch_size_, dist_.rank(), dist_.world_size(),
                            [&](int64_t index) { return sft_example(*val_, index); })) {
      const auto b = collate_padded(examples_of(batch), pad_id_);
      const auto lp = response_logprobs(policy_, b);
      LossSums part;
      part.loss = -lp.sum.sum();
      part.units = double(lp.count.sum().item<int64_t>());
      part.tokens = b.attention_mask.sum().item<int64_t>();
      out.parts.push_back(std::move(part));
    }
    return out;
  }

  nlohmann::json state() const override {
    return {{"position", sampler_.position}, {"step", step_}, {"steps_per_iteration", steps_per_iteration_}};
  }

  void load_state(const nlohmann::json& s) override {
    sampler_.position = s.at("position").get<int64_t>();
    step_ = s.at("step").get<int64_t>();
    const int64_t saved = s.at("steps_per_iteration").get<int64_t>();
    if (saved != steps_per_iteration_)
      fail(
          "the checkpoint's SPIN iterations are {} steps and this run's {} (trainer.max_epochs x "
          "data.train's examples / trainer.global_batch_size): resume with the data and batch settings it "
          "was made with",
          saved, steps_per_iteration_);
  }

 private:
  int64_t iteration() const { return step_ / steps_per_iteration_; }
  double beta() const { return betas_[size_t(iteration())]; }
  fs::path snapshot_dir(int64_t step) const {
    return fs::path(output_dir_) / "reference" / fmt::format("step_{}", step);
  }

  // Makes the reference the weights that the policy had when the iteration of the next step began.
  // A checkpoint cannot hold the reference (the trainer saves what trains), so each iteration's is
  // also written to OUTPUT_DIR/reference/step_N (N: the step it began after), which a run resumed
  // partway through that iteration reads back.
  void begin_iteration() {
    const int64_t start = iteration() * steps_per_iteration_;
    if (start == reference_step_) return;
    // With adapters (LoRA) the reference is the base with the iteration's adapters, and its
    // snapshot a PEFT adapter folder.
    const bool adapters = has_adapters(policy_);
    if (start == step_) {
      reference_.assign(adapters ? adapter_parameters(policy_) : named_parameters(policy_));
      // A tensor-parallel policy is written whole, gathered over its group (every rank of it takes part).
      const std::optional<Transformer> whole =
          policy_.tp ? std::optional<Transformer>(gather_transformer(policy_)) : std::nullopt;
      const Transformer& policy = whole ? *whole : policy_;
      if (dist_.is_main()) {
        if (adapters)
          save_peft_adapter(policy, adapter_config(policy), snapshot_dir(start).string(), model_dir_,
                            model_dir_, Replace::ours);
        else
          save_transformer(policy, snapshot_dir(start).string(), std::nullopt, 0, model_dir_);
        prune_snapshots(start);
      }
      log_info("SPIN iteration {} of {}: the reference is now the policy after step {}", iteration() + 1,
               iterations_, start);
    } else {
      const fs::path dir = snapshot_dir(start);
      if (!fs::exists(dir / (adapters ? "adapter_config.json" : "config.json")))
        fail(
            "resuming partway through SPIN iteration {} needs its reference, the policy after step {}, which "
            "{} should hold (was the checkpoint copied without its output_dir?)",
            iteration() + 1, start, dir.string());
      if (adapters) {
        Transformer snapshot = without_adapters(policy_);
        load_peft_adapter(snapshot, dir.string());
        reference_.assign(adapter_parameters(snapshot));
      } else {
        const Transformer snapshot = load_transformer(dir.string(), at::kCPU, policy_.embed.scalar_type());
        reference_.assign(named_parameters(snapshot));
      }
      log_info("SPIN iteration {} of {}: the reference (the policy after step {}) read from {}",
               iteration() + 1, iterations_, start, dir.string());
    }
    reference_step_ = start;
  }

  // Deletes the reference snapshots that neither the iteration beginning after step `current` nor a
  // checkpoint in output_dir needs: a checkpoint partway through an iteration needs that
  // iteration's, one at an iteration's end none (its own weights are the next reference).
  void prune_snapshots(int64_t current) const {
    std::set<int64_t> needed{current};
    const fs::path checkpoints = fs::path(output_dir_) / "checkpoints";
    if (fs::is_directory(checkpoints))
      for (const auto& e : fs::directory_iterator(checkpoints))
        if (const auto step = step_of(e.path()); step && *step % steps_per_iteration_ != 0)
          needed.insert(*step / steps_per_iteration_ * steps_per_iteration_);
    for (const auto& e : fs::directory_iterator(fs::path(output_dir_) / "reference"))
      if (const auto step = step_of(e.path()); step && !needed.count(*step)) fs::remove_all(e.path());
  }

  Transformer& policy_;
  Reference& reference_;
  std::string model_dir_, output_dir_;
  dist::Dist& dist_;
  int64_t iterations_ = 1, steps_per_iteration_ = 1, micro_batch_size_ = 1;
  std::vector<double> betas_;
  GenerationOptions gen_;
  std::unique_ptr<SftDataset> train_, val_;
  Sampler sampler_;
  int64_t checkpointed_layers_ = 0;
  int32_t pad_id_ = 0;
  int64_t step_ = 0;            // steps done
  int64_t reference_step_ = 0;  // the step after which the reference's weights were the policy's
  int64_t misses_ = 0;          // examples dropped or skipped in a row
  std::vector<MicroBatch> micro_;
};

}  // namespace

void run_spin(const Config& cfg) {
  auto opt = read_trainer_options(cfg);
  const auto optim = read_optimizer_settings(cfg, "optim", "trainer.grad_clip");
  const std::string model_dir = cfg.get_string("model.path");
  if (model_dir.empty()) fail("config key 'model.path' must be set");
  const auto offload = read_reference_offload(cfg);
  auto ctx = init_run(cfg);
  const auto dtype = parse_compute_dtype(cfg.get_string("model.dtype"), ctx.device, "model.dtype");
  Policy loaded = load_policy(model_dir, "model.path", ctx.device, dtype);
  Transformer& policy = loaded.model;
  auto& tok = loaded.tok;
  auto module = trainable_model(policy, cfg, optim, model_dir);
  Reference reference(policy, offload.value_or(ctx.device.is_cuda()));
  Spin algo(cfg, *tok, policy, reference, model_dir, ctx.dist);
  opt.max_steps = algo.run_steps(opt.max_steps);
  train(cfg, opt, {module}, algo, ctx.dist);
}

}  // namespace aligner
