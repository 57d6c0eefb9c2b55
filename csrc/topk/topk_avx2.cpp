// AVX2 (+FMA, F16C) scans; compiled with -mavx2 only in this file. AVX2 has
// no unsigned compare, but keys are below 2^31 (2^15) and thresholds at most
// 2^31 (2^15), so key >= t is the signed key > t - 1.
#include <immintrin.h>

#include "topk_scan.h"

namespace pk {
namespace topk {
namespace {

struct Avx2 {
  static uint64_t mask_u32(const uint32_t* p, uint32_t t) {
    const __m256i vm = _mm256_set1_epi32(0x7fffffff), vt = _mm256_set1_epi32(int(t - 1u));
    uint64_t m = 0;
    for (int q = 0; q < 8; ++q) {
      const __m256i v =
          _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 8 * q)), vm);
      const __m256i c = _mm256_cmpgt_epi32(v, vt);
      m |= uint64_t(uint32_t(_mm256_movemask_ps(_mm256_castsi256_ps(c)))) << (8 * q);
    }
    return m;
  }
  static uint64_t mask_u16(const uint16_t* p, uint32_t t) {
    const __m256i vm = _mm256_set1_epi16(0x7fff), vt = _mm256_set1_epi16(short(t - 1u));
    uint64_t m = 0;
    for (int q = 0; q < 2; ++q) {
      const uint16_t* s = p + 32 * q;
      const __m256i a =
          _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)), vm);
      const __m256i b =
          _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 16)), vm);
      // packs interleaves the 128-bit lanes; the permute restores element order.
      const __m256i packed = _mm256_permute4x64_epi64(
          _mm256_packs_epi16(_mm256_cmpgt_epi16(a, vt), _mm256_cmpgt_epi16(b, vt)), 0xD8);
      m |= uint64_t(uint32_t(_mm256_movemask_epi8(packed))) << (32 * q);
    }
    return m;
  }
  template <class Load>
  static uint64_t ef(Load load, float* r, uint32_t t) {
    const __m256i vm = _mm256_set1_epi32(0x7fffffff), vt = _mm256_set1_epi32(int(t - 1u));
    uint64_t m = 0;
    for (int q = 0; q < 8; ++q) {
      const __m256 y = _mm256_add_ps(load(q), _mm256_loadu_ps(r + 8 * q));
      _mm256_storeu_ps(r + 8 * q, y);
      const __m256i key = _mm256_and_si256(_mm256_castps_si256(y), vm);
      const __m256i c = _mm256_cmpgt_epi32(key, vt);
      m |= uint64_t(uint32_t(_mm256_movemask_ps(_mm256_castsi256_ps(c)))) << (8 * q);
    }
    return m;
  }
  static uint64_t ef_f32(const uint32_t* x, float* r, uint32_t t) {
    return ef(
        [&](int q) {
          return _mm256_castsi256_ps(
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 8 * q)));
        },
        r, t);
  }
  static uint64_t ef_f16(const uint16_t* x, float* r, uint32_t t) {
    return ef(
        [&](int q) {
          return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + 8 * q)));
        },
        r, t);
  }
  static uint64_t ef_bf16(const uint16_t* x, float* r, uint32_t t) {
    return ef(
        [&](int q) {
          const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + 8 * q));
          return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
        },
        r, t);
  }
};

}  // namespace

const ScanKernels* scan_kernels_avx2() { return scan::make_scan_kernels<Avx2>(); }

}  // namespace topk
}  // namespace pk
