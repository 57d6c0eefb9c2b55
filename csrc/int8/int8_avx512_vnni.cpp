// AVX-512 VNNI int8 kernels. vpdpbusd multiplies unsigned by signed bytes, so
// a is biased to unsigned (a + 128) and 128 * sum_k b[j, k] is subtracted at
// the end. int32 arithmetic wraps, so the result is exact
// whenever the true sum fits in int32 (K < kMaxK guarantees it).
#include <immintrin.h>

#include "int8_avx512_epilogue.h"
#include "int8_epilogue.h"
#include "int8_generic.h"

namespace pk {
namespace int8 {
namespace {

// GCC 12 copies and spills the accumulator of _mm512_dpbusd_epi32 when it
// lives in an array (every iteration stored to the stack: 2.5x slower). The
// same instruction as inline asm, accumulator tied in place, stays in its
// register, and the tiles below name their accumulators one by one.
inline void dpbusd(__m512i& acc, __m512i a, __m512i b) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
}

// ---- Row-major operands (int8_gemm with few rows of a) ------------------
// Dot products along K: an MR x 4 tile of c, 64 bytes of k per step. The
// tile sums its four rows of b itself (one more dot product with ones per
// row of b), so a single token never pays a separate pass over b for the
// compensation.
constexpr int kRowNr = 4;

#define PK_RACC(i) __m512i r##i##0, r##i##1, r##i##2, r##i##3;
#define PK_RZERO(i) r##i##0 = r##i##1 = r##i##2 = r##i##3 = _mm512_setzero_si512();
#define PK_RDOT(i)                                                                     \
  if (MR > i) {                                                                        \
    const __m512i av =                                                                 \
        _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, a + (i0 + i) * lda + p), bias); \
    dpbusd(r##i##0, av, b0);                                                           \
    dpbusd(r##i##1, av, b1);                                                           \
    dpbusd(r##i##2, av, b2);                                                           \
    dpbusd(r##i##3, av, b3);                                                           \
  }
#define PK_RROW(i) {r##i##0, r##i##1, r##i##2, r##i##3}

template <int MR>
void row_tile(const int8_t* a, const int8_t* b, int32_t* c, int64_t i0, int64_t j0, int64_t nj,
              int64_t k, int64_t lda, int64_t ldb, int64_t ldc) {
  const __m512i bias = _mm512_set1_epi8(char(0x80)), ones = _mm512_set1_epi8(1);
  // clang-format off
  PK_RACC(0) PK_RACC(1) PK_RACC(2) PK_RACC(3)
  PK_RZERO(0) PK_RZERO(1) PK_RZERO(2) PK_RZERO(3);
  // clang-format on
  __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
  // Columns past nj read row j0 again (in bounds) and are never stored.
  const int8_t* b0p = b + j0 * ldb;
  const int8_t* b1p = nj > 1 ? b0p + ldb : b0p;
  const int8_t* b2p = nj > 2 ? b0p + 2 * ldb : b0p;
  const int8_t* b3p = nj > 3 ? b0p + 3 * ldb : b0p;
  for (int64_t p = 0; p < k; p += 64) {
    // Masked-off bytes load as 0: a's become 128 after the bias, b's are 0,
    // so they add nothing.
    const __mmask64 mask = k - p >= 64 ? ~__mmask64(0) : ((__mmask64(1) << (k - p)) - 1);
    const __m512i b0 = _mm512_maskz_loadu_epi8(mask, b0p + p);
    const __m512i b1 = _mm512_maskz_loadu_epi8(mask, b1p + p);
    const __m512i b2 = _mm512_maskz_loadu_epi8(mask, b2p + p);
    const __m512i b3 = _mm512_maskz_loadu_epi8(mask, b3p + p);
    dpbusd(s0, ones, b0);
    dpbusd(s1, ones, b1);
    dpbusd(s2, ones, b2);
    dpbusd(s3, ones, b3);
    // clang-format off
    PK_RDOT(0) PK_RDOT(1) PK_RDOT(2) PK_RDOT(3);
    // clang-format on
  }
  const __m512i acc[4][4] = {PK_RROW(0), PK_RROW(1), PK_RROW(2), PK_RROW(3)};
  const int32_t comp[4] = {128 * _mm512_reduce_add_epi32(s0), 128 * _mm512_reduce_add_epi32(s1),
                           128 * _mm512_reduce_add_epi32(s2), 128 * _mm512_reduce_add_epi32(s3)};
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < nj; ++j)
      c[(i0 + i) * ldc + j0 + j] = _mm512_reduce_add_epi32(acc[i][j]) - comp[j];
}
#undef PK_RACC
#undef PK_RZERO
#undef PK_RDOT
#undef PK_RROW

void gemm(const int8_t* a, const int8_t* b, int32_t* c, int64_t m0, int64_t m1, int64_t n0,
          int64_t n1, int64_t k, int64_t lda, int64_t ldb, int64_t ldc) {
  for (int64_t j = n0; j < n1; j += kRowNr) {
    const int64_t nj = n1 - j < kRowNr ? n1 - j : kRowNr;
    for (int64_t i = m0; i < m1; i += 4) {
      switch (m1 - i < 4 ? m1 - i : 4) {
        case 4:
          row_tile<4>(a, b, c, i, j, nj, k, lda, ldb, ldc);
          break;
        case 3:
          row_tile<3>(a, b, c, i, j, nj, k, lda, ldb, ldc);
          break;
        case 2:
          row_tile<2>(a, b, c, i, j, nj, k, lda, ldb, ldc);
          break;
        default:
          row_tile<1>(a, b, c, i, j, nj, k, lda, ldb, ldc);
      }
    }
  }
}

// ---- Packed weights (layout in int8.h) ----------------------------------
// An MR x 16*NV register tile over the whole of K: each 64-byte load of the
// packed weight (16 channels x 4 k) meets MR broadcasts of 4 activation
// bytes. 6 x 4 keeps 24 accumulators, 4 weight vectors and a broadcast in
// the 32 registers: 10 loads per 24 dot products.
constexpr int kPackMr = 6, kPackNv = 4;

inline __m512i load_u32_bcast(const uint8_t* p) {
  uint32_t v;
  __builtin_memcpy(&v, p, 4);
  return _mm512_set1_epi32(int(v));
}

// The accumulators are 24 named variables, not an array: GCC 12 keeps an
// array of them on the stack even when every index is a constant.
#define PK_ACC_ROW(i) __m512i c##i##0, c##i##1, c##i##2, c##i##3;
#define PK_ZERO_ROW(i) c##i##0 = c##i##1 = c##i##2 = c##i##3 = _mm512_setzero_si512();
#define PK_DOT_ROW(i)                                       \
  if (MR > i) {                                             \
    const __m512i av = load_u32_bcast(a + i * lda + 4 * q); \
    dpbusd(c##i##0, av, b0);                                \
    if (NV > 1) dpbusd(c##i##1, av, b1);                    \
    if (NV > 2) dpbusd(c##i##2, av, b2);                    \
    if (NV > 3) dpbusd(c##i##3, av, b3);                    \
  }
#define PK_ROW_ARRAY(i) {c##i##0, c##i##1, c##i##2, c##i##3}

// ahead (if not 0): the tile's weight that many groups ahead is fetched into
// L1 as it goes, and 8 times as far ahead into L2 (L2 keeps more misses in
// flight than L1). The first tile over a block streams it from memory at
// several times the rate the hardware prefetchers keep up with; later tiles
// find it in L2.
template <int MR, int NV>
void packed_tile(const PackedGemm& g, int64_t i0, int64_t p0, int64_t ahead) {
  static_assert(MR >= 1 && MR <= kPackMr && NV >= 1 && NV <= kPackNv, "tile size");
  // clang-format off
  PK_ACC_ROW(0) PK_ACC_ROW(1) PK_ACC_ROW(2) PK_ACC_ROW(3) PK_ACC_ROW(4) PK_ACC_ROW(5)
  PK_ZERO_ROW(0) PK_ZERO_ROW(1) PK_ZERO_ROW(2) PK_ZERO_ROW(3) PK_ZERO_ROW(4) PK_ZERO_ROW(5);
  // clang-format on
  int64_t gs;  // == 64 * NV: the block of panels at p0 holds NV of them
  const int8_t* b = panel_base(g.b, g.kp, packed_n(g.n), p0, &gs);
  const uint8_t* a = g.a + i0 * g.lda;
  const int64_t lda = g.lda, groups = g.kp / 4;
  __m512i b1 = _mm512_setzero_si512(), b2 = b1, b3 = b1;
  for (int64_t q = 0; q < groups; ++q) {
    const int8_t* bq = b + q * gs;
    if (ahead)
      for (int j = 0; j < NV; ++j) {
        _mm_prefetch(byte_at(bq, ahead * gs + 64 * j), _MM_HINT_T0);
        _mm_prefetch(byte_at(bq, 8 * ahead * gs + 64 * j), _MM_HINT_T1);
      }
    const __m512i b0 = _mm512_loadu_si512(bq);
    if (NV > 1) b1 = _mm512_loadu_si512(bq + 64);
    if (NV > 2) b2 = _mm512_loadu_si512(bq + 128);
    if (NV > 3) b3 = _mm512_loadu_si512(bq + 192);
    // clang-format off
    PK_DOT_ROW(0) PK_DOT_ROW(1) PK_DOT_ROW(2) PK_DOT_ROW(3) PK_DOT_ROW(4) PK_DOT_ROW(5);
    // clang-format on
  }
  const __m512i acc[kPackMr][kPackNv] = {PK_ROW_ARRAY(0), PK_ROW_ARRAY(1), PK_ROW_ARRAY(2),
                                         PK_ROW_ARRAY(3), PK_ROW_ARRAY(4), PK_ROW_ARRAY(5)};
  for (int j = 0; j < NV; ++j) {
    const int64_t col = (p0 + j) * 16;
    const int64_t left = g.n - col;
    const __mmask16 m = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
    const __m512i comp = _mm512_loadu_si512(g.comp + col);
    for (int i = 0; i < MR; ++i) store_vec(g, i0 + i, col, _mm512_sub_epi32(acc[i][j], comp), m);
  }
}
#undef PK_ACC_ROW
#undef PK_ZERO_ROW
#undef PK_DOT_ROW
#undef PK_ROW_ARRAY

// Groups ahead for the first tile over a block: 16 (4 KiB of a block of four
// panels) into L1, 128 into L2. Measured here with the weights in DRAM
// (Emerald Rapids, 2 threads): 1x4096x4096 1.05x -> 1.15-1.28x fbgemm,
// 16x 1.08x -> 1.43-1.56x; 32 or 256 no better.
#ifndef PK_AHEAD
#define PK_AHEAD 16
#endif

template <int NV>
void packed_rows(const PackedGemm& g, int64_t m0, int64_t m1, int64_t p) {
  int64_t i = m0;
  auto ahead = [&] { return i == m0 ? int64_t(PK_AHEAD) : int64_t(0); };
  for (; i + kPackMr <= m1; i += kPackMr) packed_tile<kPackMr, NV>(g, i, p, ahead());
  switch (m1 - i) {
    case 5:
      packed_tile<5, NV>(g, i, p, ahead());
      break;
    case 4:
      packed_tile<4, NV>(g, i, p, ahead());
      break;
    case 3:
      packed_tile<3, NV>(g, i, p, ahead());
      break;
    case 2:
      packed_tile<2, NV>(g, i, p, ahead());
      break;
    case 1:
      packed_tile<1, NV>(g, i, p, ahead());
      break;
    default:
      break;
  }
}

void gemm_packed(const PackedGemm& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; p += kPackNv) {
    switch (p1 - p < kPackNv ? p1 - p : kPackNv) {
      case 4:
        packed_rows<4>(g, m0, m1, p);
        break;
      case 3:
        packed_rows<3>(g, m0, m1, p);
        break;
      case 2:
        packed_rows<2>(g, m0, m1, p);
        break;
      default:
        packed_rows<1>(g, m0, m1, p);
    }
  }
}

// 16 rows x 64 bytes of w (16 groups of 4 k) become 16 packed groups: a
// 16 x 16 transpose of dwords (unpack 32, unpack 64, then 128-bit lanes).
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
  // u[4L + c], lane l, holds rows 4L..4L+3 of group 4l + c.
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

void pack(const int8_t* w, int64_t n, int64_t k, int64_t ldw, int8_t* packed, int32_t* comp,
          int64_t p0, int64_t p1) {
  const int64_t kp = packed_k(k), np = packed_n(n), groups = kp / 4;
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t p = p0; p < p1; ++p) {
    int64_t gs;
    int8_t* base = const_cast<int8_t*>(panel_base(packed, kp, np, p, &gs));
    __m512i sum = _mm512_setzero_si512();
    for (int64_t q0 = 0; q0 < groups; q0 += 16) {
      // Bytes past k and rows past n load as zero: the padding of the layout.
      const int64_t left = k - 4 * q0;
      const __mmask64 m = left >= 64 ? ~__mmask64(0) : (__mmask64(1) << left) - 1;
      __m512i r[16];
      for (int j = 0; j < 16; ++j)
        r[j] = p * 16 + j < n ? _mm512_maskz_loadu_epi8(m, w + (p * 16 + j) * ldw + 4 * q0)
                              : _mm512_setzero_si512();
      transpose16(r);
      const int64_t count = groups - q0 < 16 ? groups - q0 : 16;
      for (int q = 0; q < count; ++q) {
        _mm512_storeu_si512(base + (q0 + q) * gs, r[q]);
        sum = _mm512_dpbusd_epi32(sum, ones, r[q]);  // lane j += row j's 4 bytes
      }
    }
    _mm512_storeu_si512(comp + p * 16, _mm512_slli_epi32(sum, 7));
  }
}

inline __m512 load16(const void* x, DType t, int64_t off, __mmask16 m) {
  switch (t) {
    case DType::f16:
      return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(x) + off));
    case DType::bf16:
      return _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(x) + off)),
          16));
    default:
      return _mm512_maskz_loadu_ps(m, static_cast<const float*>(x) + off);
  }
}

// Same arithmetic as quantize_per_row (an IEEE division, then round half to
// even), so the fused layer's integers equal the standalone op's.
void quantize_u8(const void* x, DType xt, int64_t ldx, int64_t k, uint8_t* q, int64_t ldq,
                 float* scale, int64_t r0, int64_t r1) {
  const __m512 lim = _mm512_set1_ps(127.0f);
  const __m512i bias = _mm512_set1_epi32(128);
  for (int64_t r = r0; r < r1; ++r) {
    __m512 amax = _mm512_setzero_ps();
    __mmask16 nan = 0;
    for (int64_t c = 0; c < k; c += 16) {
      const __mmask16 m = k - c >= 16 ? __mmask16(0xffff) : __mmask16((1u << (k - c)) - 1);
      const __m512 v = load16(x, xt, r * ldx + c, m);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
    }
    const float s = nan ? __builtin_nanf("") : _mm512_reduce_max_ps(amax) / 127.0f;
    scale[r] = s;
    uint8_t* qr = q + r * ldq;
    const bool usable = s > 0.0f && s <= 3.4028234663852886e38f;  // not 0, NaN or inf
    const __m512 sv = _mm512_set1_ps(s);
    for (int64_t c = 0; c < k; c += 16) {
      const __mmask16 m = k - c >= 16 ? __mmask16(0xffff) : __mmask16((1u << (k - c)) - 1);
      __m512i qi = bias;
      if (usable) {
        __m512 v = _mm512_roundscale_ps(_mm512_div_ps(load16(x, xt, r * ldx + c, m), sv),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm512_min_ps(lim, _mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), lim), v));
        qi = _mm512_add_epi32(_mm512_cvtps_epi32(v), bias);
      }
      _mm_mask_storeu_epi8(qr + c, m, _mm512_cvtepi32_epi8(qi));
    }
    for (int64_t c = k; c < ldq; ++c) qr[c] = 128;
  }
}

// Rows quantized as quantize_per_row7 (grid7's scale and zero point, the
// same division and rounding as q7), stored biased as q + 128 like
// quantize_u8's: the VNNI and AMX kernels then run unchanged.
void quantize_u8_a7(const void* x, DType xt, int64_t ldx, int64_t k, uint8_t* q, int64_t ldq,
                    float* scale, int32_t* /*zp*/, int64_t r0, int64_t r1) {
  const __m512i bias = _mm512_set1_epi32(128);
  for (int64_t r = r0; r < r1; ++r) {
    __m512 lo = _mm512_setzero_ps(), hi = lo;
    __mmask16 nan = 0;
    for (int64_t c = 0; c < k; c += 16) {
      const __mmask16 m = k - c >= 16 ? __mmask16(0xffff) : __mmask16((1u << (k - c)) - 1);
      const __m512 v = load16(x, xt, r * ldx + c, m);  // zero past k: min and max keep 0 in
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      lo = _mm512_min_ps(lo, v);
      hi = _mm512_max_ps(hi, v);
    }
    const float lmin = nan ? 0.0f : _mm512_reduce_min_ps(lo);
    const float hmax = nan ? 0.0f : _mm512_reduce_max_ps(hi);
    const Grid7 g = grid7(lmin, hmax, nan != 0);
    scale[r] = g.scale;
    uint8_t* qr = q + r * ldq;
    const __m512 sv = _mm512_set1_ps(g.scale), qlo = _mm512_set1_ps(float(-g.zp)),
                 qhi = _mm512_set1_ps(float(127 - g.zp));
    for (int64_t c = 0; c < k; c += 16) {
      const __mmask16 m = k - c >= 16 ? __mmask16(0xffff) : __mmask16((1u << (k - c)) - 1);
      __m512i qi = bias;
      if (g.usable) {
        __m512 v = _mm512_roundscale_ps(_mm512_div_ps(load16(x, xt, r * ldx + c, m), sv),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm512_min_ps(qhi, _mm512_max_ps(qlo, v));
        qi = _mm512_add_epi32(_mm512_cvtps_epi32(v), bias);
      }
      _mm_mask_storeu_epi8(qr + c, m, _mm512_cvtepi32_epi8(qi));
    }
    for (int64_t c = k; c < ldq; ++c) qr[c] = 128;
  }
}

}  // namespace

const GemmKernels* gemm_kernels_avx512_vnni() {
  static const GemmKernels table{.gemm = &gemm,
                                 .gemm_packed = &gemm_packed,
                                 .pack = &pack,
                                 .quantize_a = &quantize_u8,
                                 .weight_only = &weight_only_generic,
                                 .signed_a = false,
                                 .quantize_a7 = &quantize_u8_a7,
                                 .a7_zp = false,
                                 .epilogue = &EpilogueMath<16>::apply,
                                 .norm_rows = &EpilogueMath<16>::norm_rows};
  return &table;
}

}  // namespace int8
}  // namespace pk
