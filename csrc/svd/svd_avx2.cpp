// AVX2 Krylov-pass kernels: svd_generic.h over 8-lane registers. 16
// registers hold a 3 x 4 tile of dot products (12 accumulators, 3 rows of a,
// one row of q) or 6 outputs x 16 columns for the combination.
#include <immintrin.h>

#include "svd_generic.h"

namespace pk {
namespace svd {
namespace {

struct V256 {
  using reg = __m256;
  static constexpr int kLanes = 8;
  static __m256 zero() { return _mm256_setzero_ps(); }
  static __m256 load(const float* p) { return _mm256_loadu_ps(p); }
  static __m256i mask(int lanes) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static __m256 load_part(const float* p, int lanes) { return _mm256_maskload_ps(p, mask(lanes)); }
  static void store_part(float* p, __m256 v, int lanes) { _mm256_maskstore_ps(p, mask(lanes), v); }
  static __m256 fma(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }
  static __m256 set1(float x) { return _mm256_set1_ps(x); }
  static float sum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
};

}  // namespace

const Kernels* kernels_avx2() {
  static const Kernels table{.dot_rows = &dot_rows_generic<V256, 3, 4>,
                             .combine_rows = &combine_rows_generic<V256, 2, 6>,
                             .row_tile = 3,
                             .col_tile = 16};
  return &table;
}

}  // namespace svd
}  // namespace pk
