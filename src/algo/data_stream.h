// How the reward models and DPO read their data: the data.* options, this rank's examples one
// micro-batch at a time in sampler order, and this rank's share of the validation set. Each
// example keeps its index in the data set, which keys what is cached about it (DPO's reference
// log-probs).
#pragma once
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "core/config.h"
#include "core/error.h"
#include "core/log.h"
#include "data/examples.h"
#include "data/sampler.h"
#include "model/config.h"
#include "text/chat_template.h"
#include "train/trainer.h"

namespace aligner {

// data.format and data.add_eos (where the config has them), data.max_length, data.truncation and
// data.skip_bad_lines. A
// max_length beyond the model's context is an error rather than positions it was never trained on;
// the default gives way to the context.
DataOptions read_data_options(const Config& cfg, const ModelConfig& model);

// Threads for checking data: this machine's cores shared by the ranks on it (LOCAL_WORLD_SIZE).
int data_check_threads();

// Builds every example of data set `ds` (data.train or data.validation, named by `key`) once before
// training (check_dataset: every bad line found and reported now) and logs what it holds: the
// examples, their record layouts, the chat template, and what was skipped, dropped or truncated.
template <class Dataset>
void check_and_describe(Dataset& ds, const std::string& key) {
  check_dataset(ds, data_check_threads());
  std::string layouts;
  for (const auto& [name, n] : ds.stats.layouts)
    layouts += fmt::format("{}{} {}", layouts.empty() ? "" : ", ", name, n);
  log_info("{} {}: {} examples ({}), chat template {}", key, ds.file.path(), dataset_size(ds), layouts,
           chat_format_name(ds.tmpl.format));
  const auto report = data_report(ds.stats, ds.file.path(), ds.opt.max_length);
  if (!report.empty()) log_info("{}", report);  // the report says "warning:" itself
}

// A recipe's data: data.train (which must be set) and data.validation (null when not set), each
// opened by `open(path)`, checked and described, and this rank's sampler over data.train
// (data.shuffle, trainer.seed).
template <class Dataset, class Open>
std::tuple<std::unique_ptr<Dataset>, std::unique_ptr<Dataset>, Sampler> open_train_data(const Config& cfg,
                                                                                        int rank, int world,
                                                                                        Open&& open) {
  const std::string train_path = cfg.get_string("data.train"), val_path = cfg.get_string("data.validation");
  if (train_path.empty()) fail("config key 'data.train' must be set");
  auto train = std::make_unique<Dataset>(open(train_path));
  check_and_describe(*train, "data.train");
  std::unique_ptr<Dataset> val;
  if (!val_path.empty()) {
    val = std::make_unique<Dataset>(open(val_path));
    check_and_describe(*val, "data.validation");
  }
  Sampler sampler = make_sampler(dataset_size(*train), rank, world, cfg.get_bool("data.shuffle"),
                                 uint64_t(cfg.get_int("trainer.seed")));
  return {std::move(train), std::move(val), std::move(sampler)};
}

// An offline recipe whose resumable state is where its sampler stands in data.train: saved as
// {"position"}, and cut anew for another number of ranks by resharded_position.
class SampledAlgorithm : public Algorithm {
 public:
  nlohmann::json state() const override { return {{"position", sampler_.position}}; }
  void load_state(const nlohmann::json& s) override { sampler_.position = s.at("position").get<int64_t>(); }
  std::optional<nlohmann::json> reshard_state(const std::vector<nlohmann::json>& saved) const override {
    const auto p = resharded_position(sampler_, saved);
    return p ? std::optional<nlohmann::json>(nlohmann::json{{"position", *p}}) : std::nullopt;
  }

 protected:
  Sampler sampler_;
};

template <class Example>
struct Indexed {
  int64_t index = 0;  // in its data set
  Example example;
};

// The example type that a reader `read(index) -> std::optional<Example>` gives.
template <class Read>
using ExampleOf = typename std::invoke_result_t<Read&, int64_t>::value_type;

// This rank's next n examples in sampler order, skipping those `read` drops (nullopt). Empty once
// max_epochs (<= 0: no limit) are done, also when that leaves fewer than n: a short last
// micro-batch would weigh its examples differently from the others.
template <class Read>
std::vector<Indexed<ExampleOf<Read>>> next_examples(Sampler& sampler, int64_t max_epochs, int64_t n,
                                                    Read&& read) {
  std::vector<Indexed<ExampleOf<Read>>> out;
  while (int64_t(out.size()) < n) {
    if (max_epochs > 0 && current_epoch(sampler) >= max_epochs) return {};
    const int64_t index = next_index(sampler);
    if (auto ex = read(index)) out.push_back({index, std::move(*ex)});
  }
  return out;
}

// This rank's next n micro-batches of micro_batch_size examples each (next_examples); empty once
// max_epochs are done before all n are full.
template <class Read>
std::vector<std::vector<Indexed<ExampleOf<Read>>>> next_micro_batches(Sampler& sampler, int64_t max_epochs,
                                                                      int64_t micro_batch_size, int64_t n,
                                                                      Read&& read) {
  std::vector<std::vector<Indexed<ExampleOf<Read>>>> out;
  for (int64_t i = 0; i < n; ++i) {
    auto batch = next_examples(sampler, max_epochs, micro_batch_size, read);
    if (batch.empty()) return {};
    out.push_back(std::move(batch));
  }
  return out;
}

// A recipe whose micro-batches are indices into its own data (prompts, images held in memory), taken
// in sampler order, and whose random draws are keyed by position_, where the sampler stood when the
// step began: the same when the run resumes, new at every step.
class IndexedAlgorithm : public SampledAlgorithm {
 public:
  bool next_step(int64_t n) override {
    position_ = sampler_.position;
    step_ =
        next_micro_batches(sampler_, epochs_, micro_, n, [](int64_t i) { return std::optional<int64_t>(i); });
    return !step_.empty();
  }
  double units(int64_t i) const override { return double(step_.at(i).size()); }

 protected:
  int64_t micro_ = 1, epochs_ = 1, position_ = 0;  // trainer.micro_batch_size, data_epochs
  std::vector<std::vector<Indexed<int64_t>>> step_;
};

// The validation set in file order, cut into micro-batches of n examples (the last may be short);
// rank r takes micro-batches r, r + world, ... Every rank reads the whole set to cut it the same way.
template <class Read>
std::vector<std::vector<Indexed<ExampleOf<Read>>>> validation_batches(int64_t size, int64_t n, int rank,
                                                                      int world, Read&& read) {
  std::vector<std::vector<Indexed<ExampleOf<Read>>>> out;
  std::vector<Indexed<ExampleOf<Read>>> batch;
  int64_t batch_index = 0;
  auto flush = [&] {
    if (!batch.empty() && batch_index++ % world == rank) out.push_back(std::move(batch));
    batch.clear();
  };
  for (int64_t i = 0; i < size; ++i) {
    if (auto ex = read(i)) batch.push_back({i, std::move(*ex)});
    if (int64_t(batch.size()) == n) flush();
  }
  flush();
  return out;
}

// The examples without their indices, as the collate functions take them.
template <class Example>
std::vector<Example> examples_of(const std::vector<Indexed<Example>>& batch) {
  std::vector<Example> out;
  out.reserve(batch.size());
  for (const auto& e : batch) out.push_back(e.example);
  return out;
}

}  // namespace aligner
