// What the three Arm int8 tables (int8_neon.cpp, int8_dotprod.cpp,
// int8_i8mm.cpp) share, in baseline Armv8-A NEON: the epilogue of a packed
// tile, the activation quantizers and the row-major GEMM without a dot
// product instruction. Every Arm table takes signed activations (signed_a):
// SMULL, SDOT and SMMLA all multiply signed by signed bytes, so there is no
// +128 bias and no compensation. Anonymous namespace: each Arm file compiles
// its own copy with its own -march (see int8_generic.h).
#pragma once
#include <arm_neon.h>

#include "int8_generic.h"

namespace pk {
namespace int8 {
namespace {

// ---- Epilogue ---------------------------------------------------------------

// fp32 -> bf16 round to nearest even, NaN kept quiet: f32_to_bf16 of half.h
// on four lanes (BFCVTN is Armv8.6 and optional before it).
inline uint16x4_t to_bf16(float32x4_t v) {
  const uint32x4_t b = vreinterpretq_u32_f32(v);
  const uint32x4_t lsb = vandq_u32(vshrq_n_u32(b, 16), vdupq_n_u32(1));
  const uint32x4_t r = vshrq_n_u32(vaddq_u32(vaddq_u32(b, vdupq_n_u32(0x7fff)), lsb), 16);
  const uint32x4_t qnan = vorrq_u32(vshrq_n_u32(b, 16), vdupq_n_u32(0x40));
  return vmovn_u32(vbslq_u32(vceqq_f32(v, v), r, qnan));
}

// Row `row`, columns [col, col + cnt) (cnt <= 4) of the output from one
// accumulator of four columns. Same arithmetic as store_out, so a tail column
// stored one by one rounds like a full vector's.
inline void store4(const PackedGemm& g, int64_t row, int64_t col, int32x4_t acc, int64_t cnt) {
  if (cnt < 4) {
    int32_t t[4];
    vst1q_s32(t, acc);
    for (int64_t j = 0; j < cnt; ++j) store_out(g, row, col + j, t[j]);
    return;
  }
  const int64_t off = row * g.ldc + col;
  if (!g.a_scale) {
    vst1q_s32(static_cast<int32_t*>(g.c) + off, acc);
    return;
  }
  const float32x4_t s = vmulq_n_f32(vld1q_f32(g.b_scale + col), g.a_scale[row]);
  float32x4_t v = vmulq_f32(vcvtq_f32_s32(acc), s);
  if (g.bias) v = vaddq_f32(v, vld1q_f32(g.bias + col));
  switch (g.yt) {
    case DType::f16:
      // FCVTN rounds to nearest even and keeps NaN quiet, as f32_to_f16 does.
      vst1_u16(static_cast<uint16_t*>(g.c) + off, vreinterpret_u16_f16(vcvt_f16_f32(v)));
      break;
    case DType::bf16:
      vst1_u16(static_cast<uint16_t*>(g.c) + off, to_bf16(v));
      break;
    default:
      vst1q_f32(static_cast<float*>(g.c) + off, v);
  }
}

// MR rows of the 4 * NT columns from col (those before g.n) of a tile's
// accumulators: acc[i * stride + t] holds columns 4t..4t+3 of row i0 + i.
template <int MR, int NT = 4>
inline void store_rows(const PackedGemm& g, int64_t i0, int64_t col, const int32x4_t* acc,
                       int stride) {
#pragma GCC unroll 4
  for (int t = 0; t < NT; ++t) {
    const int64_t c = col + 4 * t, left = g.n - c;
    if (left <= 0) break;
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) store4(g, i0 + i, c, acc[i * stride + t], left < 4 ? left : 4);
  }
}

// ---- Quantization prologue --------------------------------------------------

// Four elements of x from `off` as fp32 (f16 widening is exact).
inline float32x4_t load4f(const void* x, DType t, int64_t off) {
  switch (t) {
    case DType::f16:
      return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(static_cast<const uint16_t*>(x) + off)));
    case DType::bf16:
      return vreinterpretq_f32_u32(
          vshll_n_u16(vld1_u16(static_cast<const uint16_t*>(x) + off), 16));
    default:
      return vld1q_f32(static_cast<const float*>(x) + off);
  }
}

// Sixteen int32 lanes in [-127, 127] narrowed to bytes.
inline int8x16_t narrow16(int32x4_t a, int32x4_t b, int32x4_t c, int32x4_t d) {
  return vcombine_s8(vmovn_s16(vcombine_s16(vmovn_s32(a), vmovn_s32(b))),
                     vmovn_s16(vcombine_s16(vmovn_s32(c), vmovn_s32(d))));
}

// Same arithmetic as quantize_per_row (an IEEE division, then FRINTN: round
// half to even, what nearbyint does in the default rounding mode), so the
// fused layer's integers equal the standalone op's. Stored as signed bytes,
// zero past k.
void quantize_s8(const void* x, DType xt, int64_t ldx, int64_t k, uint8_t* qu, int64_t ldq,
                 float* scale, int64_t r0, int64_t r1) {
  const int64_t k4 = k / 4 * 4, k16 = k / 16 * 16;
  const float32x4_t lim = vdupq_n_f32(127.0f), nlim = vdupq_n_f32(-127.0f);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t base = r * ldx;
    // FMAX would pass a NaN on, but so would it pass it to amax where the
    // scalar tail compares; a separate flag keeps the two paths alike.
    float32x4_t amax = vdupq_n_f32(0.0f);
    uint32x4_t num = vdupq_n_u32(~0u);
    int64_t c = 0;
    for (; c < k4; c += 4) {
      const float32x4_t v = load4f(x, xt, base + c);
      num = vandq_u32(num, vceqq_f32(v, v));
      amax = vmaxnmq_f32(amax, vabsq_f32(v));
    }
    float m = vmaxvq_f32(amax);
    bool nan = vminvq_u32(num) == 0;
    for (; c < k; ++c) {
      const float v = load_f(x, xt, base + c);
      nan |= v != v;
      m = m < abs_f(v) ? abs_f(v) : m;
    }
    const float s = nan ? __builtin_nanf("") : m / 127.0f;
    scale[r] = s;
    int8_t* q = reinterpret_cast<int8_t*>(qu) + r * ldq;
    if (!(s > 0.0f && s <= 3.4028234663852886e38f)) {  // zero, NaN or inf: q carries nothing
      for (int64_t j = 0; j < ldq; ++j) q[j] = 0;
      continue;
    }
    const float32x4_t sv = vdupq_n_f32(s);
    auto q4 = [&](int64_t off) {
      const float32x4_t v = vrndnq_f32(vdivq_f32(load4f(x, xt, base + off), sv));
      return vcvtq_s32_f32(vminq_f32(lim, vmaxq_f32(nlim, v)));
    };
    for (c = 0; c < k16; c += 16)
      vst1q_s8(q + c, narrow16(q4(c), q4(c + 4), q4(c + 8), q4(c + 12)));
    for (; c < k; ++c) {
      float v = __builtin_nearbyintf(load_f(x, xt, base + c) / s);
      v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
      q[c] = int8_t(v);
    }
    for (; c < ldq; ++c) q[c] = 0;
  }
}

// Rows quantized as quantize_per_row7 (grid7's scale and zero point, q7's
// division and rounding), stored as the signed q itself, zero past k: q lies
// in [-127, 127] like 8-bit activations, so the 8-bit kernels run unchanged
// (no zero point to take off, zp not written).
void quantize_s7(const void* x, DType xt, int64_t ldx, int64_t k, uint8_t* qu, int64_t ldq,
                 float* scale, int32_t* /*zp*/, int64_t r0, int64_t r1) {
  const int64_t k4 = k / 4 * 4, k16 = k / 16 * 16;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t base = r * ldx;
    float32x4_t lo = vdupq_n_f32(0.0f), hi = lo;
    uint32x4_t num = vdupq_n_u32(~0u);
    int64_t c = 0;
    for (; c < k4; c += 4) {
      const float32x4_t v = load4f(x, xt, base + c);
      num = vandq_u32(num, vceqq_f32(v, v));
      lo = vminnmq_f32(lo, v);
      hi = vmaxnmq_f32(hi, v);
    }
    float lmin = vminvq_f32(lo), hmax = vmaxvq_f32(hi);
    bool nan = vminvq_u32(num) == 0;
    for (; c < k; ++c) {
      const float v = load_f(x, xt, base + c);
      nan |= v != v;
      lmin = v < lmin ? v : lmin;
      hmax = v > hmax ? v : hmax;
    }
    const Grid7 gr = grid7(lmin, hmax, nan);
    scale[r] = gr.scale;
    int8_t* q = reinterpret_cast<int8_t*>(qu) + r * ldq;
    if (!gr.usable) {
      for (int64_t j = 0; j < ldq; ++j) q[j] = 0;
      continue;
    }
    const float32x4_t sv = vdupq_n_f32(gr.scale), qlo = vdupq_n_f32(float(-gr.zp)),
                      qhi = vdupq_n_f32(float(127 - gr.zp));
    auto q4 = [&](int64_t off) {
      const float32x4_t v = vrndnq_f32(vdivq_f32(load4f(x, xt, base + off), sv));
      return vcvtq_s32_f32(vminq_f32(qhi, vmaxq_f32(qlo, v)));
    };
    for (c = 0; c < k16; c += 16)
      vst1q_s8(q + c, narrow16(q4(c), q4(c + 4), q4(c + 8), q4(c + 12)));
    for (; c < k; ++c) q[c] = int8_t(q7(load_f(x, xt, base + c), gr));
    for (; c < ldq; ++c) q[c] = 0;
  }
}

// ---- Row-major operands without a dot product (int8_gemm, few rows of a) ----
// a and b are the caller's bytes, -128 included: one product fits int16
// (128 * 128 = 2^14) but two may not (2^15), so each SMULL's eight products
// go straight into int32 pairs with SADALP: 16 MACs in four instructions.
// An MR x 4 tile, 16 bytes of k per step; the k tail is copied into zeroed
// 16-byte buffers (the caller's rows may end right there).

inline int8x16_t load_tail(const int8_t* p, int64_t n) {
  int8_t t[16] = {};
  for (int64_t i = 0; i < n; ++i) t[i] = p[i];
  return vld1q_s8(t);
}

inline int32x4_t mac16(int32x4_t acc, int8x16_t a, int8x16_t b) {
  acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(a), vget_low_s8(b)));
  return vpadalq_s16(acc, vmull_high_s8(a, b));
}

// Dot(a, b) over 16 bytes into acc, as the table's instruction does it.
using Mac16 = int32x4_t (*)(int32x4_t, int8x16_t, int8x16_t);

template <int MR, Mac16 Mac>
void row_tile(const int8_t* a, const int8_t* b, int32_t* c, int64_t i0, int64_t j0, int64_t nj,
              int64_t k, int64_t lda, int64_t ldb, int64_t ldc) {
  int32x4_t acc[MR][4];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < 4; ++j) acc[i][j] = vdupq_n_s32(0);
  // Columns past nj read row j0 again (in bounds) and are never stored.
  const int8_t* bp[4];
#pragma GCC unroll 16
  for (int j = 0; j < 4; ++j) bp[j] = b + (j0 + (j < nj ? j : 0)) * ldb;
  const int64_t k16 = k / 16 * 16;
  auto step = [&](auto load, int64_t p) {
    int8x16_t bv[4];
#pragma GCC unroll 16
    for (int j = 0; j < 4; ++j) bv[j] = load(bp[j] + p);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const int8x16_t av = load(a + (i0 + i) * lda + p);
#pragma GCC unroll 16
      for (int j = 0; j < 4; ++j) acc[i][j] = Mac(acc[i][j], av, bv[j]);
    }
  };
  for (int64_t p = 0; p < k16; p += 16) step([](const int8_t* s) { return vld1q_s8(s); }, p);
  if (k16 < k) step([&](const int8_t* s) { return load_tail(s, k - k16); }, k16);
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < nj; ++j) c[(i0 + i) * ldc + j0 + j] = vaddvq_s32(acc[i][j]);
}

// MR: rows per tile, at most 4. SDOT takes 4 (16 accumulators); the SMULL
// form 2, since each of its multiply-adds holds two int16 products in
// registers besides the accumulators, and at 4 rows GCC spills.
template <Mac16 Mac, int MR>
void gemm_rowmajor(const int8_t* a, const int8_t* b, int32_t* c, int64_t m0, int64_t m1, int64_t n0,
                   int64_t n1, int64_t k, int64_t lda, int64_t ldb, int64_t ldc) {
  static_assert(MR == 2 || MR == 4, "tile rows");
  for (int64_t j = n0; j < n1; j += 4) {
    const int64_t nj = n1 - j < 4 ? n1 - j : 4;
    int64_t i = m0;
    for (; i + MR <= m1; i += MR) row_tile<MR, Mac>(a, b, c, i, j, nj, k, lda, ldb, ldc);
    switch (m1 - i) {
      case 3:
        row_tile<MR == 4 ? 3 : 1, Mac>(a, b, c, i, j, nj, k, lda, ldb, ldc);
        break;
      case 2:
        row_tile<2, Mac>(a, b, c, i, j, nj, k, lda, ldb, ldc);
        break;
      case 1:
        row_tile<1, Mac>(a, b, c, i, j, nj, k, lda, ldb, ldc);
        break;
      default:
        break;
    }
  }
}

}  // namespace
}  // namespace int8
}  // namespace pk
