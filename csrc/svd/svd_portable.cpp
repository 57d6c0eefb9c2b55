// Portable Krylov-pass kernels: svd_generic.h over a 4-float "register"
// that the compiler maps to whatever vectors the baseline target has.
#include "svd_generic.h"

namespace pk {
namespace svd {
namespace {

struct V4 {
  struct reg {
    float v[4];
  };
  static constexpr int kLanes = 4;
  static reg zero() { return reg{}; }
  static reg load(const float* p) { return reg{{p[0], p[1], p[2], p[3]}}; }
  static reg load_part(const float* p, int lanes) {
    reg r{};
    for (int i = 0; i < lanes; ++i) r.v[i] = p[i];
    return r;
  }
  static void store_part(float* p, reg v, int lanes) {
    for (int i = 0; i < lanes; ++i) p[i] = v.v[i];
  }
  static reg fma(reg a, reg b, reg c) {
    for (int i = 0; i < 4; ++i) c.v[i] += a.v[i] * b.v[i];
    return c;
  }
  static reg set1(float x) { return reg{{x, x, x, x}}; }
  static float sum(reg v) { return (v.v[0] + v.v[1]) + (v.v[2] + v.v[3]); }
};

}  // namespace

const Kernels* kernels_portable() {
  static const Kernels table{.dot_rows = &dot_rows_generic<V4, 2, 4>,
                             .combine_rows = &combine_rows_generic<V4, 2, 4>,
                             .row_tile = 2,
                             .col_tile = 8};
  return &table;
}

}  // namespace svd
}  // namespace pk
