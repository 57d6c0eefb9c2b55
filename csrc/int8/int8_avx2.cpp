// AVX2 int8 kernels. AVX2 has no byte dot product into int32; vpmaddubsw
// multiplies unsigned by signed bytes into int16 pairs, saturating, and
// vpmaddwd with ones widens those pairs to int32. With the weight's absolute
// value as the unsigned operand (|w| <= 128) and the activation given the
// weight's sign (vpsignb: |a w / |w|| <= 127 when a is in [-127, 127]), a pair
// is at most 2 * 128 * 127 < 2^15: it never saturates, so the product is
// exact. The activation scratch therefore holds the signed quantized values
// themselves (no +128 bias, no compensation); int8_gemm's -128 activations
// are corrected by the driver (int8_cpu.cpp).
//
// Measured here (Zen 3, register-only loops): this form and the int16
// widening form (vpmaddwd + vpaddd) both run at about 26 int8 MAC per cycle,
// limited by vector ops issued per cycle, not by the two multiply pipes; the
// sign transfer reads half the activation bytes and needs no conversions.
//
// 7-bit activations (act_bits = 7, opt-in) are stored as q + zp in [0, 127]:
// unsigned as they are, so vpmaddubsw takes them directly against the signed
// weight (2 * 127 * 128 < 2^15) and a multiply-add is three instructions, not
// four; the zero point comes off in the epilogue as zp * sum_k w.
#include <immintrin.h>

#include "int8_epilogue.h"
#include "int8_generic.h"

namespace pk {
namespace int8 {
namespace {

inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  __builtin_memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

inline __m256i load32(const int8_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

// acc[j] += sum_{i<4} x[4j+i] * w[4j+i] for the 8 channels j of one 32-byte
// vector of a packed group; x = four activation bytes broadcast. Signed x
// (U7 false): u = |w| and x takes w's sign. U7: x is unsigned (< 128), u unused.
template <bool U7>
inline __m256i dot(__m256i acc, __m256i u, __m256i x, __m256i w, __m256i ones) {
  if (U7) return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(x, w), ones));
  return _mm256_add_epi32(acc,
                          _mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_sign_epi8(x, w)), ones));
}

// ---- Epilogue --------------------------------------------------------------

// fp32 -> bf16 round to nearest even, NaN kept quiet: f32_to_bf16 of half.h
// on 8 lanes, returned as 8 uint16 in the low half.
inline __m128i to_bf16(__m256 v) {
  const __m256i b = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  __m256i r =
      _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  const __m256i qnan = _mm256_or_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(0x40));
  r = _mm256_blendv_epi8(r, qnan, nan);
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
}

// Lanes [0, cnt) of a mask for the 8 columns from col (cnt = min(8, n - col)).
inline __m256i lane_mask(int cnt) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(cnt), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Row `row`, columns [col, col + cnt) of the output from one accumulator.
inline void store8(const PackedGemm& g, int64_t row, int64_t col, __m256i acc, int cnt) {
  const int64_t off = row * g.ldc + col;
  if (g.a_zp) {
    // 7-bit: acc - zp * sum_k w, with comp = 128 * sum_k w (zero past n).
    const __m256i wsum =
        _mm256_srai_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(g.comp + col)), 7);
    acc = _mm256_sub_epi32(acc, _mm256_mullo_epi32(_mm256_set1_epi32(g.a_zp[row]), wsum));
  }
  if (!g.a_scale) {
    int32_t* c = static_cast<int32_t*>(g.c) + off;
    if (cnt == 8)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(c), acc);
    else
      _mm256_maskstore_epi32(c, lane_mask(cnt), acc);
    return;
  }
  const __m256i m = lane_mask(cnt);
  const __m256 ws =
      cnt == 8 ? _mm256_loadu_ps(g.b_scale + col) : _mm256_maskload_ps(g.b_scale + col, m);
  // Same arithmetic as store_out: acc * (a_scale * w_scale) + bias.
  __m256 v =
      _mm256_mul_ps(_mm256_cvtepi32_ps(acc), _mm256_mul_ps(_mm256_set1_ps(g.a_scale[row]), ws));
  if (g.bias)
    v = _mm256_add_ps(
        v, cnt == 8 ? _mm256_loadu_ps(g.bias + col) : _mm256_maskload_ps(g.bias + col, m));
  if (g.yt == DType::f32) {
    float* y = static_cast<float*>(g.c) + off;
    if (cnt == 8)
      _mm256_storeu_ps(y, v);
    else
      _mm256_maskstore_ps(y, m, v);
    return;
  }
  const __m128i h = g.yt == DType::f16
                        ? _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
                        : to_bf16(v);
  uint16_t* y = static_cast<uint16_t*>(g.c) + off;
  if (cnt == 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y), h);
  } else {
    alignas(16) uint16_t t[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(t), h);
    for (int j = 0; j < cnt; ++j) y[j] = t[j];
  }
}

// ---- Packed GEMM -------------------------------------------------------------
// An MR x 8*NV register tile over the whole of K: NV 32-byte vectors of each
// packed group (8 output channels each) meet MR broadcasts of four
// activation bytes. The accumulators are named one by one (GCC 12 keeps an
// array of them on the stack). 4 x 2 (one panel) is the large-M tile: 8
// accumulators, |w| of both vectors, the broadcast, ones and a temporary fit
// the 16 registers; 1 x 8 (a block of four panels, 256 contiguous bytes per
// group) streams the weight for a single row.

#define PK_ACC(i) __m256i c##i##0, c##i##1, c##i##2, c##i##3, c##i##4, c##i##5, c##i##6, c##i##7;
#define PK_ZERO(i) \
  c##i##0 = c##i##1 = c##i##2 = c##i##3 = c##i##4 = c##i##5 = c##i##6 = c##i##7 = zero;
#define PK_ROW(i)                                            \
  if (MR > i) {                                              \
    const __m256i x = bcast4(a + i * lda + 4 * q);           \
    c##i##0 = dot<U7>(c##i##0, u0, x, w0, ones);             \
    if (NV > 1) c##i##1 = dot<U7>(c##i##1, u1, x, w1, ones); \
    if (NV > 2) c##i##2 = dot<U7>(c##i##2, u2, x, w2, ones); \
    if (NV > 3) c##i##3 = dot<U7>(c##i##3, u3, x, w3, ones); \
    if (NV > 4) c##i##4 = dot<U7>(c##i##4, u4, x, w4, ones); \
    if (NV > 5) c##i##5 = dot<U7>(c##i##5, u5, x, w5, ones); \
    if (NV > 6) c##i##6 = dot<U7>(c##i##6, u6, x, w6, ones); \
    if (NV > 7) c##i##7 = dot<U7>(c##i##7, u7, x, w7, ones); \
  }
#define PK_ROW_ARRAY(i) {c##i##0, c##i##1, c##i##2, c##i##3, c##i##4, c##i##5, c##i##6, c##i##7}
#define PK_LD(i, t)     \
  if (MR > i && NV > t) \
    c##i##t = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pr + i * ldp + 8 * t));
#define PK_LOAD(i) \
  PK_LD(i, 0) PK_LD(i, 1) PK_LD(i, 2) PK_LD(i, 3) PK_LD(i, 4) PK_LD(i, 5) PK_LD(i, 6) PK_LD(i, 7)
#define PK_W(t)                                             \
  const __m256i w##t = NV > t ? load32(bq + 32 * t) : zero; \
  const __m256i u##t = U7 ? w##t : _mm256_abs_epi8(w##t);

// A range of K groups [q0, q1) of a tile and where its running sums wait
// between ranges: pr (int32, rows ldp apart) holds them after every range but
// the last, which stores the output. pr null: the whole of K in one pass.
// pf (if not null): cache lines to bring into L2 as the tile goes, `burst`
// of them every `period` groups: pf, pf + 64 * step, pf + 128 * step, ...
// up to `lines` of them. The rows of a range share the next range's lines this way
// (row r of R takes lines r, r + R, ...), so the stream is spread evenly
// over the range's work instead of a burst from one tile, which would stall
// on the few misses a core keeps in flight.
// ahead (if not 0): the tile's own lines that many groups ahead are fetched
// into L1 as it goes, and 8 times as far ahead into L2 (which keeps more
// misses in flight): a single row's tile streams its weight at several times
// the rate the hardware prefetchers keep up with.
struct KSpan {
  int64_t q0, q1;
  int32_t* pr;
  int64_t ldp;
  const char* pf;
  int64_t step, lines, period, burst;
  int64_t ahead;
};

// Rows [i0, i0 + MR), channels [16 * p0, 16 * p0 + 8 * NV): p0 and the NV / 2
// panels from it lie in one block of four (layout in int8.h).
template <int MR, int NV, bool U7>
void packed_tile(const PackedGemm& g, int64_t i0, int64_t p0, KSpan ks) {
  static_assert(MR >= 1 && MR <= 4 && NV >= 1 && NV <= 8 && MR * NV <= 8, "tile size");
  const __m256i zero = _mm256_setzero_si256(), ones = _mm256_set1_epi16(1);
  // clang-format off
  PK_ACC(0) PK_ACC(1) PK_ACC(2) PK_ACC(3)
  PK_ZERO(0) PK_ZERO(1) PK_ZERO(2) PK_ZERO(3)
      // clang-format on
      int32_t* pr = ks.pr;
  const int64_t ldp = ks.ldp;
  if (pr && ks.q0 > 0) {
    // clang-format off
    PK_LOAD(0) PK_LOAD(1) PK_LOAD(2) PK_LOAD(3)
    // clang-format on
  }
  int64_t gs;
  const int8_t* b = panel_base(g.b, g.kp, packed_n(g.n), p0, &gs);
  const int8_t* a = reinterpret_cast<const int8_t*>(g.a) + i0 * g.lda;
  const int64_t lda = g.lda, groups = g.kp / 4;
  const int64_t qend = pr ? ks.q1 : groups;
  // The L2 prefetch costs one compare per group (q == pf_at), and the L1
  // stream lives in its own copy of the loop: bookkeeping in the
  // multiply-add loop competes for ports 0 and 1 with vpmaddubsw and
  // vpmaddwd (a countdown with three branches per group cost 30% at K =
  // 384; segments of `period` groups between prefetches, 20% at M = 16).
  const int64_t q_begin = pr ? ks.q0 : 0;
  int64_t pf_off = 0, pf_at = ks.pf && ks.lines > 0 ? q_begin : -1;
  const int64_t pf_stride = 64 * ks.step, pf_period = ks.period, pf_burst = ks.burst;
  const int64_t pf_last = q_begin + pf_period * ((ks.lines + pf_burst - 1) / pf_burst - 1);
  auto next_prefetch = [&](int64_t q) {
    for (int64_t j = 0; j < pf_burst; ++j, pf_off += pf_stride)
      _mm_prefetch(byte_at(ks.pf, pf_off), _MM_HINT_T1);
    pf_at = q < pf_last ? q + pf_period : -1;
  };
  if (ks.ahead) {
    for (int64_t q = q_begin; q < qend; ++q) {
      const int8_t* bq = b + q * gs;
      if (q == pf_at) next_prefetch(q);
      for (int t = 0; t < NV; t += 2) {
        _mm_prefetch(byte_at(bq, ks.ahead * gs + 32 * t), _MM_HINT_T0);
        _mm_prefetch(byte_at(bq, 8 * ks.ahead * gs + 32 * t), _MM_HINT_T1);
      }
      // clang-format off
      PK_W(0) PK_W(1) PK_W(2) PK_W(3) PK_W(4) PK_W(5) PK_W(6) PK_W(7)
      PK_ROW(0) PK_ROW(1) PK_ROW(2) PK_ROW(3)
      // clang-format on
    }
  } else {
    for (int64_t q = q_begin; q < qend; ++q) {
      const int8_t* bq = b + q * gs;
      if (q == pf_at) next_prefetch(q);
      // clang-format off
      PK_W(0) PK_W(1) PK_W(2) PK_W(3) PK_W(4) PK_W(5) PK_W(6) PK_W(7)
      PK_ROW(0) PK_ROW(1) PK_ROW(2) PK_ROW(3)
      // clang-format on
    }
  }
  const __m256i acc[4][8] = {PK_ROW_ARRAY(0), PK_ROW_ARRAY(1), PK_ROW_ARRAY(2), PK_ROW_ARRAY(3)};
  if (pr && qend < groups) {
    for (int i = 0; i < MR; ++i)
      for (int t = 0; t < NV; ++t)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + i * ldp + 8 * t), acc[i][t]);
    return;
  }
  for (int t = 0; t < NV; ++t) {
    const int64_t col = p0 * 16 + 8 * t;
    if (col >= g.n) break;
    const int cnt = g.n - col >= 8 ? 8 : int(g.n - col);
    for (int i = 0; i < MR; ++i) store8(g, i0 + i, col, acc[i][t], cnt);
  }
}
#undef PK_ACC
#undef PK_ZERO
#undef PK_ROW
#undef PK_ROW_ARRAY
#undef PK_W
#undef PK_LD
#undef PK_LOAD

// Rows [m0, m1) against panels [p, p + NV / 2) over the whole of K, the tail
// rows in smaller tiles. next (if not null): the next block's copy of panel
// p, which the row tiles bring into L2 between them (see KSpan).
template <int NV, bool U7>
void panel_rows(const PackedGemm& g, int64_t m0, int64_t m1, int64_t p, const char* next) {
  constexpr int MR = 8 / NV > 4 ? 4 : 8 / NV;
  int64_t gs;
  panel_base(g.b, g.kp, packed_n(g.n), p, &gs);
  const int64_t groups = g.kp / 4, tiles = (m1 - m0 + MR - 1) / MR;
  const int64_t per_tile = (groups + tiles - 1) / tiles;
  const int64_t period = per_tile >= groups ? 1 : groups / per_tile;
  auto at = [&](int64_t i) {
    const int64_t r = (i - m0) / MR;
    return KSpan{
        0,        0,      nullptr, 0, next ? byte_at(next, gs * r) : nullptr, tiles * gs / 64,
        per_tile, period, 1,       0};
  };
  int64_t i = m0;
  for (; i + MR <= m1; i += MR) packed_tile<MR, NV, U7>(g, i, p, at(i));
  switch (m1 - i) {
    case 3:
      packed_tile<3 * NV <= 8 ? 3 : 1, NV, U7>(g, i, p, at(i));
      if (3 * NV > 8) {
        packed_tile<1, NV, U7>(g, i + 1, p, at(i + 1));
        packed_tile<1, NV, U7>(g, i + 2, p, at(i + 2));
      }
      break;
    case 2:
      packed_tile<2 * NV <= 8 ? 2 : 1, NV, U7>(g, i, p, at(i));
      if (2 * NV > 8) packed_tile<1, NV, U7>(g, i + 1, p, at(i + 1));
      break;
    case 1:
      packed_tile<1, NV, U7>(g, i, p, at(i));
      break;
    default:
      break;
  }
}

// Up to this many rows, a block of panels runs over K in ranges of kKcGroups
// groups (16 KiB of a block's weight, 4 KiB of its panel): each range comes
// from memory once and serves every row tile from L1, where whole-K tiles
// would each stream the panel (64 KiB at K = 4096) from L2, the first from
// DRAM.
#ifndef PK_KC_ROWS
#define PK_KC_ROWS 32
#endif
#ifndef PK_KC_GROUPS
#define PK_KC_GROUPS 64
#endif
constexpr int64_t kKcRows = PK_KC_ROWS, kKcGroups = PK_KC_GROUPS;

template <bool U7>
void gemm_packed_t(const PackedGemm& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  if (m1 - m0 == 1) {
    // One row: the widest tile, a whole block of panels per pass.
    // 16 groups: 4 KiB ahead in a block of four panels (measured here with
    // the weight in DRAM: 1.2x over none; 48 no better; the L2 stream as far
    // ahead as AVX-512's, where it was measured to help).
    const KSpan whole{0, 0, nullptr, 0, nullptr, 0, 0, 0, 1, 16};
    for (int64_t p = p0; p < p1;) {
      switch (p1 - p < 4 ? p1 - p : 4) {
        case 4:
          packed_tile<1, 8, U7>(g, m0, p, whole);
          p += 4;
          break;
        case 3:
          packed_tile<1, 6, U7>(g, m0, p, whole);
          p += 3;
          break;
        case 2:
          packed_tile<1, 4, U7>(g, m0, p, whole);
          p += 2;
          break;
        default:
          packed_tile<1, 2, U7>(g, m0, p, whole);
          p += 1;
      }
    }
    return;
  }
  const int64_t groups = g.kp / 4;
  if (U7 && m1 - m0 <= kKcRows && groups > kKcGroups) {
    int32_t sums[kKcRows * 64];  // rows x the block's 64 columns
    for (int64_t b0 = p0; b0 < p1; b0 += 4) {
      const int64_t nvp = p1 - b0 < 4 ? p1 - b0 : 4;
      int64_t gs;
      const int8_t* blk = panel_base(g.b, g.kp, packed_n(g.n), b0, &gs);
      for (int64_t q0 = 0; q0 < groups; q0 += kKcGroups) {
        const int64_t q1 = groups - q0 < kKcGroups ? groups : q0 + kKcGroups;
        // The next range's lines (blocks lie one after another, so past the
        // last range they are the next block's first; past the end of the
        // weight, prefetching is harmless), shared out over the rows.
        const int64_t rows = m1 - m0, range_lines = (gs / 64) * kKcGroups;
        const int64_t per_row = (range_lines + rows - 1) / rows, span = q1 - q0;
        const int64_t period = per_row >= span ? 1 : span / per_row;
        const int64_t burst = per_row > span ? (per_row + span - 1) / span : 1;
        for (int64_t i = m0; i < m1; ++i) {
          const KSpan ks{q0,
                         q1,
                         sums + 64 * (i - m0),
                         64,
                         byte_at(blk, gs * q1 + 64 * (i - m0)),
                         rows,
                         per_row,
                         period,
                         burst,
                         0};
          switch (nvp) {
            case 4:
              packed_tile<1, 8, U7>(g, i, b0, ks);
              break;
            case 3:
              packed_tile<1, 6, U7>(g, i, b0, ks);
              break;
            case 2:
              packed_tile<1, 4, U7>(g, i, b0, ks);
              break;
            default:
              packed_tile<1, 2, U7>(g, i, b0, ks);
          }
        }
      }
    }
    return;
  }
  // Rows in chunks of about 192 KiB of activations, each swept against every
  // panel while it sits in L2 (512 KiB here), rather than every row per panel
  // from L3: the rows of a short K are too short for the prefetchers.
  const int64_t chunk = (196608 / g.lda + 3) / 4 * 4;
  for (int64_t c0 = m0; c0 < m1; c0 += chunk) {
    const int64_t c1 = m1 - c0 < chunk ? m1 : c0 + chunk;
    for (int64_t p = p0; p < p1; ++p) {
      // Blocks lie one after another: the next block's copy of panel p is
      // one block further on. Only the last chunk of rows fetches it (the
      // others are followed by this block again); past the end of the
      // weight, prefetching is harmless.
      int64_t gs;
      const int8_t* here = panel_base(g.b, g.kp, packed_n(g.n), p, &gs);
      panel_rows<2, U7>(g, c0, c1, p, c1 == m1 ? byte_at(here, gs * (g.kp / 4)) : nullptr);
    }
  }
}

void gemm_packed(const PackedGemm& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  if (g.a_zp)
    gemm_packed_t<true>(g, m0, m1, p0, p1);
  else
    gemm_packed_t<false>(g, m0, m1, p0, p1);
}

// ---- Quantization prologue ------------------------------------------------

// Eight elements of x from `off` as fp32.
inline __m256 load8(const void* x, DType t, int64_t off) {
  switch (t) {
    case DType::f16:
      return _mm256_cvtph_ps(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + off)));
    case DType::bf16:
      return _mm256_castsi256_ps(_mm256_slli_epi32(
          _mm256_cvtepu16_epi32(_mm_loadu_si128(
              reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + off))),
          16));
    default:
      return _mm256_loadu_ps(static_cast<const float*>(x) + off);
  }
}

// 32 int32 lanes in [-128, 127] (a, b, c, d in order) stored as 32 bytes.
inline void store32(void* dst, __m256i a, __m256i b, __m256i c, __m256i d) {
  // packs_epi32 + packs_epi16 interleave within 128-bit lanes; this puts the
  // 4-byte groups back in order.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
  _mm256_storeu_si256(static_cast<__m256i*>(dst), _mm256_permutevar8x32_epi32(bytes, order));
}

// Same arithmetic as quantize_per_row (an IEEE division, then round half to
// even), so the fused layer's integers equal the standalone op's. Stored as
// signed bytes, zero past k.
void quantize_s8(const void* x, DType xt, int64_t ldx, int64_t k, uint8_t* qu, int64_t ldq,
                 float* scale, int64_t r0, int64_t r1) {
  const __m256 sign = _mm256_set1_ps(-0.0f), lim = _mm256_set1_ps(127.0f),
               nlim = _mm256_set1_ps(-127.0f);
  const int64_t kv = k / 8 * 8, k32 = k / 32 * 32;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t base = r * ldx;
    __m256 amax0 = _mm256_setzero_ps(), amax1 = amax0, nan = amax0;
    int64_t c = 0;
    for (; c + 16 <= k; c += 16) {
      const __m256 v0 = load8(x, xt, base + c), v1 = load8(x, xt, base + c + 8);
      nan = _mm256_or_ps(nan, _mm256_or_ps(_mm256_cmp_ps(v0, v0, _CMP_UNORD_Q),
                                           _mm256_cmp_ps(v1, v1, _CMP_UNORD_Q)));
      amax0 = _mm256_max_ps(amax0, _mm256_andnot_ps(sign, v0));
      amax1 = _mm256_max_ps(amax1, _mm256_andnot_ps(sign, v1));
    }
    for (; c < kv; c += 8) {
      const __m256 v = load8(x, xt, base + c);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      amax0 = _mm256_max_ps(amax0, _mm256_andnot_ps(sign, v));
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, _mm256_max_ps(amax0, amax1));
    float amax = 0.0f;
    for (int j = 0; j < 8; ++j) amax = amax < lanes[j] ? lanes[j] : amax;
    bool has_nan = _mm256_movemask_ps(nan) != 0;
    for (; c < k; ++c) {
      const float v = load_f(x, xt, base + c);
      has_nan |= v != v;
      amax = amax < abs_f(v) ? abs_f(v) : amax;
    }
    const float s = has_nan ? __builtin_nanf("") : amax / 127.0f;
    scale[r] = s;
    int8_t* q = reinterpret_cast<int8_t*>(qu) + r * ldq;
    if (!(s > 0.0f && s <= 3.4028234663852886e38f)) {  // zero, NaN or inf: q carries nothing
      for (int64_t j = 0; j < ldq; ++j) q[j] = 0;
      continue;
    }
    const __m256 sv = _mm256_set1_ps(s);
    auto q8 = [&](int64_t off) {
      const __m256 v = _mm256_round_ps(_mm256_div_ps(load8(x, xt, base + off), sv),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      return _mm256_cvtps_epi32(_mm256_min_ps(lim, _mm256_max_ps(nlim, v)));
    };
    c = 0;
    for (; c < k32; c += 32) store32(q + c, q8(c), q8(c + 8), q8(c + 16), q8(c + 24));
    for (; c < k; ++c) {
      float v = __builtin_nearbyintf(load_f(x, xt, base + c) / s);
      v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
      q[c] = int8_t(v);
    }
    for (; c < ldq; ++c) q[c] = 0;
  }
}

// Rows quantized as quantize_per_row7 (grid7's scale and zero point, the
// same division and rounding as q7), stored as q + zp in [0, 127], zero past k.
void quantize_u7(const void* x, DType xt, int64_t ldx, int64_t k, uint8_t* qu, int64_t ldq,
                 float* scale, int32_t* zp, int64_t r0, int64_t r1) {
  const int64_t kv = k / 8 * 8, k32 = k / 32 * 32;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t base = r * ldx;
    __m256 lo = _mm256_setzero_ps(), hi = lo, nan = lo;
    int64_t c = 0;
    for (; c < kv; c += 8) {
      const __m256 v = load8(x, xt, base + c);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      lo = _mm256_min_ps(lo, v);
      hi = _mm256_max_ps(hi, v);
    }
    alignas(32) float l[8], h[8];
    _mm256_store_ps(l, lo);
    _mm256_store_ps(h, hi);
    float lmin = 0.0f, hmax = 0.0f;
    for (int j = 0; j < 8; ++j) {
      lmin = l[j] < lmin ? l[j] : lmin;
      hmax = h[j] > hmax ? h[j] : hmax;
    }
    bool has_nan = _mm256_movemask_ps(nan) != 0;
    for (; c < k; ++c) {
      const float v = load_f(x, xt, base + c);
      has_nan |= v != v;
      lmin = v < lmin ? v : lmin;
      hmax = v > hmax ? v : hmax;
    }
    const Grid7 gr = grid7(lmin, hmax, has_nan);
    scale[r] = gr.scale;
    zp[r] = gr.zp;
    uint8_t* q = qu + r * ldq;
    if (!gr.usable) {
      for (int64_t j = 0; j < ldq; ++j) q[j] = 0;
      continue;
    }
    const __m256 sv = _mm256_set1_ps(gr.scale), qlo = _mm256_set1_ps(float(-gr.zp)),
                 qhi = _mm256_set1_ps(float(127 - gr.zp));
    const __m256i z = _mm256_set1_epi32(gr.zp);
    auto q8 = [&](int64_t off) {
      const __m256 v = _mm256_round_ps(_mm256_div_ps(load8(x, xt, base + off), sv),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      return _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_min_ps(qhi, _mm256_max_ps(qlo, v))), z);
    };
    c = 0;
    for (; c < k32; c += 32) store32(q + c, q8(c), q8(c + 8), q8(c + 16), q8(c + 24));
    for (; c < k; ++c) q[c] = uint8_t(q7(load_f(x, xt, base + c), gr) + gr.zp);
    for (; c < ldq; ++c) q[c] = 0;
  }
}

}  // namespace

const GemmKernels* gemm_kernels_avx2() {
  static const GemmKernels table{.gemm = &gemm_rowmajor_generic,
                                 .gemm_packed = &gemm_packed,
                                 .pack = &pack_generic,
                                 .quantize_a = &quantize_s8,
                                 .weight_only = &weight_only_generic,
                                 .signed_a = true,
                                 .quantize_a7 = &quantize_u7,
                                 .a7_zp = true,
                                 .epilogue = &EpilogueMath<8>::apply,
                                 .norm_rows = &EpilogueMath<8>::norm_rows};
  return &table;
}

}  // namespace int8
}  // namespace pk
