// The order examples are read in: a seeded shuffle per epoch, split across data-parallel ranks,
// running on over epoch boundaries and resumable from a saved position.
#pragma once
#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <vector>

namespace aligner {

struct Sampler {
  int64_t num_examples = 0;
  int64_t rank = 0, world = 1;
  bool shuffle = true;
  uint64_t seed = 0;
  // Indices this rank has taken, over all epochs. Saving it (and the settings above) is enough to
  // resume the same sequence.
  int64_t position = 0;

  int64_t cached_epoch = -1;  // epoch_order(*this, cached_epoch), kept by next_index
  std::vector<int64_t> cached_order;
};

// Every rank gets num_examples / world indices per epoch: the shuffled order's positions rank,
// rank + world, ...; the ranks' shards are disjoint, and they cover the data set when world divides
// its size (else the last num_examples % world of each epoch's order are left out, a different
// few each epoch). Fewer examples than ranks is an error.
Sampler make_sampler(int64_t num_examples, int64_t rank, int64_t world, bool shuffle, uint64_t seed);
int64_t epoch_size(const Sampler& s);
int64_t current_epoch(const Sampler& s);
// This rank's indices for `epoch`, in order. The same seed and epoch give the same order on every
// platform (the shuffle does not depend on the standard library).
std::vector<int64_t> epoch_order(const Sampler& s, int64_t epoch);
// The index at `position`, then advances it.
int64_t next_index(Sampler& s);
// Where a rank of s.world ranks continues the order that saved.size() ranks had read up to (their
// data states, each with its "position": a checkpoint resumed with another number of ranks): the
// same place in the one shuffled order, exactly, when every rank had reached the same position
// and both numbers of ranks divide the data set and the examples read; nullopt otherwise.
std::optional<int64_t> resharded_position(const Sampler& s, const std::vector<nlohmann::json>& saved);

}  // namespace aligner
