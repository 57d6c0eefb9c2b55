// The integer hashes behind the kernels' counter-based random numbers, which
// every implementation (each ISA, Numba, the reference) must reproduce bit for
// bit. Internal linkage (static), as in half.h: ISA files include this too.
#pragma once
#include <cstdint>

namespace pk {

// lowbias32 (x ^= x >> 16; x *= kLowbias32Mul1; x ^= x >> 15;
// x *= kLowbias32Mul2; x ^= x >> 16): quant's rounding noise (quant.h).
// Vector versions use these constants.
constexpr uint32_t kLowbias32Mul1 = 0x7feb352du;
constexpr uint32_t kLowbias32Mul2 = 0x846ca68bu;

static inline uint32_t lowbias32(uint32_t h) {
  h ^= h >> 16;
  h *= kLowbias32Mul1;
  h ^= h >> 15;
  h *= kLowbias32Mul2;
  h ^= h >> 16;
  return h;
}

// splitmix64's output function, without the state increment: a 64-bit mix
// of a counter (topk's sample positions).
static inline uint64_t splitmix64_mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// One splitmix64 step from state z (quant's per-seed key, quant.h).
static inline uint64_t splitmix64(uint64_t z) { return splitmix64_mix(z + 0x9e3779b97f4a7c15ull); }

}  // namespace pk
