// AVX-512 VNNI int4 kernels. Weight-only: each nibble of 64 bytes of a
// weight row, minus its group's zero, as an exact float against x's
// matching columns, the group's sums times its scale (below). W4A8:
// vpdpbusd with the nibble codes (0..15) as its unsigned bytes against the
// signed int8 activations, exact, each group's sum less zero * sum(a)
// (exact in float), then times the group's scale.
#include <immintrin.h>

#include <algorithm>

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
// A weight row is read 64 bytes (128 codes, one chunk of x's nibble_chunks
// layout) at a time; nibble p of each of its 16 dwords becomes a float by
// the AVX2 kernel's exact trick (2^23 + q as float bits, minus 2^23 + the
// zero point of the dword's group) with a shift and one vpternlogd, and
// meets x's columns 8d + p, which the driver put at unit stride. No
// shuffles: the table lookups (vpermps) of the first version and the
// widening loads shared two vector ports and capped one core near 16 GB/s.
// Each decoded vector serves MR rows of x (decoded once for all of them,
// not once per 4 rows), NR weight rows are in flight together (independent
// FMA chains to cover the FMA latency at M = 1), and a chunk's sums are
// exact integers times x in float32, times the group's scale when the
// chunk ends (every chunk ends a group or several: g divides 128 or
// equals it).
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

// The chunk's per-dword 2^23 + zero point and scale (the group of dword d is
// d * 8 / group within the chunk).
// gshift: log2 of the group size (no division in the loop: an idiv per
// chunk and weight row cost more than the chunk's arithmetic).
inline void chunk_params(const Weight& w, int64_t n, int64_t c0, int gshift, __mmask16 dmask,
                         __m512i gidx, __m512& zf, __m512& sc) {
  const int64_t groups = w.k >> gshift, cell = n * groups + (c0 >> gshift);
  if (gshift == 7) {
    zf = _mm512_set1_ps(8388608.0f + float(w.zeros[cell]));
    sc = _mm512_set1_ps(w.scales[cell]);
    return;
  }
  const int64_t cnt = std::min<int64_t>(128, w.k - c0) >> gshift;  // groups in this chunk
  const __mmask16 gm = __mmask16((1u << cnt) - 1);
  const __m512 z =
      _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(gm, w.zeros + cell)));
  const __m512 zz = _mm512_add_ps(z, _mm512_set1_ps(8388608.0f));
  // Past the chunk's dwords: 2^23 (zero 0), so masked-off codes decode to 0.
  zf = _mm512_mask_permutexvar_ps(_mm512_set1_ps(8388608.0f), dmask, gidx, zz);
  sc = _mm512_permutexvar_ps(gidx, _mm512_maskz_loadu_ps(gm, w.scales + cell));
}

// Rows [i0, i0 + MR) of x: the MR rows of one tile of the layout from tile
// row t0 (mt rows in that tile), i.e. rows i0 - t0 .. of it.
// kPre: the decoded vectors times the chunk's scales (w_hat itself, one
// rounding, as int4.h states) go straight into the totals, one multiply
// more per vector but no per-chunk accumulators: with MR of 4 or more rows
// sharing each vector, the registers saved hold more weight rows in flight
// (the 8-row tile with its accumulators spilled and ran at a third of the
// FMA rate). Without it (one to three rows), the exact integer sums of a
// chunk are scaled once at its end: fewer instructions per code, which is
// what bounds M = 1.
template <int MR, int NR, bool kPre>
void weight_only_tile(const float* xd, int64_t i0, int64_t t0, int64_t mt, const Weight& w,
                      const float* bias, void* y, DType yt, int64_t n0, int64_t n1) {
  const int64_t k = w.k, half = k / 2;
  const __m512i m15 = _mm512_set1_epi32(15), magic = _mm512_set1_epi32(0x4B000000);
  const int gshift = w.group == 32 ? 5 : w.group == 64 ? 6 : 7;
  const __m512i gidx = _mm512_srli_epi32(
      _mm512_setr_epi32(0, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120), gshift);
  // Columns of x per pass: the MR rows' share of them (24 KiB) stays in L1
  // while a block of weight rows goes by. Unblocked, every weight row read
  // all MR rows of x from L2 again (128 KiB a row at M = 8, K = 4096), and
  // M = 8 ran 10x slower than M = 1.
  constexpr int64_t kb = std::max<int64_t>(128, (int64_t(24) << 10) / (4 * MR) / 128 * 128);
  constexpr int64_t kRows = 64;  // weight rows a pass's partial sums cover
  float part[kRows][MR];
  for (int64_t nb = n0; nb < n1; nb += kRows) {
    const int64_t nb1 = std::min(n1, nb + kRows);
    for (int64_t b0 = 0; b0 < k; b0 += kb) {
      const int64_t b1 = std::min(k, b0 + kb);
      for (int64_t n = nb; n < nb1; n += NR) {
        const uint8_t* row[NR];
        int64_t rn[NR];
        for (int r = 0; r < NR; ++r) {
          // Past nb1 the last row is computed again and not kept.
          rn[r] = n + r < nb1 ? n + r : nb1 - 1;
          row[r] = w.packed + rn[r] * half;
        }
        __m512 tot[NR][MR];
        for (int r = 0; r < NR; ++r)
          for (int m = 0; m < MR; ++m) tot[r][m] = _mm512_setzero_ps();
        for (int64_t c0 = b0; c0 < b1; c0 += 128) {
          const int64_t d = std::min<int64_t>(128, k - c0) / 8;  // dwords of the chunk
          const __mmask16 dmask = __mmask16((1u << d) - 1);
          __m512i v[NR];
          __m512 zf[NR], sc[NR];
          for (int r = 0; r < NR; ++r) {
            _mm_prefetch(byte_at(row[r], c0 / 2 + kAheadRows * half), _MM_HINT_T1);
            v[r] = d == 16 ? _mm512_loadu_si512(row[r] + c0 / 2)
                           : _mm512_maskz_loadu_epi32(dmask, row[r] + c0 / 2);
            chunk_params(w, rn[r], c0, gshift, dmask, gidx, zf[r], sc[r]);
          }
          // this chunk of the tile's row i0 - t0; its rows 8 * d floats apart
          const float* xc = xd + t0 * k + c0 * mt + (i0 - t0) * 8 * d;
          __m512 acc[NR][MR];
#pragma GCC unroll 8
          for (int p = 0; p < 8; ++p) {
            __m512 xp[MR];
            for (int m = 0; m < MR; ++m)
              xp[m] = d == 16 ? _mm512_loadu_ps(xc + m * 128 + p * 16)
                              : _mm512_maskz_loadu_ps(dmask, xc + m * 8 * d + p * d);
            for (int r = 0; r < NR; ++r) {
              const __m512i sh = p ? _mm512_srli_epi32(v[r], 4 * p) : v[r];
              // (sh & 15) | magic in one instruction
              const __m512i bits = _mm512_ternarylogic_epi32(sh, m15, magic, 0xEA);
              const __m512 wq = _mm512_sub_ps(_mm512_castsi512_ps(bits), zf[r]);  // exact
              if constexpr (kPre) {
                const __m512 wh = _mm512_mul_ps(wq, sc[r]);
                for (int m = 0; m < MR; ++m) tot[r][m] = _mm512_fmadd_ps(wh, xp[m], tot[r][m]);
              } else {
                for (int m = 0; m < MR; ++m)
                  acc[r][m] = p ? _mm512_fmadd_ps(wq, xp[m], acc[r][m]) : _mm512_mul_ps(wq, xp[m]);
              }
            }
          }
          if constexpr (!kPre)
            for (int r = 0; r < NR; ++r)
              for (int m = 0; m < MR; ++m) tot[r][m] = _mm512_fmadd_ps(acc[r][m], sc[r], tot[r][m]);
        }
        for (int r = 0; r < NR && n + r < nb1; ++r)
          for (int m = 0; m < MR; ++m) {
            const float v = _mm512_reduce_add_ps(tot[r][m]);
            part[n + r - nb][m] = b0 ? part[n + r - nb][m] + v : v;
          }
      }
    }
    for (int64_t n = nb; n < nb1; ++n)
      for (int m = 0; m < MR; ++m) {
        const float v = part[n - nb][m];
        store_f(y, yt, (i0 + m) * w.n + n, bias ? v + bias[n] : v);
      }
  }
}

// Rows of x in the layout's tiles of 8; the last tile's rows in one call,
// with as many weight rows in flight as the registers hold.
void weight_only(const float* xd, int64_t m, const Weight& w, const float* bias, void* y, DType yt,
                 int64_t n0, int64_t n1) {
  static_assert(kXTile == 8, "the tiles below are the layout's");
  int64_t i = 0;
  for (; i + 8 <= m; i += 8) weight_only_tile<8, 2, true>(xd, i, i, 8, w, bias, y, yt, n0, n1);
  const int64_t mt = m - i;
  switch (mt) {
    case 7:
      weight_only_tile<7, 2, true>(xd, i, i, mt, w, bias, y, yt, n0, n1);
      break;
    case 6:
      weight_only_tile<6, 2, true>(xd, i, i, mt, w, bias, y, yt, n0, n1);
      break;
    case 5:
      weight_only_tile<5, 2, true>(xd, i, i, mt, w, bias, y, yt, n0, n1);
      break;
    case 4:
      weight_only_tile<4, 3, true>(xd, i, i, mt, w, bias, y, yt, n0, n1);
      break;
    case 3:
      weight_only_tile<3, 2, false>(xd, i, i, mt, w, bias, y, yt, n0, n1);
      break;
    case 2:
      weight_only_tile<2, 3, false>(xd, i, i, mt, w, bias, y, yt, n0, n1);
      break;
    case 1:
      weight_only_tile<1, 4, false>(xd, i, i, mt, w, bias, y, yt, n0, n1);
      break;
    default:
      break;
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
  static const Kernels table{.weight_only = &weight_only,
                             .dynamic = &dynamic,
                             .prepare = &prepare_generic,
                             .x_layout = XLayout::nibble_chunks};
  return &table;
}

}  // namespace int4
}  // namespace pk
