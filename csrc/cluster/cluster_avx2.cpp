// AVX2 cluster kernel for 4-bit codes. vpermps looks up 8 entries, so a
// 16-entry table is two registers: both are permuted by the code's low three
// bits and bit 3 (shifted to the sign) picks one with vblendvps. Sixteen
// ymm registers hold 2 x 2 table halves and 3 x 2 accumulators, so codes are
// reloaded (from L1) rather than kept. 8-bit codes take the generic kernels.
//
// Dynamic mode: vpshufb looks 32 int8 weights up from the row's 16-byte
// table; AVX2 has no byte dot product into int32, so, as in
// int8_avx2.cpp, vpmaddubsw multiplies |w| by x given w's sign (pairs stay
// below 2^15: exact) and vpmaddwd with ones widens to int32.
#include <immintrin.h>

#include "cluster_generic.h"

namespace pk {
namespace cluster {
namespace {

constexpr int kNr = 2;

inline __m256 lookup16(__m256i idx, __m256 lo, __m256 hi) {
  const __m256 a = _mm256_permutevar8x32_ps(lo, idx);
  const __m256 b = _mm256_permutevar8x32_ps(hi, idx);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

inline __m256i mask8(int64_t left) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(left < 8 ? left : 8)), lanes);
}

template <int MR>
void tile(const Args& a, int64_t j, int nj, int64_t i0) {
  const uint8_t* c[kNr];
  __m256 tlo[kNr], thi[kNr];
  const __m256i mlo = mask8(a.nc), mhi = mask8(a.nc - 8);  // nc <= 16
  for (int r = 0; r < kNr; ++r) {
    const int64_t row = j + (r < nj ? r : 0);
    c[r] = a.codes + row * a.code_ld;
    tlo[r] = _mm256_maskload_ps(a.codebook + row * a.cb_ld, mlo);
    thi[r] = _mm256_maskload_ps(a.codebook + row * a.cb_ld + 8, mhi);
  }
  __m256 acc[MR][kNr];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < kNr; ++r) acc[i][r] = _mm256_setzero_ps();
  const float* x = a.x + i0 * a.ldx;
  const int64_t ldx = a.ldx, k = a.k, full = k / kGroup4;
  for (int64_t g = 0; g < full; ++g) {
    const float* xg = x + kGroup4 * g;
#pragma GCC unroll 8
    for (int q = 0; q < 8; ++q) {
      for (int h = 0; h < 2; ++h) {
        __m256 w[kNr];
        for (int r = 0; r < kNr; ++r) {
          const __m256i v =
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c[r] + 64 * g + 32 * h));
          w[r] = lookup16(_mm256_srli_epi32(v, 4 * q), tlo[r], thi[r]);
        }
        for (int i = 0; i < MR; ++i) {
          const __m256 xv = _mm256_loadu_ps(xg + i * ldx + 16 * q + 8 * h);
          for (int r = 0; r < kNr; ++r) acc[i][r] = _mm256_fmadd_ps(xv, w[r], acc[i][r]);
        }
      }
    }
  }
  if (full * kGroup4 < k) {  // the last, partial group: x read under a mask
    for (int64_t kk = full * kGroup4; kk < k; kk += 8) {
      const int64_t off = kk - full * kGroup4;  // q = off / 16, h = (off / 8) % 2
      const int q = int(off / 16), h = int((off / 8) % 2);
      const __m256i m = mask8(k - kk);
      __m256 w[kNr];
      for (int r = 0; r < kNr; ++r) {
        const __m256i v =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c[r] + 64 * full + 32 * h));
        w[r] = lookup16(_mm256_srl_epi32(v, _mm_cvtsi32_si128(4 * q)), tlo[r], thi[r]);
      }
      for (int i = 0; i < MR; ++i) {
        const __m256 xv = _mm256_maskload_ps(x + i * ldx + kk, m);
        for (int r = 0; r < kNr; ++r) acc[i][r] = _mm256_fmadd_ps(xv, w[r], acc[i][r]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < nj; ++r) {
      const __m128 s4 =
          _mm_add_ps(_mm256_castps256_ps128(acc[i][r]), _mm256_extractf128_ps(acc[i][r], 1));
      const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
      const float s = _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
      a.y[(i0 + i) * a.n + j + r] = s + (a.bias ? a.bias[j + r] : 0.0f);
    }
}

template <int MR>
void dyn_tile(const DynArgs& a, int64_t j, int nj, int64_t i0) {
  const int64_t r1 = nj > 1 ? j + 1 : j;
  const __m256i t0 = _mm256_broadcastsi128_si256(
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(a.cq + j * a.cq_ld)));
  const __m256i t1 = _mm256_broadcastsi128_si256(
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(a.cq + r1 * a.cq_ld)));
  const uint8_t* c0 = a.codes + j * a.code_ld;
  const uint8_t* c1 = a.codes + r1 * a.code_ld;
  const __m256i low = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
  __m256i acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
  const int8_t* x = a.xq + i0 * a.ldq;
  const int64_t groups = a.kq / kGroup4;
  for (int64_t g = 0; g < groups; ++g) {
    for (int q = 0; q < 4; ++q) {  // 32 bytes of x: low nibbles (q < 2) or high
      const int64_t off = 64 * g + 32 * (q % 2);
      __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c0 + off));
      __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c1 + off));
      if (q >= 2) {
        v0 = _mm256_srli_epi16(v0, 4);
        v1 = _mm256_srli_epi16(v1, 4);
      }
      const __m256i w0 = _mm256_shuffle_epi8(t0, _mm256_and_si256(v0, low));
      const __m256i w1 = _mm256_shuffle_epi8(t1, _mm256_and_si256(v1, low));
      const __m256i u0 = _mm256_abs_epi8(w0), u1 = _mm256_abs_epi8(w1);
      // x's 32 bytes for this quarter: low nibbles first (dynamic_x_pos4)
      const int64_t xo = kGroup4 * g + 64 * (q / 2) + 32 * (q % 2);
      for (int i = 0; i < MR; ++i) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i * a.ldq + xo));
        acc[i][0] = _mm256_add_epi32(
            acc[i][0], _mm256_madd_epi16(_mm256_maddubs_epi16(u0, _mm256_sign_epi8(xv, w0)), ones));
        acc[i][1] = _mm256_add_epi32(
            acc[i][1], _mm256_madd_epi16(_mm256_maddubs_epi16(u1, _mm256_sign_epi8(xv, w1)), ones));
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < nj; ++r) {
      const __m128i s4 =
          _mm_add_epi32(_mm256_castsi256_si128(acc[i][r]), _mm256_extracti128_si256(acc[i][r], 1));
      const __m128i s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
      const int32_t s = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0xb1)));
      float v = float(s) * (a.xs[i0 + i] * a.cs[(j + r) * a.cs_ld]);
      if (a.bias) v += a.bias[j + r];
      a.y[(i0 + i) * a.n + j + r] = v;
    }
}

void dynamic4(const DynArgs& a, int64_t n0, int64_t n1, int8_t*) {
  for (int64_t j = n0; j < n1; j += 2) {
    const int nj = int(n1 - j < 2 ? n1 - j : 2);
    row_tiles<3>(a.m, [&](auto r, int64_t i) { dyn_tile<decltype(r)::value>(a, j, nj, i); });
  }
}

void linear4(const Args& a, int64_t n0, int64_t n1, float*) {
  for (int64_t j = n0; j < n1; j += kNr) {
    const int nj = int(n1 - j < kNr ? n1 - j : kNr);
    row_tiles<3>(a.m, [&](auto r, int64_t i) { tile<decltype(r)::value>(a, j, nj, i); });
  }
}

}  // namespace

const Kernels* kernels_avx2() {
  static const Kernels table{.linear4 = &linear4,
                             .linear8 = &linear_generic<8>,
                             .dynamic4 = &dynamic4,
                             .dynamic8 = &dynamic_generic<8>,
                             .quantize = &quantize_generic};
  return &table;
}

}  // namespace cluster
}  // namespace pk
