// AVX-512 cluster kernel for 4-bit codes: the 16 entries of a row's table
// fill one register, and vpermps looks up 16 weights at once from the low
// four bits of each code lane (layout in cluster.h), so decoding a vector of
// weights costs one shift and one permute, with no dense weight in memory.
// 8-bit codes take the generic kernel (a 256-entry table does not fit a
// register).
//
// The dynamic mode (int8 activations) looks up 64 int8 weights with one
// vpshufb from a 16-byte table (the row's int8 codebook in every 128-bit
// lane) and feeds them to vpdpbusd: 64 multiply-adds per instruction, at
// half the bytes of an int8 weight. vpdpbusd multiplies unsigned by signed
// bytes, so the table holds codebook + 128 and 128 * sum_k xq[m, k] is
// subtracted at the end. This file is chosen only where VNNI is present.
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

// GCC 12 spills vpdpbusd accumulators kept in an array (see int8_avx512_vnni.cpp):
// inline asm, accumulators named one by one.
inline void dpbusd(__m512i& acc, __m512i a, __m512i b) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
}

// Tiles of 4 weight rows x 3 rows of x: 12 accumulators, 8 decoded
// weight vectors, 4 tables. Four weight rows per tile halve the passes over
// x (which does not fit L1 at M = 16) against two.
constexpr int kDynMr = 3, kDynNr = 4;

#define PK_DACC(i) \
  __m512i c##i##0 = _mm512_setzero_si512(), c##i##1 = c##i##0, c##i##2 = c##i##0, c##i##3 = c##i##0;
#define PK_DDOT(i)                                            \
  if (MR > i) {                                               \
    const __m512i xl = _mm512_loadu_si512(xg + i * ldq);      \
    const __m512i xh = _mm512_loadu_si512(xg + i * ldq + 64); \
    dpbusd(c##i##0, w0l, xl);                                 \
    dpbusd(c##i##1, w1l, xl);                                 \
    dpbusd(c##i##2, w2l, xl);                                 \
    dpbusd(c##i##3, w3l, xl);                                 \
    dpbusd(c##i##0, w0h, xh);                                 \
    dpbusd(c##i##1, w1h, xh);                                 \
    dpbusd(c##i##2, w2h, xh);                                 \
    dpbusd(c##i##3, w3h, xh);                                 \
  }
#define PK_DROW(i) {c##i##0, c##i##1, c##i##2, c##i##3}

inline __m512i table_of(const int8_t* cq) {
  const __m512i t = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cq)));
  return _mm512_xor_si512(t, _mm512_set1_epi8(char(0x80)));
}

// The dynamic tiles' epilogue: rows [i0, i0 + mr) x weight rows [j, j + nj)
// of y from the biased int32 sums (the weights were stored +128, so 128 x
// the row's sum of x comes off), dequantized, plus bias.
template <int R, int C>
inline void store_dyn(const DynArgs& a, const __m512i (&acc)[R][C], int mr, int64_t j, int nj,
                      int64_t i0) {
  for (int i = 0; i < mr; ++i) {
    const uint32_t corr = 128u * uint32_t(a.xsum[i0 + i]);
    for (int r = 0; r < nj; ++r) {
      // Wrapping arithmetic: the biased sum may pass 2^31, the true one fits.
      const int32_t s = int32_t(uint32_t(_mm512_reduce_add_epi32(acc[i][r])) - corr);
      float v = float(s) * (a.xs[i0 + i] * a.cs[(j + r) * a.cs_ld]);
      if (a.bias) v += a.bias[j + r];
      a.y[(i0 + i) * a.n + j + r] = v;
    }
  }
}

// Rows [i0, i0 + MR) of the quantized x against weight rows j .. j + 3
// (rows past nj repeat row j and are not stored).
template <int MR>
void dyn_tile(const DynArgs& a, int64_t j, int nj, int64_t i0) {
  const int64_t r1 = nj > 1 ? j + 1 : j, r2 = nj > 2 ? j + 2 : j, r3 = nj > 3 ? j + 3 : j;
  const __m512i low = _mm512_set1_epi8(0x0f);
  const __m512i t0 = table_of(a.cq + j * a.cq_ld), t1 = table_of(a.cq + r1 * a.cq_ld);
  const __m512i t2 = table_of(a.cq + r2 * a.cq_ld), t3 = table_of(a.cq + r3 * a.cq_ld);
  const uint8_t* c0 = a.codes + j * a.code_ld;
  const uint8_t* c1 = a.codes + r1 * a.code_ld;
  const uint8_t* c2 = a.codes + r2 * a.code_ld;
  const uint8_t* c3 = a.codes + r3 * a.code_ld;
  // clang-format off
  PK_DACC(0) PK_DACC(1) PK_DACC(2)
      // clang-format on
      const int8_t* x = a.xq + i0 * a.ldq;
  const int64_t ldq = a.ldq, groups = a.kq / kGroup4;
  for (int64_t g = 0; g < groups; ++g) {
    const __m512i v0 = _mm512_loadu_si512(c0 + 64 * g);
    const __m512i v1 = _mm512_loadu_si512(c1 + 64 * g);
    const __m512i v2 = _mm512_loadu_si512(c2 + 64 * g);
    const __m512i v3 = _mm512_loadu_si512(c3 + 64 * g);
    const __m512i w0l = _mm512_shuffle_epi8(t0, _mm512_and_si512(v0, low));
    const __m512i w0h = _mm512_shuffle_epi8(t0, _mm512_and_si512(_mm512_srli_epi16(v0, 4), low));
    const __m512i w1l = _mm512_shuffle_epi8(t1, _mm512_and_si512(v1, low));
    const __m512i w1h = _mm512_shuffle_epi8(t1, _mm512_and_si512(_mm512_srli_epi16(v1, 4), low));
    const __m512i w2l = _mm512_shuffle_epi8(t2, _mm512_and_si512(v2, low));
    const __m512i w2h = _mm512_shuffle_epi8(t2, _mm512_and_si512(_mm512_srli_epi16(v2, 4), low));
    const __m512i w3l = _mm512_shuffle_epi8(t3, _mm512_and_si512(v3, low));
    const __m512i w3h = _mm512_shuffle_epi8(t3, _mm512_and_si512(_mm512_srli_epi16(v3, 4), low));
    const int8_t* xg = x + kGroup4 * g;
    // clang-format off
    PK_DDOT(0) PK_DDOT(1) PK_DDOT(2)
    // clang-format on
  }
  const __m512i acc[kDynMr][kDynNr] = {PK_DROW(0), PK_DROW(1), PK_DROW(2)};
  store_dyn(a, acc, MR, j, nj, i0);
}
#undef PK_DACC
#undef PK_DDOT
#undef PK_DROW

// From four rows of x on, the four weight rows are decoded once into `wq`
// (L1: 4 x kq bytes, biased to unsigned, in x's order) and every tile of
// four rows of x reads them there, instead of decoding them again for each
// tile (the decode costs about as many instructions as the dot products).
#define PK_BACC(i) \
  __m512i b##i##0 = _mm512_setzero_si512(), b##i##1 = b##i##0, b##i##2 = b##i##0, b##i##3 = b##i##0;
#define PK_BX(i)                                                         \
  const __m512i xl##i = MR > i ? _mm512_loadu_si512(xg + i * ldq) : xl0; \
  const __m512i xh##i = MR > i ? _mm512_loadu_si512(xg + i * ldq + 64) : xh0;
#define PK_BDOT(r)                                              \
  {                                                             \
    const __m512i wl = _mm512_loadu_si512(wg + (r) * kq);       \
    const __m512i wh = _mm512_loadu_si512(wg + (r) * kq + 64);  \
    dpbusd(b0##r, wl, xl0);                                     \
    dpbusd(b0##r, wh, xh0);                                     \
    if (MR > 1) dpbusd(b1##r, wl, xl1), dpbusd(b1##r, wh, xh1); \
    if (MR > 2) dpbusd(b2##r, wl, xl2), dpbusd(b2##r, wh, xh2); \
    if (MR > 3) dpbusd(b3##r, wl, xl3), dpbusd(b3##r, wh, xh3); \
  }
#define PK_BROW(i) {b##i##0, b##i##1, b##i##2, b##i##3}

template <int MR>
void buf_tile(const DynArgs& a, const uint8_t* w, int64_t j, int nj, int64_t i0) {
  // clang-format off
  PK_BACC(0) PK_BACC(1) PK_BACC(2) PK_BACC(3)
      // clang-format on
      const int8_t* x = a.xq + i0 * a.ldq;
  const int64_t ldq = a.ldq, kq = a.kq, groups = a.kq / kGroup4;
  for (int64_t g = 0; g < groups; ++g) {
    const int8_t* xg = x + kGroup4 * g;
    const uint8_t* wg = w + kGroup4 * g;
    // clang-format off
    PK_BX(0) PK_BX(1) PK_BX(2) PK_BX(3)
    PK_BDOT(0) PK_BDOT(1) PK_BDOT(2) PK_BDOT(3)
    // clang-format on
  }
  const __m512i acc[4][4] = {PK_BROW(0), PK_BROW(1), PK_BROW(2), PK_BROW(3)};
  store_dyn(a, acc, MR, j, nj, i0);
}
#undef PK_BACC
#undef PK_BX
#undef PK_BDOT
#undef PK_BROW

void dynamic4(const DynArgs& a, int64_t n0, int64_t n1, int8_t* wq) {
  const __m512i low = _mm512_set1_epi8(0x0f);
  uint8_t* w = reinterpret_cast<uint8_t*>(wq);
  for (int64_t j = n0; j < n1; j += kDynNr) {
    const int nj = int(n1 - j < kDynNr ? n1 - j : kDynNr);
    if (a.m <= kDynMr) {
      if (a.m == 3) dyn_tile<3>(a, j, nj, 0);
      if (a.m == 2) dyn_tile<2>(a, j, nj, 0);
      if (a.m == 1) dyn_tile<1>(a, j, nj, 0);
      continue;
    }
    for (int r = 0; r < kDynNr; ++r) {
      const int64_t row = j + (r < nj ? r : 0);
      const __m512i t = table_of(a.cq + row * a.cq_ld);
      const uint8_t* c = a.codes + row * a.code_ld;
      uint8_t* wr = w + r * a.kq;
      for (int64_t g = 0; g < a.kq / kGroup4; ++g) {
        const __m512i v = _mm512_loadu_si512(c + 64 * g);
        _mm512_storeu_si512(wr + kGroup4 * g, _mm512_shuffle_epi8(t, _mm512_and_si512(v, low)));
        _mm512_storeu_si512(wr + kGroup4 * g + 64,
                            _mm512_shuffle_epi8(t, _mm512_and_si512(_mm512_srli_epi16(v, 4), low)));
      }
    }
    row_tiles<4>(a.m, [&](auto r, int64_t i) { buf_tile<decltype(r)::value>(a, w, j, nj, i); });
  }
}

// Codebooks of up to 16 entries (4-bit codes) quantized one register per
// row: the generic loops spend more on a 16-long row's loop control than on
// its arithmetic, and a layer has thousands of rows. Same arithmetic as
// quantize_generic (IEEE division, round half to even).
void quantize(const float* src, int64_t ld, int64_t len, int8_t* dst, int64_t ldd, bool perm4,
              float* scale, int32_t* sum, int64_t r0, int64_t r1) {
  if (len > 16 || ldd != 16 || perm4 || sum) {
    quantize_generic(src, ld, len, dst, ldd, perm4, scale, sum, r0, r1);
    return;
  }
  const __mmask16 m = __mmask16((1u << len) - 1);
  const __m512 lim = _mm512_set1_ps(127.0f);
  for (int64_t r = r0; r < r1; ++r) {
    const __m512 v = _mm512_maskz_loadu_ps(m, src + r * ld);
    const bool nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) != 0;
    const float s = nan ? __builtin_nanf("") : _mm512_reduce_max_ps(_mm512_abs_ps(v)) / 127.0f;
    scale[r] = s;
    __m512i q = _mm512_setzero_si512();
    if (s > 0.0f && s <= 3.4028234663852886e38f) {
      __m512 t = _mm512_roundscale_ps(_mm512_div_ps(v, _mm512_set1_ps(s)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      t = _mm512_min_ps(lim, _mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), lim), t));
      q = _mm512_maskz_cvtps_epi32(m, t);
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + r * ldd), _mm512_cvtepi32_epi8(q));
  }
}

void linear4(const Args& a, int64_t n0, int64_t n1, float*) {
  for (int64_t j = n0; j < n1; j += kNr) {
    const int nj = int(n1 - j < kNr ? n1 - j : kNr);
    row_tiles<4>(a.m, [&](auto r, int64_t i) { tile<decltype(r)::value>(a, j, nj, i); });
  }
}

}  // namespace

const Kernels* kernels_avx512_vnni() {
  static const Kernels table{.linear4 = &linear4,
                             .linear8 = &linear_generic<8>,
                             .dynamic4 = &dynamic4,
                             .dynamic8 = &dynamic_generic<8>,
                             .quantize = &quantize};
  return &table;
}

}  // namespace cluster
}  // namespace pk
