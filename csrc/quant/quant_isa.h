// The per-ISA part of the quant family: loops over one bucket segment. Each
// ISA file implements these with its own flags; the driver (quant_cpu.cpp)
// picks one table from active_isa(), cuts the data into buckets and threads,
// and does the bit packing. Nothing here uses the standard library, so no
// inline function compiled with wide-vector flags can leak into the portable
// path.
#pragma once
#include <cstdint>

#include "../common/dtype.h"

namespace pk {
namespace quant {

struct Kernels {
  // Max of the sign-cleared bit patterns of y[0, len), y = float(x) (x of
  // dtype). With r: y = float(x) + r, and r = y is stored.
  uint32_t (*absmax_bits)(const void* x, DType dtype, float* r, int64_t len);
  // codes[j] = clamp(round(y[j] * inv), -lim, lim) + lim for j in [0, len),
  // y = float(src) (src of dtype). Stochastic rounding adds the u of element
  // index whose low word is lo + j (key: see quant.h) before the floor; lo +
  // len must not wrap. With r: r[j] = y[j] - float(code - lim) * scale (r may
  // be src itself).
  void (*quantize)(const void* src, DType dtype, int64_t len, float inv, float scale, int32_t lim,
                   bool stochastic, uint32_t lo, uint32_t key, uint8_t* codes, float* r);
  // out[j] (+)= float(codes[j] - lim) * scale for j in [0, len).
  void (*dequantize)(const uint8_t* codes, int64_t len, float scale, int32_t lim, float* out,
                     bool accumulate);
};

// Portable and AVX2 only on x86: an AVX-512 tier could not be run on the
// development machine, so none is shipped. On aarch64, NEON serves every tier.
const Kernels* kernels_portable();
const Kernels* kernels_avx2();
const Kernels* kernels_neon();

// The table the driver runs at the current cap (tests check the dispatch).
const Kernels* active_kernels();

}  // namespace quant
}  // namespace pk
