// AVX2 int8 kernels. AVX2 has no exact u8 x s8 dot product (vpmaddubsw
// saturates at int16 for a biased to 0..255), so the packed tile widens both
// operands to int16 and uses vpmaddwd, exact in int32: half the width of a
// VNNI dot product, still about twice fp32 FMA. The rest is the plain C++ of
// int8_generic.h compiled with -mavx2 -mfma.
#include <immintrin.h>

#include "int8_generic.h"

namespace pk {
namespace int8 {
namespace {

// Four k of one row of a (unsigned bytes) as int16, repeated in all four
// 64-bit lanes: the partner of a widened 4 x 4 block of the packed weight.
inline __m256i a4(const uint8_t* p) {
  return _mm256_broadcastq_epi64(_mm_cvtepu8_epi16(_mm_loadu_si32(p)));
}

// MR rows x one 16-column panel. acc[i][t] holds columns 4t..4t+3 of row i as
// pairs of partial sums (k 0-1 and k 2-3 of each group), added at the end.
template <int MR>
void panel_tile(const PackedGemm& g, int64_t i0, int64_t p) {
  __m256i c00 = _mm256_setzero_si256(), c01 = c00, c02 = c00, c03 = c00;
  __m256i c10 = c00, c11 = c00, c12 = c00, c13 = c00;
  int64_t gs;
  const int8_t* b = panel_base(g.b, g.kp, packed_n(g.n), p, &gs);
  const uint8_t* a0 = g.a + i0 * g.lda;
  const uint8_t* a1 = MR > 1 ? a0 + g.lda : a0;
  for (int64_t q = 0; q < g.kp / 4; ++q) {
    const int8_t* bq = b + q * gs;
    const __m256i b0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bq)));
    const __m256i b1 =
        _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bq + 16)));
    const __m256i b2 =
        _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bq + 32)));
    const __m256i b3 =
        _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bq + 48)));
    const __m256i x0 = a4(a0 + 4 * q);
    c00 = _mm256_add_epi32(c00, _mm256_madd_epi16(x0, b0));
    c01 = _mm256_add_epi32(c01, _mm256_madd_epi16(x0, b1));
    c02 = _mm256_add_epi32(c02, _mm256_madd_epi16(x0, b2));
    c03 = _mm256_add_epi32(c03, _mm256_madd_epi16(x0, b3));
    if (MR > 1) {
      const __m256i x1 = a4(a1 + 4 * q);
      c10 = _mm256_add_epi32(c10, _mm256_madd_epi16(x1, b0));
      c11 = _mm256_add_epi32(c11, _mm256_madd_epi16(x1, b1));
      c12 = _mm256_add_epi32(c12, _mm256_madd_epi16(x1, b2));
      c13 = _mm256_add_epi32(c13, _mm256_madd_epi16(x1, b3));
    }
  }
  const __m256i acc[2][4] = {{c00, c01, c02, c03}, {c10, c11, c12, c13}};
  for (int i = 0; i < MR; ++i) {
    alignas(32) int32_t s[32];
    for (int t = 0; t < 4; ++t)
      _mm256_store_si256(reinterpret_cast<__m256i*>(s + 8 * t), acc[i][t]);
    for (int j = 0; j < 16 && p * 16 + j < g.n; ++j) {
      // Wrapping unsigned sums, as in the generic kernel: exact once comp is off.
      const uint32_t v = uint32_t(s[2 * j]) + uint32_t(s[2 * j + 1]) - uint32_t(g.comp[p * 16 + j]);
      store_out(g, i0 + i, p * 16 + j, int32_t(v));
    }
  }
}

void gemm_packed(const PackedGemm& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    int64_t i = m0;
    for (; i + 2 <= m1; i += 2) panel_tile<2>(g, i, p);
    if (i < m1) panel_tile<1>(g, i, p);
  }
}

}  // namespace

const GemmKernels* gemm_kernels_avx2() {
  static const GemmKernels table{&gemm_rowmajor_generic, &gemm_packed, &pack_generic,
                                 &quantize_u8_generic, &weight_only_generic};
  return &table;
}

}  // namespace int8
}  // namespace pk
