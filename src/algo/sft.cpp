#include "algo/sft.h"

#include <filesystem>

#include "algo/data_stream.h"
#include "algo/kd_logits.h"
#include "core/error.h"
#include "core/log.h"
#include "data/packing.h"
#include "data/sampler.h"
#include "data/sft_data.h"
#include "io/hf_checkpoint.h"
#include "text/chat_template.h"
#include "train/run_setup.h"
#include "train/trainer.h"

namespace aligner {
namespace fs = std::filesystem;

at::Tensor topk_kd_loss_sum_from_topk(const at::Tensor& student_logits, const at::Tensor& topk_values,
                                      const at::Tensor& topk_ids, double temperature) {
  if (topk_values.sizes() != topk_ids.sizes() || topk_values.size(0) != student_logits.size(0))
    fail("teacher top-k values {} and ids {} do not match the student's logits {}",
         fmt::join(topk_values.sizes(), "x"), fmt::join(topk_ids.sizes(), "x"),
         fmt::join(student_logits.sizes(), "x"));
  auto log_pt = at::log_softmax(topk_values.to(at::kFloat) / temperature, -1);
  auto log_ps =
      at::log_softmax(student_logits.to(at::kFloat) / temperature, -1).gather(-1, topk_ids.to(at::kLong));
  return (log_pt.exp() * (log_pt - log_ps)).sum() * (temperature * temperature);
}

namespace {

// topk_kd_loss_sum_from_topk of the student's logits at hidden rows [N, H], which are computed a
// chunk of rows at a time; where keeping their float32 log-softmax for the backward pass would take
// too much memory, the backward pass computes them again (head_topk_kd).
at::Tensor student_kd_loss_sum(const Transformer& m, const at::Tensor& rows, const at::Tensor& topk_values,
                               const at::Tensor& topk_ids, double temperature) {
  const int64_t N = rows.size(0), chunk = logit_chunk_rows(m);
  if (topk_values.size(0) != N || topk_ids.size(0) != N)
    fail("teacher top-k values {} and ids {} do not match the student's {} loss tokens",
         fmt::join(topk_values.sizes(), "x"), fmt::join(topk_ids.sizes(), "x"), N);
  if (recompute_head_logits(m, N, /*kept_bytes_per_logit=*/4))
    return head_topk_kd(rows, m.lm_head.weight, topk_values, topk_ids, temperature, chunk).sum();
  auto sum = at::zeros({}, rows.options().dtype(at::kFloat));
  for (int64_t s = 0; s < N; s += chunk) {
    const int64_t n = std::min(chunk, N - s);
    sum = sum + topk_kd_loss_sum_from_topk(lm_logits(m, rows.narrow(0, s, n)), topk_values.narrow(0, s, n),
                                           topk_ids.narrow(0, s, n), temperature);
  }
  return sum;
}

struct MicroBatch {
  Batch batch;
  double units = 0;
  int64_t tokens = 0;
  // kd.logits: the stored teacher top-k, one row per loss token in the order the batch holds them.
  at::Tensor teacher_values, teacher_ids;
};

// Examples and their indices in the data file, which locate their stored teacher logits.
struct Examples {
  std::vector<int64_t> index;
  std::vector<Sequence> seqs;
};

class Sft final : public Algorithm {
 public:
  Sft(const Config& cfg, const Tokenizer& tok, Transformer& model, const Transformer* teacher,
      at::Device device, int rank, int world)
      : model_(model), teacher_(teacher), device_(device), rank_(rank), world_(world) {
    const DataOptions opt = read_data_options(cfg, model.cfg);
    const auto tmpl = resolve_chat_template(cfg.get_string("data.template"), tok);
    std::tie(train_, val_, sampler_) = open_train_data<SftDataset>(
        cfg, rank, world, [&](const std::string& path) { return open_sft_dataset(path, tok, tmpl, opt); });
    micro_batch_size_ = cfg.get_int("trainer.micro_batch_size");
    max_epochs_ = data_epochs(cfg);
    max_length_ = opt.max_length;
    packing_ = cfg.get_bool("data.packing");
    checkpointed_layers_ = checkpointed_layers(cfg);
    pad_id_ = pad_id_for(tok);
    kd_top_k_ = cfg.get_int("kd.top_k");
    kd_temperature_ = cfg.get_float("kd.temperature");
    ce_weight_ = cfg.get_float("kd.ce_weight");
    const std::string logits = cfg.get_string("kd.logits");
    if ((teacher || !logits.empty()) && kd_top_k_ < 1) fail("config key 'kd.top_k' must be at least 1");
    if (kd_temperature_ <= 0) fail("config key 'kd.temperature' must be positive");
    if (!logits.empty()) {
      if (teacher)
        fail("set kd.teacher (a live teacher) or kd.logits (stored by aligner kd-prepare), not both");
      const int64_t vocab = model.cfg.vocab_size;
      stored_train_ = StoredTopK::open(logits, *train_, "data.train", kd_top_k_, vocab);
      if (val_) {
        std::string val_logits = cfg.get_string("kd.validation_logits");
        if (val_logits.empty()) val_logits = default_kd_logits_path(val_->file.path(), stored_train_->k());
        stored_val_ = StoredTopK::open(val_logits, *val_, "data.validation", kd_top_k_, vocab);
      }
    }
    kd_weight_ = (teacher || stored_train_) ? cfg.get_float("kd.kd_weight") : 0.0;
  }

  int64_t train_examples() const override { return dataset_size(*train_); }

  bool next_step(int64_t n) override {
    step_.clear();
    for (int64_t i = 0; i < n; ++i) {
      auto ex = take_examples();
      if (ex.seqs.empty()) return false;
      step_.push_back(make_micro_batch(ex, packing_, *train_, stored_train_));
    }
    return true;
  }

  double units(int64_t i) const override { return step_.at(i).units; }

  LossSums loss(int64_t i) override { return compute(step_.at(i)); }

  ValidationSums validate() override {
    ValidationSums out;
    // compute()'s metrics, which distillation alone reports.
    if (teacher_ || stored_train_) out.metric_names = {"ce_loss", "kd_loss"};
    if (!val_) return out;
    Examples ex;
    int64_t batch_index = 0;
    auto flush = [&] {
      if (!ex.seqs.empty() && batch_index++ % world_ == rank_)
        out.parts.push_back(compute(make_micro_batch(ex, false, *val_, stored_val_)));
      ex = {};
    };
    for (int64_t i = 0; i < dataset_size(*val_); ++i) {
      if (auto seq = sft_example(*val_, i)) {
        ex.index.push_back(i);
        ex.seqs.push_back(std::move(*seq));
      }
      if (int64_t(ex.seqs.size()) == micro_batch_size_) flush();
    }
    flush();
    return out;
  }

  nlohmann::json state() const override {
    return {{"position", sampler_.position},
            {"pending", pending_ ? nlohmann::json(*pending_) : nlohmann::json()}};
  }

  void load_state(const nlohmann::json& s) override {
    sampler_.position = s.at("position").get<int64_t>();
    pending_.reset();
    if (!s.at("pending").is_null()) pending_ = s.at("pending").get<int64_t>();
  }
  // An example read but left for the next packed row belongs to its rank's shard: none may wait.
  std::optional<nlohmann::json> reshard_state(const std::vector<nlohmann::json>& saved) const override {
    for (const auto& s : saved)
      if (!s.at("pending").is_null()) return std::nullopt;
    const auto p = resharded_position(sampler_, saved);
    if (!p) return std::nullopt;
    return nlohmann::json{{"position", *p}, {"pending", nullptr}};
  }

 private:
  bool data_left() const { return max_epochs_ <= 0 || current_epoch(sampler_) < max_epochs_; }

  // The next example index of this rank and its tokens, skipping dropped or bad examples.
  std::optional<std::pair<int64_t, Sequence>> next_example() {
    if (pending_) {
      const int64_t index = *pending_;
      pending_.reset();
      if (auto ex = sft_example(*train_, index)) return std::make_pair(index, std::move(*ex));
    }
    while (data_left()) {
      const int64_t index = next_index(sampler_);
      if (auto ex = sft_example(*train_, index)) return std::make_pair(index, std::move(*ex));
    }
    return std::nullopt;
  }

  // One micro-batch worth: micro_batch_size examples, or with packing as many as fill
  // micro_batch_size rows; the example that does not fit waits for the next micro-batch.
  Examples take_examples() {
    Examples out;
    std::vector<int64_t> lengths;
    while (true) {
      if (!packing_ && int64_t(out.seqs.size()) == micro_batch_size_) break;
      auto ex = next_example();
      if (!ex) return {};
      if (packing_) {
        lengths.push_back(int64_t(ex->second.input_ids.size()));
        if (int64_t(plan_packing(lengths, max_length_).size()) > micro_batch_size_) {
          pending_ = ex->first;
          break;
        }
      }
      out.index.push_back(ex->first);
      out.seqs.push_back(std::move(ex->second));
    }
    return out;
  }

  // `ex` collated, packed or one example per row, with its stored teacher rows when `stored` is set.
  MicroBatch make_micro_batch(const Examples& ex, bool pack, const SftDataset& ds,
                              const std::optional<StoredTopK>& stored) const {
    // The examples of each batch row, in order.
    std::vector<std::vector<int64_t>> rows;
    MicroBatch mb;
    if (pack) {
      std::vector<int64_t> lengths;
      for (const auto& s : ex.seqs) lengths.push_back(int64_t(s.input_ids.size()));
      rows = plan_packing(lengths, max_length_);
      mb.batch = collate_packed(ex.seqs, rows, pad_id_);
    } else {
      for (size_t i = 0; i < ex.seqs.size(); ++i) rows.push_back({int64_t(i)});
      mb.batch = collate_padded(ex.seqs, pad_id_);
    }
    mb.units = double((mb.batch.labels != kIgnoreIndex).sum().item<int64_t>());
    mb.tokens = mb.batch.attention_mask.sum().item<int64_t>();
    if (stored) {
      // The loss reads the batch's loss tokens row by row, left to right: each row's examples in
      // turn, and each example's stored rows follow its loss tokens.
      std::vector<at::Tensor> values, ids;
      for (const auto& row : rows)
        for (int64_t i : row) {
          const int64_t index = ex.index[size_t(i)];
          auto [v, t] = stored->rows(index, ex.seqs[size_t(i)], ds.file.where(index));
          values.push_back(std::move(v));
          ids.push_back(std::move(t));
        }
      mb.teacher_values = at::cat(values);
      mb.teacher_ids = at::cat(ids);
    }
    return mb;
  }

  LossSums compute(const MicroBatch& mb) {
    const Batch& b = mb.batch;
    ForwardInput in{b.input_ids.to(device_), b.attention_mask.to(device_), b.position_ids.to(device_),
                    b.segment_ids};
    in.checkpointed_layers = checkpointed_layers_;
    const auto labels = b.labels.to(device_);
    const auto hidden = forward_hidden(model_, in);
    const auto ce = -token_logprobs(model_, hidden, labels).sum();
    LossSums out;
    out.units = mb.units;
    out.tokens = mb.tokens;
    if (!teacher_ && !mb.teacher_values.defined()) {
      out.loss = ce;
      return out;
    }
    // Distillation reads logits only where the loss does.
    const auto rows = (labels.reshape({-1}) != kIgnoreIndex).nonzero().squeeze(1);
    const auto student_rows = hidden.reshape({-1, hidden.size(-1)}).index_select(0, rows);
    at::Tensor kd;
    if (teacher_) {
      at::Tensor values, ids;
      {
        at::NoGradGuard no_grad;
        in.checkpointed_layers = 0;
        auto th = forward_hidden(*teacher_, in);
        std::tie(values, ids) = lm_topk(*teacher_, th.reshape({-1, th.size(-1)}).index_select(0, rows),
                                        kd_top_k_, logit_chunk_rows(*teacher_));
      }
      kd = student_kd_loss_sum(model_, student_rows, values, ids, kd_temperature_);
    } else {
      kd = student_kd_loss_sum(model_, student_rows, mb.teacher_values.to(device_),
                               mb.teacher_ids.to(device_), kd_temperature_);
    }
    out.loss = ce_weight_ * ce + kd_weight_ * kd;
    // Means per loss token.
    out.metrics = {{"ce_loss", ce.item<double>(), out.units}, {"kd_loss", kd.item<double>(), out.units}};
    return out;
  }

  Transformer& model_;
  const Transformer* teacher_;
  at::Device device_;
  int rank_, world_;
  std::unique_ptr<SftDataset> train_, val_;
  std::optional<StoredTopK> stored_train_, stored_val_;  // kd.logits
  Sampler sampler_;
  std::optional<int64_t> pending_;
  std::vector<MicroBatch> step_;
  int64_t micro_batch_size_ = 1, max_epochs_ = 1, max_length_ = 0, kd_top_k_ = 0;
  double kd_temperature_ = 1, ce_weight_ = 1, kd_weight_ = 0;
  bool packing_ = false;
  int64_t checkpointed_layers_ = 0;
  int32_t pad_id_ = 0;
};

}  // namespace

void run_sft(const Config& cfg) {
  const auto opt = read_trainer_options(cfg);
  const auto optim = read_optimizer_settings(cfg, "optim", "trainer.grad_clip");
  const std::string model_dir = cfg.get_string("model.path");
  if (model_dir.empty()) fail("config key 'model.path' must be set");
  auto ctx = init_run(cfg);
  const auto dtype = parse_compute_dtype(cfg.get_string("model.dtype"), ctx.device, "model.dtype");
  Transformer model = load_transformer(model_dir, ctx.device, dtype);
  auto tok = load_tokenizer(model_dir);
  check_tokenizer_fits(*tok, model.cfg.vocab_size, model_dir);
  std::optional<Transformer> teacher;
  if (!cfg.get_string("kd.teacher").empty()) {
    teacher = load_transformer(cfg.get_string("kd.teacher"), ctx.device, dtype);
    if (teacher->cfg.vocab_size != model.cfg.vocab_size)
      fail("kd.teacher {} has a vocabulary of {}, the student {}", cfg.get_string("kd.teacher"),
           teacher->cfg.vocab_size, model.cfg.vocab_size);
  }
  auto module = trainable_model(model, cfg, optim, model_dir);
  Sft algo(cfg, *tok, model, teacher ? &*teacher : nullptr, ctx.device, ctx.dist.rank(),
           ctx.dist.world_size());
  train(cfg, opt, {module}, algo, ctx.dist);
}

}  // namespace aligner
