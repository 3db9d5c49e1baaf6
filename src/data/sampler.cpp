#include "data/sampler.h"

#include <limits>
#include <numeric>

#include "core/error.h"

namespace aligner {

namespace {

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Uniform in [0, n), without the bias of a plain modulo.
uint64_t below(uint64_t& state, uint64_t n) {
  uint64_t limit = std::numeric_limits<uint64_t>::max() - std::numeric_limits<uint64_t>::max() % n;
  uint64_t x;
  do x = splitmix64(state);
  while (x >= limit);
  return x % n;
}

}  // namespace

Sampler make_sampler(int64_t num_examples, int64_t rank, int64_t world, bool shuffle, uint64_t seed) {
  if (world < 1 || rank < 0 || rank >= world)
    fail("sampler: rank {} of world size {} is invalid", rank, world);
  if (num_examples < world) {
    fail("sampler: {} examples cannot be shared by {} data-parallel ranks", num_examples, world);
  }
  Sampler s;
  s.num_examples = num_examples;
  s.rank = rank;
  s.world = world;
  s.shuffle = shuffle;
  s.seed = seed;
  return s;
}

int64_t epoch_size(const Sampler& s) {
  return s.num_examples / s.world;
}

int64_t current_epoch(const Sampler& s) {
  return s.position / epoch_size(s);
}

std::vector<int64_t> epoch_order(const Sampler& s, int64_t epoch) {
  std::vector<int64_t> all(static_cast<size_t>(s.num_examples));
  std::iota(all.begin(), all.end(), 0);
  if (s.shuffle) {
    uint64_t state = s.seed;
    state = splitmix64(state) ^ static_cast<uint64_t>(epoch);
    for (size_t i = all.size() - 1; i > 0; --i) std::swap(all[i], all[below(state, i + 1)]);
  }
  std::vector<int64_t> mine(static_cast<size_t>(epoch_size(s)));
  for (size_t k = 0; k < mine.size(); ++k)
    mine[k] = all[static_cast<size_t>(s.rank) + k * static_cast<size_t>(s.world)];
  return mine;
}

int64_t next_index(Sampler& s) {
  int64_t epoch = current_epoch(s);
  if (epoch != s.cached_epoch) {
    s.cached_order = epoch_order(s, epoch);
    s.cached_epoch = epoch;
  }
  int64_t index = s.cached_order[static_cast<size_t>(s.position % epoch_size(s))];
  ++s.position;
  return index;
}

std::optional<int64_t> resharded_position(const Sampler& s, const std::vector<nlohmann::json>& saved) {
  std::vector<int64_t> positions;
  for (const auto& state : saved) positions.push_back(state.at("position").get<int64_t>());
  const int64_t old_world = int64_t(positions.size());
  if (positions.empty() || s.num_examples % old_world != 0 || s.num_examples % s.world != 0)
    return std::nullopt;
  for (int64_t p : positions)
    if (p != positions.front()) return std::nullopt;
  // Rank r of W reads positions r, r + W, ... of each epoch's order: together the ranks have read
  // the first position x W of it.
  const int64_t read = positions.front() * old_world;
  if (read % s.world != 0) return std::nullopt;
  return read / s.world;
}

}  // namespace aligner
