// The qat row loops in plain C++, compiled once per ISA file (anonymous
// namespace: each file keeps its own copy). The arithmetic is
// quantize_per_row_cpu's (csrc/int8/int8_cpu.cpp) to the bit: amax / 127 and
// a true division x / s, never a multiplication by 1 / s, which rounds
// differently.
#pragma once
#include <cstdint>

#include "qat_isa.h"

namespace pk {
namespace qat {
namespace {

// A row with NaN or inf: the slow, exact path (rare: bad data).
void bad_row(const float* xr, int64_t cols, float* yr, uint8_t* mr, float* sr) {
  float amax = 0.0f;
  bool nan = false;
  for (int64_t c = 0; c < cols; ++c) {
    const float v = xr[c];
    nan |= v != v;
    const float a = __builtin_fabsf(v);
    amax = amax < a ? a : amax;
  }
  const float s = nan ? __builtin_nanf("") : amax / 127.0f;
  *sr = s;
  for (int64_t c = 0; c < cols; ++c) {
    yr[c] = 0.0f * s;  // NaN: the row carries no information, as in int8_linear
    mr[c] = 0;
  }
}

[[maybe_unused]] void fake_quant_rows_generic(const float* x, int64_t cols, int64_t ld, float* y,
                                              uint8_t* mask, float* scale, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * ld;
    float* yr = y + r * cols;
    uint8_t* mr = mask + r * cols;
    // amax by a max reduction; z = sum(x * 0) is NaN exactly when the row
    // holds NaN or inf, so the vector loop needs no per-element branch.
    float amax = 0.0f, z = 0.0f;
#pragma omp simd reduction(max : amax) reduction(+ : z)
    for (int64_t c = 0; c < cols; ++c) {
      const float a = __builtin_fabsf(xr[c]);
      amax = amax < a ? a : amax;
      z += xr[c] * 0.0f;
    }
    if (z != z) {
      bad_row(xr, cols, yr, mr, scale + r);
      continue;
    }
    const float s = amax / 127.0f;
    scale[r] = s;
    if (!(s > 0.0f)) {  // a row of zeros: nothing to round, the gradient passes
      for (int64_t c = 0; c < cols; ++c) {
        yr[c] = 0.0f * s;
        mr[c] = s == 0.0f;
      }
      continue;
    }
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) {
      const float t = xr[c] / s;
      float q = __builtin_nearbyintf(t);  // round half to even
      q = q > 127.0f ? 127.0f : (q < -127.0f ? -127.0f : q);
      yr[c] = q * s;
      mr[c] = uint8_t(__builtin_fabsf(t) <= 127.5f);
    }
  }
}

[[maybe_unused]] void backward_generic(const float* grad, const uint8_t* mask, float* out,
                                       int64_t i0, int64_t i1) {
#pragma omp simd
  for (int64_t i = i0; i < i1; ++i) out[i] = mask[i] ? grad[i] : 0.0f;
}

}  // namespace
}  // namespace qat
}  // namespace pk
