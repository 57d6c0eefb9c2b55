// AVX-512 VNNI int8 GEMM. vpdpbusd multiplies unsigned by signed bytes, so a
// is biased to unsigned (a + 128, an xor with 0x80) and 128 * sum_k b[j, k]
// is subtracted at the end. int32 arithmetic wraps, so the result is exact
// whenever the true sum fits in int32 (K < kMaxK guarantees it).
#include <immintrin.h>

#include "int8_isa.h"

namespace pk {
namespace int8 {
namespace {

constexpr int kMr = 4, kNr = 4;

template <int MR, int NR>
void tile(const int8_t* a, const int8_t* b, int32_t* c, const int32_t* comp, int64_t i0, int64_t j0,
          int64_t k, int64_t lda, int64_t ldb, int64_t ldc) {
  const __m512i bias = _mm512_set1_epi8(char(0x80));
  __m512i acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_si512();
  for (int64_t p = 0; p < k; p += 64) {
    const __mmask64 mask = k - p >= 64 ? ~__mmask64(0) : ((__mmask64(1) << (k - p)) - 1);
    __m512i av[MR], bv[NR];
    for (int i = 0; i < MR; ++i)
      // Masked-off bytes load as 0 and become 128 after the bias; b's are 0,
      // so they add nothing.
      av[i] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, a + (i0 + i) * lda + p), bias);
    for (int j = 0; j < NR; ++j) bv[j] = _mm512_maskz_loadu_epi8(mask, b + (j0 + j) * ldb + p);
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], av[i], bv[j]);
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j)
      c[(i0 + i) * ldc + j0 + j] = _mm512_reduce_add_epi32(acc[i][j]) - comp[j0 + j];
}

void gemm(const int8_t* a, const int8_t* b, int32_t* c, const int32_t* comp, int64_t m0, int64_t m1,
          int64_t n0, int64_t n1, int64_t k, int64_t lda, int64_t ldb, int64_t ldc) {
  for (int64_t j = n0; j < n1; j += kNr) {
    const bool full_n = n1 - j >= kNr;
    for (int64_t i = m0; i < m1; i += kMr) {
      if (full_n && m1 - i >= kMr) {
        tile<kMr, kNr>(a, b, c, comp, i, j, k, lda, ldb, ldc);
      } else {
        // Leftover rows (all of them when M < 4, e.g. a single token) still
        // share each load of a across kNr rows of b.
        for (int64_t ii = i; ii < i + kMr && ii < m1; ++ii) {
          if (full_n) {
            tile<1, kNr>(a, b, c, comp, ii, j, k, lda, ldb, ldc);
          } else {
            for (int64_t jj = j; jj < n1; ++jj) tile<1, 1>(a, b, c, comp, ii, jj, k, lda, ldb, ldc);
          }
        }
      }
    }
  }
}

}  // namespace

const GemmKernels* gemm_kernels_avx512_vnni() {
  static const GemmKernels table{&gemm, true};
  return &table;
}

}  // namespace int8
}  // namespace pk
