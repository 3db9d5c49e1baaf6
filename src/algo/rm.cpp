#include "algo/rm.h"

#include <algorithm>
#include <memory>
#include <numeric>

#include "algo/data_stream.h"
#include "core/error.h"
#include "core/log.h"
#include "data/attribute_data.h"
#include "data/preference_data.h"
#include "data/sampler.h"
#include "io/hf_checkpoint.h"
#include "train/run_setup.h"
#include "train/trainer.h"

namespace aligner {

at::Tensor bradley_terry_loss(const at::Tensor& chosen, const at::Tensor& rejected,
                              const at::Tensor& margin) {
  return -at::log_sigmoid(chosen - rejected - margin);
}

at::Tensor score_batch(const Transformer& m, const Batch& b, int64_t checkpointed_layers) {
  const auto device = m.embed.device();
  ForwardInput in{b.input_ids.to(device), b.attention_mask.to(device), b.position_ids.to(device)};
  in.checkpointed_layers = checkpointed_layers;
  return sequence_scores(m, forward_hidden(m, in), in);
}

std::vector<std::vector<double>> score_token_sequences(const Transformer& m,
                                                       const std::vector<std::vector<int32_t>>& seqs,
                                                       int64_t batch_size, int32_t pad_id) {
  std::vector<size_t> order(seqs.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return seqs[a].size() < seqs[b].size(); });
  std::vector<std::vector<double>> scores(seqs.size());
  for (size_t start = 0; start < order.size(); start += size_t(batch_size)) {
    const size_t n = std::min<size_t>(size_t(batch_size), order.size() - start);
    std::vector<Sequence> batch;
    for (size_t i = 0; i < n; ++i) {
      const auto& ids = seqs[order[start + i]];
      batch.push_back({ids, std::vector<uint8_t>(ids.size(), 0)});
    }
    const auto out = score_batch(m, collate_padded(batch, pad_id)).to(at::kDouble).cpu().contiguous();
    for (size_t i = 0; i < n; ++i) {
      const double* row = out[int64_t(i)].data_ptr<double>();
      scores[order[start + i]].assign(row, row + out.size(1));
    }
  }
  return scores;
}

std::vector<int32_t> scoring_tokens(const nlohmann::json& r, const std::string& where,
                                    const Encoder& encoder) {
  Encoder enc = encoder;
  // The model scores a reply, so the reply's own attribute line is not part of its input.
  if (enc.tmpl.format == ChatFormat::kSteerlm) enc.tmpl.format = ChatFormat::kNemo;
  if (r.contains("text")) {
    const auto text = get_field<std::string>(r, "text", where);
    if (is_blank(text)) fail("{}: field \"text\": empty text", where);
    auto ids = encode_prompt_text(enc, text);
    if (enc.add_eos && enc.tok->special().eos) ids.push_back(*enc.tok->special().eos);
    return ids;
  }
  if (r.contains("prompt")) {
    const auto prompt = parse_text_or_chat(r["prompt"], where, "prompt", false);
    const auto response = parse_text_or_chat(require_field(r, "response", where), where, "response", false);
    int64_t prompt_length = 0;
    return encode_prompt_response(enc, prompt, response, where, "response", &prompt_length).input_ids;
  }
  if (r.contains("messages"))
    return encode_chat(enc, parse_messages(r["messages"], where, "messages", false), false).ids;
  if (r.contains("conversations")) {
    ChatFormat format = enc.tmpl.format;
    return encode_chat(enc, parse_nemo_conversation(r, where, format, false), false).ids;
  }
  fail("{}: expected a field input_ids, text, prompt + response, messages or conversations", where);
}

namespace {

// What both ways of training share: the model, the order the data is read in, and its state.
class RewardModelTraining : public SampledAlgorithm {
 public:
  RewardModelTraining(const Config& cfg, const Tokenizer& tok, Transformer& model, int rank, int world)
      : model_(model),
        rank_(rank),
        world_(world),
        micro_batch_size_(cfg.get_int("trainer.micro_batch_size")),
        max_epochs_(data_epochs(cfg)),
        checkpointed_layers_(checkpointed_layers(cfg)),
        pad_id_(pad_id_for(tok)),
        options_(read_data_options(cfg, model.cfg)),
        template_(resolve_chat_template(cfg.get_string("data.template"), tok)) {}

 protected:
  Transformer& model_;
  int rank_, world_;
  int64_t micro_batch_size_, max_epochs_;
  int64_t checkpointed_layers_;
  int32_t pad_id_;
  DataOptions options_;
  ChatTemplate template_;
};

using Pairs = std::vector<Indexed<PreferenceExample>>;

class PairwiseRewardModel final : public RewardModelTraining {
 public:
  PairwiseRewardModel(const Config& cfg, const Tokenizer& tok, Transformer& model, int rank, int world)
      : RewardModelTraining(cfg, tok, model, rank, world) {
    std::tie(train_, val_, sampler_) = open_train_data<PreferenceDataset>(
        cfg, rank, world,
        [&](const std::string& path) { return open_preference_dataset(path, tok, template_, options_); });
  }

  int64_t train_examples() const override { return dataset_size(*train_); }

  bool next_step(int64_t n) override {
    step_ = next_micro_batches(sampler_, max_epochs_, micro_batch_size_, n,
                               [&](int64_t index) { return preference_example(*train_, index); });
    return !step_.empty();
  }

  double units(int64_t i) const override { return double(step_.at(i).size()); }
  LossSums loss(int64_t i) override { return compute(step_.at(i)); }

  ValidationSums validate() override {
    // compute()'s metrics, in its order.
    ValidationSums out{{"accuracy", "reward_chosen_mean", "reward_rejected_mean", "reward_margin"}, {}};
    if (!val_) return out;
    for (const auto& pairs :
         validation_batches(dataset_size(*val_), micro_batch_size_, rank_, world_,
                            [&](int64_t index) { return preference_example(*val_, index); }))
      out.parts.push_back(compute(pairs));
    return out;
  }

 private:
  LossSums compute(const Pairs& pairs) {
    const auto examples = examples_of(pairs);
    const auto b = collate_preferences(examples, pad_id_);
    // A pair without a margin needs none: 0 is the plain Bradley-Terry loss.
    std::vector<float> margins;
    for (const auto& e : examples) margins.push_back(float(e.margin.value_or(0.0)));
    const auto scores = score_batch(model_, b.seqs, checkpointed_layers_).select(1, 0);
    const int64_t B = int64_t(examples.size());
    const auto chosen = scores.narrow(0, 0, B), rejected = scores.narrow(0, B, B);
    const auto margin = at::tensor(margins).to(scores.device(), scores.scalar_type());
    LossSums out;
    out.loss = bradley_terry_loss(chosen, rejected, margin).sum();
    out.units = double(B);
    out.tokens = b.seqs.attention_mask.sum().item<int64_t>();
    const auto c = chosen.detach(), r = rejected.detach();
    // Means per pair.
    out.metrics = {{"accuracy", (c > r).sum().item<double>(), out.units},
                   {"reward_chosen_mean", c.sum().item<double>(), out.units},
                   {"reward_rejected_mean", r.sum().item<double>(), out.units},
                   {"reward_margin", (c - r).sum().item<double>(), out.units}};
    return out;
  }

  std::unique_ptr<PreferenceDataset> train_, val_;
  std::vector<Pairs> step_;
};

using Labelled = std::vector<Indexed<AttributeExample>>;

class RegressionRewardModel final : public RewardModelTraining {
 public:
  RegressionRewardModel(const Config& cfg, const Tokenizer& tok, Transformer& model, int rank, int world,
                        const std::vector<std::string>& attributes)
      : RewardModelTraining(cfg, tok, model, rank, world), attributes_(attributes) {
    std::tie(train_, val_, sampler_) =
        open_train_data<AttributeDataset>(cfg, rank, world, [&](const std::string& path) {
          return open_attribute_dataset(path, tok, template_, options_, attributes);
        });
  }

  int64_t train_examples() const override { return dataset_size(*train_); }

  bool next_step(int64_t n) override {
    step_ = next_micro_batches(sampler_, max_epochs_, micro_batch_size_, n,
                               [&](int64_t index) { return attribute_example(*train_, index); });
    return !step_.empty();
  }

  double units(int64_t i) const override {
    double labels = 0;
    for (const auto& e : step_.at(i))
      for (uint8_t p : e.example.present) labels += p;
    return labels;
  }

  LossSums loss(int64_t i) override { return compute(step_.at(i)); }

  ValidationSums validate() override {
    ValidationSums out;
    for (const auto& a : attributes_) out.metric_names.push_back("mse_" + a);
    if (!val_) return out;
    for (const auto& batch :
         validation_batches(dataset_size(*val_), micro_batch_size_, rank_, world_,
                            [&](int64_t index) { return attribute_example(*val_, index); }))
      out.parts.push_back(compute(batch));
    return out;
  }

 private:
  LossSums compute(const Labelled& batch) {
    const auto b = collate_attributes(examples_of(batch), pad_id_);
    const auto scores = score_batch(model_, b.seqs, checkpointed_layers_);
    const auto present = b.present.to(scores.device(), scores.scalar_type());
    const auto values = b.values.to(scores.device(), scores.scalar_type());
    const auto squared = (scores - values).pow(2) * present;
    LossSums out;
    out.loss = squared.sum();
    out.units = present.sum().item<double>();
    out.tokens = b.seqs.attention_mask.sum().item<int64_t>();
    // Each attribute's mean squared error is over its own labels: an attribute labelled nowhere in
    // the global batch has count 0 and is not reported.
    const auto per_attribute = squared.detach().sum(0).to(at::kDouble).cpu();
    const auto labelled = present.sum(0).to(at::kDouble).cpu();
    for (size_t a = 0; a < attributes_.size(); ++a)
      out.metrics.push_back({"mse_" + attributes_[a], per_attribute[int64_t(a)].item<double>(),
                             labelled[int64_t(a)].item<double>()});
    return out;
  }

  std::vector<std::string> attributes_;
  std::unique_ptr<AttributeDataset> train_, val_;
  std::vector<Labelled> step_;
};

}  // namespace

void run_rm(const Config& cfg) {
  const auto opt = read_trainer_options(cfg);
  const auto optim = read_optimizer_settings(cfg, "optim", "trainer.grad_clip");
  const std::string model_dir = cfg.get_string("model.path");
  if (model_dir.empty()) fail("config key 'model.path' must be set");
  const std::string type = cfg.get_string("rm.type");
  if (type != "pairwise" && type != "regression")
    fail("config key 'rm.type' expects pairwise or regression, got '{}'", type);
  auto ctx = init_run(cfg);
  auto tok = load_tokenizer(model_dir);
  const auto labels =
      type == "pairwise" ? std::vector<std::string>{"reward"} : cfg.get_string_list("rm.attributes");
  const auto dtype = parse_compute_dtype(cfg.get_string("model.dtype"), ctx.device, "model.dtype");
  Transformer model = load_reward_model(model_dir, ctx.device, dtype, labels, pad_id_for(*tok),
                                        uint64_t(cfg.get_int("trainer.seed")));
  check_tokenizer_fits(*tok, model.cfg.vocab_size, model_dir);
  auto module = trainable_model(model, cfg, optim, model_dir);
  std::unique_ptr<Algorithm> algo;
  if (type == "pairwise")
    algo = std::make_unique<PairwiseRewardModel>(cfg, *tok, model, ctx.dist.rank(), ctx.dist.world_size());
  else
    algo = std::make_unique<RegressionRewardModel>(cfg, *tok, model, ctx.dist.rank(), ctx.dist.world_size(),
                                                   labels);
  train(cfg, opt, {module}, *algo, ctx.dist);
}

}  // namespace aligner
