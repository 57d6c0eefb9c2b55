// Baseline Armv8-A int8 kernels (NEON, no dot product instruction). SMULL
// multiplies eight signed byte pairs into int16; the packed kernel pairs two
// k groups in each int16 lane (SMULL, then SMLAL with the next group) and
// SADALP folds adjacent lanes into int32: 16 MACs in three instructions, where
// the portable loop widens every byte to int32 first. Two products fit int16
// because the activations lie in [-127, 127] (signed_a; the driver takes
// int8_gemm's -128 out): 2 * 127 * 128 < 2^15.
#include "int8_arm.h"
#include "int8_epilogue.h"

namespace pk {
namespace int8 {
namespace {

inline int8x16_t bcast4(const uint8_t* p) {
  int32_t v;
  __builtin_memcpy(&v, p, 4);
  return vreinterpretq_s8_s32(vdupq_n_s32(v));
}

// ---- Packed GEMM (layout in int8.h) ---------------------------------------
// One row x one panel (16 channels) over the whole of K. A packed group's
// 16-byte vector t holds four channels x 4 k ([c0 k0..3, c1 k0..3, ...]);
// against the row's four activation bytes repeated four times, SMULL gives
// the products of channels 4t and 4t+1 in eight int16 lanes and SMULL2 those
// of 4t+2 and 4t+3. Each accumulator then holds two partial sums per channel,
// [c0, c0, c1, c1], which ADDP folds once at the end. A single row, because
// the multiplies, not the loads, bound this kernel (one weight vector feeds
// four multiplies either way), and two rows' 16 accumulators plus their 16
// int16 products outgrow the 32 registers: GCC then spills in the loop.
[[gnu::noinline]] void packed_tile(const PackedGemm& g, int64_t row, int64_t p) {
  int32x4_t lo[4], hi[4];
#pragma GCC unroll 4
  for (int t = 0; t < 4; ++t) lo[t] = hi[t] = vdupq_n_s32(0);
  int64_t gs;
  const int8_t* b = panel_base(g.b, g.kp, packed_n(g.n), p, &gs);
  const uint8_t* a = g.a + row * g.lda;
  const int64_t groups = g.kp / 4;
  int64_t q = 0;
  for (; q + 2 <= groups; q += 2) {
    const int8_t* b0 = b + q * gs;
    const int8_t* b1 = b0 + gs;
    const int8x16_t x0 = bcast4(a + 4 * q), x1 = bcast4(a + 4 * q + 4);
#pragma GCC unroll 4
    for (int t = 0; t < 4; ++t) {
      const int8x16_t w0 = vld1q_s8(b0 + 16 * t), w1 = vld1q_s8(b1 + 16 * t);
      const int16x8_t l =
          vmlal_s8(vmull_s8(vget_low_s8(w0), vget_low_s8(x0)), vget_low_s8(w1), vget_low_s8(x1));
      const int16x8_t h = vmlal_high_s8(vmull_high_s8(w0, x0), w1, x1);
      lo[t] = vpadalq_s16(lo[t], l);
      hi[t] = vpadalq_s16(hi[t], h);
    }
  }
  if (q < groups) {  // an odd last group
    const int8_t* b0 = b + q * gs;
    const int8x16_t x0 = bcast4(a + 4 * q);
#pragma GCC unroll 4
    for (int t = 0; t < 4; ++t) {
      const int8x16_t w0 = vld1q_s8(b0 + 16 * t);
      lo[t] = vpadalq_s16(lo[t], vmull_s8(vget_low_s8(w0), vget_low_s8(x0)));
      hi[t] = vpadalq_s16(hi[t], vmull_high_s8(w0, x0));
    }
  }
  int32x4_t acc[4];
#pragma GCC unroll 4
  for (int t = 0; t < 4; ++t) acc[t] = vpaddq_s32(lo[t], hi[t]);
  store_rows<1>(g, row, p * 16, acc, 4);
}

void gemm_packed(const PackedGemm& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p)
    for (int64_t i = m0; i < m1; ++i) packed_tile(g, i, p);
}

}  // namespace

const GemmKernels* gemm_kernels_neon() {
  static const GemmKernels table{.gemm = &gemm_rowmajor<mac16, 2>,
                                 .gemm_packed = &gemm_packed,
                                 .pack = &pack_generic,
                                 .quantize_a = &quantize_s8,
                                 .weight_only = &weight_only_generic,
                                 .signed_a = true,
                                 .quantize_a7 = &quantize_s7,
                                 .a7_zp = false,
                                 .epilogue = &EpilogueMath<4>::apply,
                                 .norm_rows = &EpilogueMath<4>::norm_rows};
  return &table;
}

}  // namespace int8
}  // namespace pk
