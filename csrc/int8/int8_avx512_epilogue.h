// The AVX-512 epilogue of a packed GEMM tile (dequantize, bias, store as
// int32, fp32, fp16 or bf16), shared by the AVX-512 VNNI and AMX files, both
// compiled with AVX-512 flags. Anonymous namespace: each file its own copy.
#pragma once
#include <immintrin.h>

#include "int8_isa.h"

namespace pk {
namespace int8 {
namespace {

// fp32 -> bf16 round to nearest even, NaN kept quiet (AVX512_BF16 is not in
// every AVX-512 CPU, so it is done with integer ops).
inline __m256i to_bf16(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r =
      _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(b, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(r);
}

inline void store_vec(const PackedGemm& g, int64_t row, int64_t col, __m512i acc, __mmask16 m) {
  if (!g.a_scale) {
    _mm512_mask_storeu_epi32(static_cast<int32_t*>(g.c) + row * g.ldc + col, m, acc);
    return;
  }
  const __m512 ws = _mm512_maskz_loadu_ps(m, g.b_scale + col);
  __m512 v =
      _mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_mul_ps(_mm512_set1_ps(g.a_scale[row]), ws));
  if (g.bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, g.bias + col));
  const int64_t off = row * g.ldc + col;
  switch (g.yt) {
    case DType::f16:
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(g.c) + off, m,
                               _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      break;
    case DType::bf16:
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(g.c) + off, m, to_bf16(v));
      break;
    default:
      _mm512_mask_storeu_ps(static_cast<float*>(g.c) + off, m, v);
  }
}

}  // namespace
}  // namespace int8
}  // namespace pk
