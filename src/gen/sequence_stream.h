// The random stream of a generated sequence, shared by the host (which assigns it) and the CUDA
// sampling kernel (which draws from it with the token's position): a sequence's samples then
// depend on the seed and the sequence alone, not on which slot or batch it was decoded in.
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#define ALIGNER_HOST_DEVICE __host__ __device__
#else
#define ALIGNER_HOST_DEVICE
#endif

namespace aligner {

ALIGNER_HOST_DEVICE constexpr uint64_t mix64(uint64_t x) {  // splitmix64's finaliser
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

ALIGNER_HOST_DEVICE constexpr uint64_t sequence_stream(uint64_t seed, uint64_t sequence) {
  return mix64(seed ^ mix64(sequence + 0x9e3779b97f4a7c15ULL));
}

// The uniform in (0, 1) that the token at `position` of the sequence draws: 23 random bits, so
// that the value is exact in float32 and never 0 or 1.
ALIGNER_HOST_DEVICE inline float stream_uniform(uint64_t stream, int64_t position) {
  const uint64_t h = mix64(stream ^ mix64(uint64_t(position) + 0x9e3779b97f4a7c15ULL));
  return (float(h >> 41) + 0.5f) * (1.f / 8388608.f);
}

}  // namespace aligner
