// NEON Krylov-pass kernels: svd_generic.h over 4-lane registers. 32
// registers hold a 4 x 6 tile of dot products (24 accumulators, 4 rows of a,
// one row of q) or 6 outputs x 16 columns for the combination; every
// Armv8-A core has them, so one table serves the dotprod and i8mm tiers too.
#include <arm_neon.h>

#include "svd_generic.h"

namespace pk {
namespace svd {
namespace {

struct V128 {
  using reg = float32x4_t;
  static constexpr int kLanes = 4;
  static float32x4_t zero() { return vdupq_n_f32(0.0f); }
  static float32x4_t load(const float* p) { return vld1q_f32(p); }
  static float32x4_t load_part(const float* p, int lanes) {
    float t[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int i = 0; i < lanes; ++i) t[i] = p[i];
    return vld1q_f32(t);
  }
  static void store_part(float* p, float32x4_t v, int lanes) {
    float t[4];
    vst1q_f32(t, v);
    for (int i = 0; i < lanes; ++i) p[i] = t[i];
  }
  static float32x4_t fma(float32x4_t a, float32x4_t b, float32x4_t c) { return vfmaq_f32(c, a, b); }
  static float32x4_t set1(float x) { return vdupq_n_f32(x); }
  static float sum(float32x4_t v) { return vaddvq_f32(v); }
};

}  // namespace

const Kernels* kernels_neon() {
  static const Kernels table{.dot_rows = &dot_rows_generic<V128, 4, 6>,
                             .combine_rows = &combine_rows_generic<V128, 4, 6>,
                             .row_tile = 4,
                             .col_tile = 16};
  return &table;
}

}  // namespace svd
}  // namespace pk
