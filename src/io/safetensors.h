// safetensors files (https://github.com/huggingface/safetensors): an 8-byte little-endian header
// length, a JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {...}}, then the data.
// Reads are memory-mapped; tensors returned by File::get share the mapping (no copy) and keep it
// alive. Sharded checkpoints ("model-00001-of-00003.safetensors" + "model.safetensors.index.json")
// are read and written by the *_dir functions.
#pragma once
#include <ATen/ATen.h>

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace aligner::safetensors {

struct TensorInfo {
  std::string name;
  at::ScalarType dtype;
  std::vector<int64_t> shape;
  size_t begin = 0;  // byte offsets into the data section
  size_t end = 0;
};

struct Mapping;  // the mmap'd file; shared by every tensor taken from it

class File {
 public:
  // Throws aligner::Error naming the file (and tensor) for a missing or truncated file, a bad
  // header, an unknown dtype, offsets that overlap, leave gaps or run past the end of the file,
  // or a byte count that does not match the shape.
  static File open(const std::string& path);

  const std::string& path() const { return path_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(const std::string& name) const;
  const TensorInfo& info(const std::string& name) const;  // throws naming file and tensor
  // A CPU tensor viewing the mapped bytes (read-only mapping: clone before writing in place).
  at::Tensor get(const std::string& name) const;

 private:
  std::string path_;
  std::shared_ptr<Mapping> mapping_;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

// Writes one file (tensors moved to CPU and made contiguous; order kept). The file is written to
// "<path>.tmp" and renamed, so a crash never leaves a half-written file under the final name.
void save(const std::string& path, const NamedTensors& tensors,
          const std::map<std::string, std::string>& metadata = {{"format", "pt"}});

// A model folder's weights: "model.safetensors", or the shards listed by
// "model.safetensors.index.json" (weight_map: tensor name -> shard file). A shard that is missing
// or a tensor the index names but the shard lacks is an error naming both. Every file read must lie
// inside `dir`: a shard name that is absolute or holds "..", or a symlink that leads out of the
// folder (but for the Hugging Face cache's links from snapshots/REV/ to blobs/), is an error naming
// the index and the entry.
class Checkpoint {
 public:
  static Checkpoint open_dir(const std::string& dir);
  std::vector<std::string> names() const;  // sorted
  bool contains(const std::string& name) const;
  const TensorInfo& info(const std::string& name) const;
  at::Tensor get(const std::string& name) const;

 private:
  std::string dir_;  // for error messages
  std::vector<File> files_;
  std::map<std::string, size_t> where_;  // tensor name -> index into files_
};

// Writes "model.safetensors", or when the total exceeds max_shard_bytes (> 0), shards named as
// transformers names them plus the index json (metadata.total_size). Existing weight files of
// the other layout in `dir` are removed so the folder is never ambiguous.
void save_dir(const std::string& dir, const NamedTensors& tensors, int64_t max_shard_bytes = 0);

// "F32" <-> at::kFloat etc. (F64 F32 F16 BF16 I64 I32 I16 I8 U8 BOOL).
at::ScalarType dtype_from_string(const std::string& s);  // throws for unknown
std::string dtype_to_string(at::ScalarType t);

}  // namespace aligner::safetensors
