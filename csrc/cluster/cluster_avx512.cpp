// AVX-512 cluster kernel for 4-bit codes: the 16 entries of a row's table
// fill one register, and vpermps looks up 16 weights at once from the low
// four bits of each code lane (layout in cluster.h), so decoding a vector of
// weights costs one shift and one permute, with no dense weight in memory.
// 8-bit codes take the generic kernel (a 256-entry table does not fit a
// register).
#include <immintrin.h>

#include "cluster_generic.h"

namespace pk {
namespace cluster {
namespace {

constexpr int kNr = 4;  // weight rows per tile: one load of x serves all four

// Rows [i0, i0 + MR) of x against weight rows j .. j + 3 (rows past nj
// repeat row j and are never stored): MR x 4 accumulators of 16 lanes,
// reduced once at the end.
template <int MR>
void tile(const Args& a, int64_t j, int nj, int64_t i0) {
  const uint8_t* c[kNr];
  __m512 t[kNr];
  const __mmask16 entries = __mmask16((1u << a.nc) - 1);  // nc <= 16
  for (int r = 0; r < kNr; ++r) {
    const int64_t row = j + (r < nj ? r : 0);
    c[r] = a.codes + row * a.code_ld;
    t[r] = _mm512_maskz_loadu_ps(entries, a.codebook + row * a.cb_ld);
  }
  __m512 acc[MR][kNr];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < kNr; ++r) acc[i][r] = _mm512_setzero_ps();
  const float* x = a.x + i0 * a.ldx;
  const int64_t ldx = a.ldx, k = a.k, full = k / kGroup4;
  for (int64_t g = 0; g < full; ++g) {
    __m512i v[kNr];
    for (int r = 0; r < kNr; ++r) v[r] = _mm512_loadu_si512(c[r] + 64 * g);
    const float* xg = x + kGroup4 * g;
#pragma GCC unroll 8
    for (int q = 0; q < 8; ++q) {
      __m512 w[kNr];
      for (int r = 0; r < kNr; ++r) {
        w[r] = _mm512_permutexvar_ps(v[r], t[r]);
        v[r] = _mm512_srli_epi32(v[r], 4);
      }
      for (int i = 0; i < MR; ++i) {
        const __m512 xv = _mm512_loadu_ps(xg + i * ldx + 16 * q);
        for (int r = 0; r < kNr; ++r) acc[i][r] = _mm512_fmadd_ps(xv, w[r], acc[i][r]);
      }
    }
  }
  if (full * kGroup4 < k) {  // the last, partial group: x read under a mask
    __m512i v[kNr];
    for (int r = 0; r < kNr; ++r) v[r] = _mm512_loadu_si512(c[r] + 64 * full);
    for (int64_t kk = full * kGroup4; kk < k; kk += 16) {
      const __mmask16 m = k - kk >= 16 ? __mmask16(0xffff) : __mmask16((1u << (k - kk)) - 1);
      __m512 w[kNr];
      for (int r = 0; r < kNr; ++r) {
        w[r] = _mm512_permutexvar_ps(v[r], t[r]);
        v[r] = _mm512_srli_epi32(v[r], 4);
      }
      for (int i = 0; i < MR; ++i) {
        const __m512 xv = _mm512_maskz_loadu_ps(m, x + i * ldx + kk);
        for (int r = 0; r < kNr; ++r) acc[i][r] = _mm512_fmadd_ps(xv, w[r], acc[i][r]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < nj; ++r)
      a.y[(i0 + i) * a.n + j + r] =
          _mm512_reduce_add_ps(acc[i][r]) + (a.bias ? a.bias[j + r] : 0.0f);
}

void linear4(const Args& a, int64_t n0, int64_t n1, float*) {
  for (int64_t j = n0; j < n1; j += kNr) {
    const int nj = int(n1 - j < kNr ? n1 - j : kNr);
    int64_t i = 0;
    for (; i + 4 <= a.m; i += 4) tile<4>(a, j, nj, i);
    switch (a.m - i) {
      case 3:
        tile<3>(a, j, nj, i);
        break;
      case 2:
        tile<2>(a, j, nj, i);
        break;
      case 1:
        tile<1>(a, j, nj, i);
        break;
      default:
        break;
    }
  }
}

}  // namespace

const Kernels* kernels_avx512() {
  static const Kernels table{&linear4, &linear_generic<8>};
  return &table;
}

}  // namespace cluster
}  // namespace pk
