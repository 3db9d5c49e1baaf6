// Open-addressing hash maps for the tokenizer's hot lookups: string keys are looked up as
// string_view without building a std::string (C++17's unordered_map cannot), and all keys live in
// one arena instead of one allocation each.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

namespace aligner {

template <class V>
class StringMap {
 public:
  const V* find(std::string_view key) const {
    if (slots_.empty()) return nullptr;
    uint64_t h = hash(key);
    for (size_t i = h & mask_;; i = (i + 1) & mask_) {
      const Slot& s = slots_[i];
      if (s.length == kEmpty) return nullptr;
      if (s.hash == h && key == std::string_view(arena_.data() + s.offset, s.length)) return &s.value;
    }
  }

  // Inserts or overwrites.
  void set(std::string_view key, const V& value) {
    if ((size_ + 1) * 2 > slots_.size()) grow();
    uint64_t h = hash(key);
    size_t i = h & mask_;
    for (;; i = (i + 1) & mask_) {
      Slot& s = slots_[i];
      if (s.length == kEmpty) break;
      if (s.hash == h && key == std::string_view(arena_.data() + s.offset, s.length)) {
        s.value = value;
        return;
      }
    }
    slots_[i] = Slot{h, static_cast<uint32_t>(arena_.size()), static_cast<uint32_t>(key.size()), value};
    arena_.append(key);
    ++size_;
  }

  size_t size() const { return size_; }

  void clear() {
    slots_.clear();
    arena_.clear();
    size_ = 0;
    mask_ = 0;
  }

 private:
  static constexpr uint32_t kEmpty = UINT32_MAX;
  struct Slot {
    uint64_t hash = 0;
    uint32_t offset = 0;
    uint32_t length = kEmpty;
    V value{};
  };

  static uint64_t hash(std::string_view key) { return std::hash<std::string_view>{}(key); }

  void grow() {
    std::vector<Slot> old = std::move(slots_);
    slots_.assign(old.empty() ? 64 : old.size() * 2, Slot{});
    mask_ = slots_.size() - 1;
    for (const Slot& s : old) {
      if (s.length == kEmpty) continue;
      size_t i = s.hash & mask_;
      while (slots_[i].length != kEmpty) i = (i + 1) & mask_;
      slots_[i] = s;
    }
  }

  std::vector<Slot> slots_;
  std::string arena_;
  size_t size_ = 0;
  size_t mask_ = 0;
};

template <class V>
class IntMap {
 public:
  const V* find(uint64_t key) const {
    if (slots_.empty()) return nullptr;
    for (size_t i = mix(key) & mask_;; i = (i + 1) & mask_) {
      const Slot& s = slots_[i];
      if (!s.used) return nullptr;
      if (s.key == key) return &s.value;
    }
  }

  // Inserts or overwrites.
  void set(uint64_t key, const V& value) {
    if ((size_ + 1) * 2 > slots_.size()) grow();
    size_t i = mix(key) & mask_;
    while (slots_[i].used && slots_[i].key != key) i = (i + 1) & mask_;
    if (!slots_[i].used) ++size_;
    slots_[i] = Slot{key, value, true};
  }

 private:
  struct Slot {
    uint64_t key = 0;
    V value{};
    bool used = false;
  };

  // splitmix64's finalizer: pair keys (a << 32 | b) differ in few bits.
  static uint64_t mix(uint64_t x) {
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
  }

  void grow() {
    std::vector<Slot> old = std::move(slots_);
    slots_.assign(old.empty() ? 64 : old.size() * 2, Slot{});
    mask_ = slots_.size() - 1;
    for (const Slot& s : old) {
      if (!s.used) continue;
      size_t i = mix(s.key) & mask_;
      while (slots_[i].used) i = (i + 1) & mask_;
      slots_[i] = s;
    }
  }

  std::vector<Slot> slots_;
  size_t size_ = 0;
  size_t mask_ = 0;
};

}  // namespace aligner
