// AVX-512 Krylov-pass kernels: svd_generic.h over 16-lane registers. 32
// registers hold a 4 x 6 tile of dot products (24 accumulators, 4 rows of a,
// one row of q) or 6 outputs x 64 columns for the combination.
#include <immintrin.h>

#include "svd_generic.h"

namespace pk {
namespace svd {
namespace {

struct V512 {
  using reg = __m512;
  static constexpr int kLanes = 16;
  static __m512 zero() { return _mm512_setzero_ps(); }
  static __m512 load(const float* p) { return _mm512_loadu_ps(p); }
  static __mmask16 mask(int lanes) { return __mmask16((1u << lanes) - 1); }
  static __m512 load_part(const float* p, int lanes) {
    return _mm512_maskz_loadu_ps(mask(lanes), p);
  }
  static void store_part(float* p, __m512 v, int lanes) {
    _mm512_mask_storeu_ps(p, mask(lanes), v);
  }
  static __m512 fma(__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); }
  static __m512 set1(float x) { return _mm512_set1_ps(x); }
  static float sum(__m512 v) { return _mm512_reduce_add_ps(v); }
};

}  // namespace

const Kernels* kernels_avx512() {
  static const Kernels table{.dot_rows = &dot_rows_generic<V512, 4, 6>,
                             .combine_rows = &combine_rows_generic<V512, 4, 6>,
                             .row_tile = 4,
                             .col_tile = 64};
  return &table;
}

}  // namespace svd
}  // namespace pk
