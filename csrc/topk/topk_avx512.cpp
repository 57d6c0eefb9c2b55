// AVX-512 (F, BW, DQ, VL) scans; compiled with -mavx512* only in this file.
#include <immintrin.h>

#include "topk_scan.h"

namespace pk {
namespace topk {
namespace {

struct Avx512 {
  static uint64_t mask_u32(const uint32_t* p, uint32_t t) {
    const __m512i vm = _mm512_set1_epi32(0x7fffffff), vt = _mm512_set1_epi32(int(t));
    uint64_t m = 0;
    for (int q = 0; q < 4; ++q) {
      const __m512i v = _mm512_and_si512(_mm512_loadu_si512(p + 16 * q), vm);
      m |= uint64_t(_mm512_cmpge_epu32_mask(v, vt)) << (16 * q);
    }
    return m;
  }
  static uint64_t mask_u16(const uint16_t* p, uint32_t t) {
    const __m512i vm = _mm512_set1_epi16(0x7fff), vt = _mm512_set1_epi16(short(t));
    const __m512i a = _mm512_and_si512(_mm512_loadu_si512(p), vm);
    const __m512i b = _mm512_and_si512(_mm512_loadu_si512(p + 32), vm);
    return uint64_t(_mm512_cmpge_epu16_mask(a, vt)) |
           (uint64_t(_mm512_cmpge_epu16_mask(b, vt)) << 32);
  }
  template <class Load>
  static uint64_t ef(Load load, float* r, uint32_t t) {
    const __m512i vm = _mm512_set1_epi32(0x7fffffff), vt = _mm512_set1_epi32(int(t));
    uint64_t m = 0;
    for (int q = 0; q < 4; ++q) {
      const __m512 y = _mm512_add_ps(load(q), _mm512_loadu_ps(r + 16 * q));
      _mm512_storeu_ps(r + 16 * q, y);
      const __m512i key = _mm512_and_si512(_mm512_castps_si512(y), vm);
      m |= uint64_t(_mm512_cmpge_epu32_mask(key, vt)) << (16 * q);
    }
    return m;
  }
  static uint64_t ef_f32(const uint32_t* x, float* r, uint32_t t) {
    return ef([&](int q) { return _mm512_castsi512_ps(_mm512_loadu_si512(x + 16 * q)); }, r, t);
  }
  static uint64_t ef_f16(const uint16_t* x, float* r, uint32_t t) {
    return ef(
        [&](int q) {
          return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16 * q)));
        },
        r, t);
  }
  static uint64_t ef_bf16(const uint16_t* x, float* r, uint32_t t) {
    return ef(
        [&](int q) {
          const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16 * q));
          return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        },
        r, t);
  }
};

}  // namespace

const ScanKernels* scan_kernels_avx512() { return scan::make_scan_kernels<Avx512>(); }

}  // namespace topk
}  // namespace pk
