// Training checkpoints. OUTPUT_DIR/checkpoints/step_N/ holds, for each trainable module NAME,
//   NAME/                        a Hugging Face folder when the module trains its whole model (so a
//                                checkpoint loads like any model folder), else NAME/trainable.safetensors
//                                holding only the trained tensors, or with fully sharded weights
//                                NAME/trainable.rank-R-of-W.safetensors, one per rank (pieces, as below)
//   NAME.optimizer.safetensors   its AdamW state, or with a sharded optimizer (trainer.sharding)
//   NAME.optimizer.rank-R-of-W.safetensors, one per rank: the flat pieces that rank updates, each
//                                tensor's offset into its parameter in the metadata ("offsets")
// and trainer_state.json: the step, the number of ranks, the modules, each rank's data position, and
// the size and CRC-32C of every other file. Everything is written under step_N.tmp/ and renamed once
// complete, so a kill at any moment leaves every step_N/ whole; the checksums catch what happens to
// the files afterwards (a full disk, a bad copy).
#pragma once
#include <nlohmann/json.hpp>

#include <exception>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "io/safetensors.h"
#include "model/transformer.h"

namespace aligner {

struct CheckpointModule {
  std::string name;
  const Transformer* model = nullptr;
  safetensors::NamedTensors params;           // what trains, by name
  bool whole_model = false;                   // params are all of the model's: write a Hugging Face folder
  safetensors::NamedTensors optimizer_state;  // empty: each rank writes its shard (write_optimizer_shard)
  bool sharded_params = false;                // each rank writes its pieces (write_weight_shard)
  std::string tokenizer_dir;                  // copied into a whole model's folder
};

struct CheckpointState {
  int64_t step = 0;
  int64_t world_size = 1;
  std::vector<std::string> modules;
  std::vector<nlohmann::json> data;  // per rank
};

// Saving: one rank empties step_<step>.tmp/ (begin_checkpoint), every rank with a sharded
// optimizer writes its shard into it, then that rank writes the rest and renames the folder to
// step_<step>/ (save_checkpoint), and deletes all but the newest keep_last (keep_last <= 0 keeps
// all), with every rank's data position in `state`.
std::string begin_checkpoint(const std::string& output_dir, int64_t step);
std::string checkpoint_tmp_dir(const std::string& output_dir, int64_t step);
// `state` is an AdamW state() over pieces of parameters; offsets: each parameter's piece's offset.
void write_optimizer_shard(const std::string& tmp_dir, const std::string& module, int rank, int world,
                           const safetensors::NamedTensors& state,
                           const std::map<std::string, int64_t>& offsets);
// Fully sharded weights (trainer.sharding=full): each rank's pieces of what trains, as
// NAME/trainable.rank-R-of-W.safetensors in the same layout.
void write_weight_shard(const std::string& tmp_dir, const std::string& module, int rank, int world,
                        const safetensors::NamedTensors& pieces,
                        const std::map<std::string, int64_t>& offsets);
void save_checkpoint(const std::string& output_dir, const std::vector<CheckpointModule>& modules,
                     const CheckpointState& state, int64_t keep_last);

// save_checkpoint on a thread of its own, so that training goes on while the files are written.
// write() takes a snapshot first (every tensor copied to the CPU, a whole model as a CPU copy of its
// own) and returns once that copy is made; a write still under way is waited for before, so at most
// one snapshot is held in host memory. wait() returns once nothing is being written and rethrows what
// the last write failed with; the destructor waits too.
class CheckpointWriter {
 public:
  CheckpointWriter() = default;
  CheckpointWriter(const CheckpointWriter&) = delete;
  CheckpointWriter& operator=(const CheckpointWriter&) = delete;
  ~CheckpointWriter();
  void write(const std::string& output_dir, const std::vector<CheckpointModule>& modules,
             const CheckpointState& state, int64_t keep_last);
  void wait();

 private:
  std::thread thread_;
  std::exception_ptr error_;
};

// What is wrong with a checkpoint folder (unreadable state, a file missing or not of its recorded
// size and checksum), or "" when it is whole.
std::string checkpoint_problem(const std::string& checkpoint_dir);

// The newest whole checkpoint folder, skipping damaged newer ones with a warning; "" when there is
// none. An aligner::Error when every checkpoint is damaged, rather than starting afresh.
std::string latest_checkpoint(const std::string& output_dir);

CheckpointState read_checkpoint_state(const std::string& checkpoint_dir);
// A module's trained tensors and its optimizer state, as save_checkpoint wrote them.
// With pieces written by each rank (write_weight_shard), the whole tensors `expected` names.
safetensors::NamedTensors read_module_params(const std::string& checkpoint_dir, const std::string& module,
                                             const safetensors::NamedTensors& expected);
// The optimizer state that `expected` (an AdamW state() of this run) names, shaped as it is, whatever
// the sharding and number of ranks that wrote it: each tensor is the range [offset, offset + numel)
// of its parameter's state (offsets by parameter name; absent: 0, a whole parameter), put together
// from the pieces of the files that hold it. A range the checkpoint does not cover is an error.
safetensors::NamedTensors read_module_optimizer(const std::string& checkpoint_dir, const std::string& module,
                                                const safetensors::NamedTensors& expected,
                                                const std::map<std::string, int64_t>& offsets);
// Fully sharded weights (trainer.sharding=full): each rank's pieces of what trains, as
// NAME/trainable.rank-R-of-W.safetensors in the same layout.
void write_weight_shard(const std::string& tmp_dir, const std::string& module, int rank, int world,
                        const safetensors::NamedTensors& pieces,
                        const std::map<std::string, int64_t>& offsets);

}  // namespace aligner
