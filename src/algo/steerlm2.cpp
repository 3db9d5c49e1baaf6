#include "algo/steerlm2.h"

#include <cmath>
#include <memory>

#include "algo/data_stream.h"
#include "algo/dpo.h"
#include "core/error.h"
#include "data/packing.h"
#include "data/sampler.h"
#include "data/steerlm2_data.h"
#include "io/hf_checkpoint.h"
#include "train/run_setup.h"
#include "train/trainer.h"

namespace aligner {

// NeMo-Aligner's compute_baselilne_weights and weight_loss_func (gpt_steerlm_model.py): b' from the
// policy's summed log-probs of the responses, the loss each response's summed NLL times its weight
// over the group's mean loss-token count, and the distance KL(w' || b') with 1e-8 added to both.
Steerlm2Loss steerlm2_loss(const at::Tensor& logq_theta, const at::Tensor& log_w,
                           const at::Tensor& logq_prime, const at::Tensor& lengths) {
  const auto opts = at::TensorOptions().dtype(at::kDouble).device(logq_theta.device());
  Steerlm2Loss out;
  out.w = at::softmax(log_w.to(opts), 0);
  // The policy's own weights are a baseline, not something to differentiate through.
  out.b = at::softmax(logq_theta.detach().to(opts) - logq_prime.to(opts), 0);
  const auto mean_length = lengths.to(opts).mean().clamp_min(1);
  const auto coeff = ((out.w - out.b) / mean_length).to(logq_theta.scalar_type());
  out.loss = -(coeff * logq_theta).sum();
  const double eps = 1e-8;
  out.kl = ((out.w + eps) * ((out.w + eps) / (out.b + eps)).log()).sum();
  return out;
}

double attribute_log_prob(const std::vector<float>& predicted, const std::vector<float>& values,
                          const std::vector<uint8_t>& present, double sigma, int64_t scale) {
  double total = 0;
  for (size_t k = 0; k < values.size(); ++k) {
    if (!present[k]) continue;
    auto energy = [&](double v) { return -(v - predicted[k]) * (v - predicted[k]) / (2 * sigma * sigma); };
    // log-sum-exp over the scale's values, from the largest term so that none overflows.
    double top = -INFINITY;
    for (int64_t u = 0; u <= scale; ++u) top = std::max(top, energy(double(u)));
    double sum = 0;
    for (int64_t u = 0; u <= scale; ++u) sum += std::exp(energy(double(u)) - top);
    total += energy(values[k]) - top - std::log(sum);
  }
  return total;
}

namespace {

using Groups = std::vector<Indexed<Steerlm2Example>>;

auto read(Steerlm2Dataset& ds) {
  return [&ds](int64_t index) { return steerlm2_example(ds, index); };
}

class Steerlm2 final : public SampledAlgorithm {
 public:
  Steerlm2(const Config& cfg, const Tokenizer& tok, Transformer& policy, int rank, int world)
      : policy_(policy), rank_(rank), world_(world) {
    const auto attributes = cfg.get_string_list("steerlm2.attributes");
    if (attributes.empty()) fail("config key 'steerlm2.attributes' must name at least one attribute");
    const DataOptions opt = read_data_options(cfg, policy.cfg);
    std::tie(train_, val_, sampler_) = open_train_data<Steerlm2Dataset>(
        cfg, rank, world,
        [&](const std::string& path) { return open_steerlm2_dataset(path, tok, opt, attributes); });
    micro_batch_size_ = cfg.get_int("trainer.micro_batch_size");
    max_epochs_ = data_epochs(cfg);
    checkpointed_layers_ = checkpointed_layers(cfg);
    pad_id_ = pad_id_for(tok);
  }

  int64_t train_examples() const override { return dataset_size(*train_); }

  bool next_step(int64_t n) override {
    step_ = next_micro_batches(sampler_, max_epochs_, micro_batch_size_, n, read(*train_));
    return !step_.empty();
  }

  double units(int64_t i) const override { return double(step_.at(i).size()); }
  LossSums loss(int64_t i) override { return compute(step_.at(i)); }

  ValidationSums validate() override {
    ValidationSums out;
    out.metric_names = {"kl", "nll", "response_length"};  // compute()'s, in its order
    if (!val_) return out;
    for (const auto& groups :
         validation_batches(dataset_size(*val_), micro_batch_size_, rank_, world_, read(*val_)))
      out.parts.push_back(compute(groups));
    return out;
  }

 private:
  // Every response of the micro-batch's prompts in one forward pass; the loss a sum over prompts.
  LossSums compute(const Groups& groups) {
    std::vector<Sequence> seqs;
    for (const auto& g : groups)
      seqs.insert(seqs.end(), g.example.responses.begin(), g.example.responses.end());
    const auto batch = collate_padded(seqs, pad_id_);
    const auto logq = response_logprobs(policy_, batch, checkpointed_layers_);
    at::Tensor loss = at::zeros({}, logq.sum.options());
    double kl = 0;
    int64_t offset = 0;
    for (const auto& g : groups) {
      const int64_t n = int64_t(g.example.responses.size());
      const auto r = steerlm2_loss(logq.sum.narrow(0, offset, n), at::tensor(g.example.log_w, at::kDouble),
                                   at::tensor(g.example.log_q, at::kDouble), logq.count.narrow(0, offset, n));
      loss = loss + r.loss;
      kl += r.kl.item<double>();
      offset += n;
    }
    LossSums out;
    out.loss = loss;
    out.units = double(groups.size());
    out.tokens = batch.attention_mask.sum().item<int64_t>();
    const double tokens = double(logq.count.sum().item<int64_t>());
    out.metrics = {{"kl", kl, out.units},
                   {"nll", -logq.sum.detach().sum().item<double>(), tokens},
                   {"response_length", tokens, double(seqs.size())}};
    return out;
  }

  Transformer& policy_;
  int rank_, world_;
  std::unique_ptr<Steerlm2Dataset> train_, val_;
  int64_t micro_batch_size_ = 1, max_epochs_ = 1;
  int64_t checkpointed_layers_ = 0;
  int32_t pad_id_ = 0;
  std::vector<Groups> step_;
};

}  // namespace

void run_steerlm2(const Config& cfg) {
  const auto opt = read_trainer_options(cfg);
  const auto optim = read_optimizer_settings(cfg, "optim", "trainer.grad_clip");
  const std::string model_dir = cfg.get_string("model.path");
  if (model_dir.empty())
    fail("config key 'model.path' must be set: the SteerLM model that sampled the responses");
  auto ctx = init_run(cfg);
  const auto dtype = parse_compute_dtype(cfg.get_string("model.dtype"), ctx.device, "model.dtype");
  Policy loaded = load_policy(model_dir, "model.path", ctx.device, dtype);
  auto module = trainable_model(loaded.model, cfg, optim, model_dir);
  Steerlm2 algo(cfg, *loaded.tok, loaded.model, ctx.dist.rank(), ctx.dist.world_size());
  train(cfg, opt, {module}, algo, ctx.dist);
}

}  // namespace aligner
