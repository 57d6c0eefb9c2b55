// AVX-512 VNNI int4 kernels. Weight-only: 16 bytes of a weight row widen to
// 16 dwords whose low and high nibbles index (vpermps reads only the low 4
// bits of each index) a 16-entry table of the group's dequantized values
// (q - zero) * scale, exactly the reference's w_hat, against x's even and odd
// columns. W4A8: vpdpbusd with the nibble codes (0..15) as its unsigned bytes
// against the signed int8 activations, exact, each group's sum less
// zero * sum(a) (exact in float), then times the group's scale.
#include <immintrin.h>

#include "int4_generic.h"

namespace pk {
namespace int4 {
namespace {

// GCC 12 spills the accumulator of _mm512_dpbusd_epi32 kept in an array
// (see int8_avx512_vnni.cpp); the instruction as inline asm, accumulator
// tied in place, stays in its register.
inline void dpbusd(__m512i& acc, __m512i u8, __m512i s8) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
}

// ---- weight-only -------------------------------------------------------
// Two weight rows at a time (independent FMA chains, x loaded once for both)
// and MR rows of x.
#ifndef PK_INT4_AHEAD_ROWS
#define PK_INT4_AHEAD_ROWS 8
#endif
constexpr int64_t kAheadRows = PK_INT4_AHEAD_ROWS;

// The address `off` bytes from p, for prefetches: it may lie past the end of
// the weight (a prefetch never faults), where pointer arithmetic would be
// undefined, so it is done on the integer.
inline const char* byte_at(const void* p, int64_t off) {
  return reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) + uintptr_t(off));
}

template <int MR>
void weight_only_rows(const float* xd, int64_t i0, const Weight& w, const float* bias, void* y,
                      DType yt, int64_t n0, int64_t n1) {
  const int64_t k = w.k, half = k / 2, groups = k / w.group, gb = w.group / 2;
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t n = n0; n < n1; n += 2) {
    const bool two = n + 1 < n1;
    const uint8_t* r0 = w.packed + n * half;
    const uint8_t* r1 = two ? r0 + half : r0;  // a lone last row is computed twice
    __m512 acc[2][MR][2];
    for (int t = 0; t < 2; ++t)
      for (int r = 0; r < MR; ++r) acc[t][r][0] = acc[t][r][1] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t c0 = n * groups + g, c1 = two ? c0 + groups : c0;
      const __m512 t0 = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(float(w.zeros[c0]))),
                                      _mm512_set1_ps(w.scales[c0]));
      const __m512 t1 = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(float(w.zeros[c1]))),
                                      _mm512_set1_ps(w.scales[c1]));
      for (int64_t j = g * gb; j < (g + 1) * gb; j += 16) {
        // The rows 8 ahead (16 KiB at K = 4096) into L2: one core's demand
        // misses and the hardware prefetcher alone reach about half the
        // read rate a plain streaming sum does.
        if ((j & 63) == 0) {
          _mm_prefetch(byte_at(r0, j + kAheadRows * half), _MM_HINT_T1);
          _mm_prefetch(byte_at(r1, j + kAheadRows * half), _MM_HINT_T1);
        }
        const __m512i v0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(r0 + j)));
        const __m512i v1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(r1 + j)));
        const __m512 l0 = _mm512_permutexvar_ps(v0, t0);
        const __m512 h0 = _mm512_permutexvar_ps(_mm512_srli_epi32(v0, 4), t0);
        const __m512 l1 = _mm512_permutexvar_ps(v1, t1);
        const __m512 h1 = _mm512_permutexvar_ps(_mm512_srli_epi32(v1, 4), t1);
        for (int r = 0; r < MR; ++r) {
          const float* xr = xd + (i0 + r) * k;
          const __m512 xe = _mm512_loadu_ps(xr + j), xo = _mm512_loadu_ps(xr + half + j);
          acc[0][r][0] = _mm512_fmadd_ps(l0, xe, acc[0][r][0]);
          acc[0][r][1] = _mm512_fmadd_ps(h0, xo, acc[0][r][1]);
          acc[1][r][0] = _mm512_fmadd_ps(l1, xe, acc[1][r][0]);
          acc[1][r][1] = _mm512_fmadd_ps(h1, xo, acc[1][r][1]);
        }
      }
    }
    for (int t = 0; t < (two ? 2 : 1); ++t)
      for (int r = 0; r < MR; ++r) {
        const float v = _mm512_reduce_add_ps(_mm512_add_ps(acc[t][r][0], acc[t][r][1]));
        store_f(y, yt, (i0 + r) * w.n + n + t, bias ? v + bias[n + t] : v);
      }
  }
}

void weight_only(const float* xd, int64_t m, const Weight& w, const float* bias, void* y, DType yt,
                 int64_t n0, int64_t n1) {
  for (int64_t i = 0; i < m; i += 4) {
    switch (m - i < 4 ? m - i : 4) {
      case 4:
        weight_only_rows<4>(xd, i, w, bias, y, yt, n0, n1);
        break;
      case 3:
        weight_only_rows<3>(xd, i, w, bias, y, yt, n0, n1);
        break;
      case 2:
        weight_only_rows<2>(xd, i, w, bias, y, yt, n0, n1);
        break;
      default:
        weight_only_rows<1>(xd, i, w, bias, y, yt, n0, n1);
    }
  }
}

// ---- W4A8 ----------------------------------------------------------------

// 16 rows of 16 dwords become 16 vectors, vector c holding dword c of every
// row (as int8_avx512_vnni.cpp's pack).
inline void transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    u[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i v0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44);
    const __m512i v1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xee);
    const __m512i v2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44);
    const __m512i v3 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xee);
    r[c] = _mm512_shuffle_i32x4(v0, v2, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(v0, v2, 0xdd);
    r[8 + c] = _mm512_shuffle_i32x4(v1, v3, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(v1, v3, 0xdd);
  }
}

struct Avx512 {
  static constexpr int MR = 6;
  // codes[K / 8][2 panels][low nibbles 64 bytes, high nibbles 64 bytes]: the
  // tile's inner loop then has nothing to do but broadcasts and vpdpbusd
  // (nibble masks and shifts there would compete with vpdpbusd for the
  // vector ports, once per 6-row tile rather than once per block).
  static constexpr int64_t kCodeBytes = 32;

  // 32 channels from nb (zeros past N), codes split into low and high nibbles.
  static void decode(const Weight& w, int64_t nb, uint8_t* codes) {
    const int64_t half = w.k / 2, chunks = w.k / 8;
    for (int p = 0; p < 2; ++p)
      for (int64_t c0 = 0; c0 < chunks; c0 += 16) {
        const int64_t rem = chunks - c0 < 16 ? chunks - c0 : 16;
        const __mmask16 mask = __mmask16((1u << rem) - 1);
        __m512i r[16];
        for (int j = 0; j < 16; ++j) {
          const int64_t n = nb + 16 * p + j;
          // 16 rows read side by side are more streams than the hardware
          // prefetcher follows: each row's next 512 bytes, ahead.
          if (n < w.n) _mm_prefetch(byte_at(w.packed + n * half, 4 * c0 + 512), _MM_HINT_T0);
          r[j] = n < w.n ? _mm512_maskz_loadu_epi32(mask, w.packed + n * half + 4 * c0)
                         : _mm512_setzero_si512();
        }
        transpose16(r);
        const __m512i m0f = _mm512_set1_epi8(0x0f);
        for (int64_t c = 0; c < rem; ++c) {
          uint8_t* o = codes + ((c0 + c) * 2 + p) * 128;
          _mm512_store_si512(o, _mm512_and_si512(r[c], m0f));
          _mm512_store_si512(o + 64, _mm512_and_si512(_mm512_srli_epi16(r[c], 4), m0f));
        }
      }
  }

  template <int R>
  static void tile(const Act& a, const Block& b, int64_t i0, const float* bias, void* y, DType yt,
                   int64_t n, int64_t nb, int64_t nv) {
    const int64_t k = b.k, groups = k / b.group, cpg = b.group / 8;
    __m512 f[R][2];
    for (int r = 0; r < R; ++r) f[r][0] = f[r][1] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      __m512i acc[R][2];
      for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
      for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
        const uint8_t* bp = b.codes + c * 256;
        const __m512i l0 = _mm512_load_si512(bp), l1 = _mm512_load_si512(bp + 128);
        for (int r = 0; r < R; ++r) {
          int32_t lo;
          std::memcpy(&lo, a.q + (i0 + r) * k + 8 * c, 4);
          const __m512i al = _mm512_set1_epi32(lo);
          dpbusd(acc[r][0], l0, al);
          dpbusd(acc[r][1], l1, al);
        }
        const __m512i h0 = _mm512_load_si512(bp + 64), h1 = _mm512_load_si512(bp + 192);
        for (int r = 0; r < R; ++r) {
          int32_t hi;
          std::memcpy(&hi, a.q + (i0 + r) * k + 8 * c + 4, 4);
          const __m512i ah = _mm512_set1_epi32(hi);
          dpbusd(acc[r][0], h0, ah);
          dpbusd(acc[r][1], h1, ah);
        }
      }
      const __m512 s0 = _mm512_loadu_ps(b.s + g * 32), s1 = _mm512_loadu_ps(b.s + g * 32 + 16);
      const __m512 z0 = _mm512_loadu_ps(b.nz + g * 32), z1 = _mm512_loadu_ps(b.nz + g * 32 + 16);
      for (int r = 0; r < R; ++r) {
        const __m512 as = _mm512_set1_ps(float(a.asum[(i0 + r) * groups + g]));
        const __m512 i0f = _mm512_fmadd_ps(z0, as, _mm512_cvtepi32_ps(acc[r][0]));  // exact
        const __m512 i1f = _mm512_fmadd_ps(z1, as, _mm512_cvtepi32_ps(acc[r][1]));
        f[r][0] = _mm512_fmadd_ps(i0f, s0, f[r][0]);
        f[r][1] = _mm512_fmadd_ps(i1f, s1, f[r][1]);
      }
    }
    alignas(64) float out[R * 32];
    for (int r = 0; r < R; ++r) {
      _mm512_store_ps(out + r * 32, f[r][0]);
      _mm512_store_ps(out + r * 32 + 16, f[r][1]);
    }
    store_tile(a, out, R, i0, bias, y, yt, n, nb, nv);
  }
};

void dynamic(const Act& a, const Weight& w, const float* bias, void* y, DType yt, int64_t m0,
             int64_t m1, int64_t n0, int64_t n1, uint8_t* scratch) {
  dynamic_blocked<Avx512>(a, w, bias, y, yt, m0, m1, n0, n1, scratch);
}

}  // namespace

const Kernels* kernels_avx512_vnni() {
  static const Kernels table{
      .weight_only = &weight_only, .dynamic = &dynamic, .prepare = &prepare_generic};
  return &table;
}

}  // namespace int4
}  // namespace pk
