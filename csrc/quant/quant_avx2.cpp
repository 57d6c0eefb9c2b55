// AVX2 (+F16C) quant loops, 8 elements per step; compiled with -mavx2 only
// in this file. Tails go through the same vector body on a zero-padded copy,
// so no scalar conversion or rounding code is compiled here.
#include <immintrin.h>

#include "../common/hash.h"
#include "quant_isa.h"

namespace pk {
namespace quant {
namespace {

inline __m256 load8(const void* x, DType dtype, int64_t j) {
  switch (dtype) {
    case DType::f16:
      return _mm256_cvtph_ps(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + j)));
    case DType::bf16: {
      const __m128i h =
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + j));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    default:
      return _mm256_loadu_ps(static_cast<const float*>(x) + j);
  }
}

inline int elem_size(DType dtype) { return dtype == DType::f32 ? 4 : 2; }

inline void copy_bytes(void* dst, const void* src, int64_t n) {
  unsigned char* d = static_cast<unsigned char*>(dst);
  const unsigned char* s = static_cast<const unsigned char*>(src);
  for (int64_t i = 0; i < n; ++i) d[i] = s[i];
}

// common/hash.h's lowbias32 on 8 lanes.
inline __m256i lowbias32(__m256i h) {
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(int(kLowbias32Mul1)));
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 15));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(int(kLowbias32Mul2)));
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
  return h;
}

uint32_t absmax_bits(const void* x, DType dtype, float* r, int64_t len) {
  const __m256i mask = _mm256_set1_epi32(0x7fffffff);
  // Keys are below 2^31, so the signed max is the unsigned one.
  __m256i m0 = _mm256_setzero_si256(), m1 = _mm256_setzero_si256();
  int64_t j = 0;
  for (; j + 16 <= len; j += 16) {
    __m256 a = load8(x, dtype, j), b = load8(x, dtype, j + 8);
    if (r) {
      a = _mm256_add_ps(a, _mm256_loadu_ps(r + j));
      b = _mm256_add_ps(b, _mm256_loadu_ps(r + j + 8));
      _mm256_storeu_ps(r + j, a);
      _mm256_storeu_ps(r + j + 8, b);
    }
    m0 = _mm256_max_epi32(m0, _mm256_and_si256(_mm256_castps_si256(a), mask));
    m1 = _mm256_max_epi32(m1, _mm256_and_si256(_mm256_castps_si256(b), mask));
  }
  for (; j < len; j += 8) {
    const int64_t cnt = len - j < 8 ? len - j : 8;
    alignas(32) uint16_t tx[16] = {};
    alignas(32) float tr[8] = {};
    copy_bytes(tx, static_cast<const unsigned char*>(x) + j * elem_size(dtype),
               cnt * elem_size(dtype));
    __m256 a = load8(tx, dtype, 0);
    if (r) {
      copy_bytes(tr, r + j, cnt * 4);
      a = _mm256_add_ps(a, _mm256_load_ps(tr));
      _mm256_store_ps(tr, a);
      copy_bytes(r + j, tr, cnt * 4);
    }
    m0 = _mm256_max_epi32(m0, _mm256_and_si256(_mm256_castps_si256(a), mask));
  }
  m0 = _mm256_max_epi32(m0, m1);
  __m128i m = _mm_max_epi32(_mm256_castsi256_si128(m0), _mm256_extracti128_si256(m0, 1));
  m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0x4e));
  m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0xb1));
  return uint32_t(_mm_cvtsi128_si32(m));
}

struct QuantStep {
  __m256 inv, scale, lo_lim, hi_lim, two_m24;
  __m256i lim, key, iota;
  bool stochastic;

  // Codes (as int32) of 8 values y whose first element index is lo.
  template <bool ST>
  __m256i codes(__m256 y, uint32_t lo) const {
    const __m256 v = _mm256_mul_ps(y, inv);
    __m256 q;
    if (ST) {
      const __m256i idx = _mm256_add_epi32(_mm256_set1_epi32(int(lo)), iota);
      const __m256i h = lowbias32(_mm256_xor_si256(idx, key));
      const __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(h, 8)), two_m24);
      q = _mm256_floor_ps(_mm256_add_ps(v, u));
    } else {
      q = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    q = _mm256_min_ps(_mm256_max_ps(q, lo_lim), hi_lim);
    return _mm256_add_epi32(_mm256_cvttps_epi32(q), lim);
  }
  // y - float(code - lim) * scale
  __m256 remainder(__m256 y, __m256i c) const {
    return _mm256_sub_ps(y, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(c, lim)), scale));
  }
};

// The low byte of each of 8 int32 (all in [0, 255]) as 8 consecutive bytes.
inline __m128i narrow8(__m256i c) {
  const __m256i p16 = _mm256_packus_epi32(c, c);     // lanes: c0-3 c0-3 | c4-7 c4-7
  const __m256i p8 = _mm256_packus_epi16(p16, p16);  // bytes c0-3 x4 | c4-7 x4
  const __m256i o = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0));
  return _mm256_castsi256_si128(o);
}

// The main loop, specialised on the source type, rounding and error feedback
// so the loop body has no branches; two vectors per step keep two hash chains
// in flight.
template <DType DT, bool ST, bool EF>
int64_t quantize_body(const QuantStep& s, const void* src, int64_t len, uint32_t lo, uint8_t* codes,
                      float* r) {
  (void)r;
  int64_t j = 0;
  for (; j + 16 <= len; j += 16) {
    const __m256 y0 = load8(src, DT, j), y1 = load8(src, DT, j + 8);
    const __m256i c0 = s.codes<ST>(y0, lo + uint32_t(j));
    const __m256i c1 = s.codes<ST>(y1, lo + uint32_t(j + 8));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + j), narrow8(c0));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + j + 8), narrow8(c1));
    if (EF) {
      _mm256_storeu_ps(r + j, s.remainder(y0, c0));
      _mm256_storeu_ps(r + j + 8, s.remainder(y1, c1));
    }
  }
  return j;
}

template <DType DT>
int64_t quantize_body_dt(const QuantStep& s, const void* src, int64_t len, uint32_t lo,
                         uint8_t* codes, float* r) {
  if (s.stochastic)
    return r ? quantize_body<DT, true, true>(s, src, len, lo, codes, r)
             : quantize_body<DT, true, false>(s, src, len, lo, codes, r);
  return r ? quantize_body<DT, false, true>(s, src, len, lo, codes, r)
           : quantize_body<DT, false, false>(s, src, len, lo, codes, r);
}

void quantize(const void* src, DType dtype, int64_t len, float inv, float scale, int32_t lim,
              bool stochastic, uint32_t lo, uint32_t key, uint8_t* codes, float* r) {
  QuantStep s;
  s.inv = _mm256_set1_ps(inv);
  s.scale = _mm256_set1_ps(scale);
  s.lo_lim = _mm256_set1_ps(-float(lim));
  s.hi_lim = _mm256_set1_ps(float(lim));
  s.two_m24 = _mm256_set1_ps(5.9604644775390625e-8f);
  s.lim = _mm256_set1_epi32(lim);
  s.key = _mm256_set1_epi32(int(key));
  s.iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  s.stochastic = stochastic;
  int64_t j = dtype == DType::f16    ? quantize_body_dt<DType::f16>(s, src, len, lo, codes, r)
              : dtype == DType::bf16 ? quantize_body_dt<DType::bf16>(s, src, len, lo, codes, r)
                                     : quantize_body_dt<DType::f32>(s, src, len, lo, codes, r);
  for (; j < len; j += 8) {
    const int64_t cnt = len - j < 8 ? len - j : 8;
    alignas(32) uint16_t tx[16] = {};
    alignas(32) float tr[8];
    alignas(16) uint8_t tc[16];
    copy_bytes(tx, static_cast<const unsigned char*>(src) + j * elem_size(dtype),
               cnt * elem_size(dtype));
    const __m256 y = load8(tx, dtype, 0);
    const __m256i c = stochastic ? s.codes<true>(y, lo + uint32_t(j)) : s.codes<false>(y, 0);
    _mm_store_si128(reinterpret_cast<__m128i*>(tc), narrow8(c));
    copy_bytes(codes + j, tc, cnt);
    if (r) {
      _mm256_store_ps(tr, s.remainder(y, c));
      copy_bytes(r + j, tr, cnt * 4);
    }
  }
}

void dequantize(const uint8_t* codes, int64_t len, float scale, int32_t lim, float* out,
                bool accumulate) {
  const __m256 vs = _mm256_set1_ps(scale);
  const __m256i vl = _mm256_set1_epi32(lim);
  auto value = [&](const uint8_t* c) {
    const __m256i q = _mm256_sub_epi32(
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c))), vl);
    return _mm256_mul_ps(_mm256_cvtepi32_ps(q), vs);
  };
  int64_t j = 0;
  if (accumulate) {
    for (; j + 8 <= len; j += 8)
      _mm256_storeu_ps(out + j, _mm256_add_ps(_mm256_loadu_ps(out + j), value(codes + j)));
  } else {
    for (; j + 8 <= len; j += 8) _mm256_storeu_ps(out + j, value(codes + j));
  }
  if (j < len) {
    const int64_t cnt = len - j;
    alignas(16) uint8_t tc[16] = {};
    alignas(32) float to[8] = {};
    copy_bytes(tc, codes + j, cnt);
    __m256 v = value(tc);
    if (accumulate) {
      copy_bytes(to, out + j, cnt * 4);
      v = _mm256_add_ps(_mm256_load_ps(to), v);
    }
    _mm256_store_ps(to, v);
    copy_bytes(out + j, to, cnt * 4);
  }
}

}  // namespace

const Kernels* kernels_avx2() {
  static const Kernels table{
      .absmax_bits = &absmax_bits, .quantize = &quantize, .dequantize = &dequantize};
  return &table;
}

}  // namespace quant
}  // namespace pk
