// Int8 matrix multiply kernels (SMMLA, FEAT_I8MM: optional from Armv8.2-A,
// required from 8.6; detection asks for dot product too). SMMLA takes two
// rows of 8 bytes from each operand and adds their 2 x 2 dot products to
// four int32 lanes: 32 MACs per instruction, twice SDOT's. Signed x signed,
// exact, like SDOT.
//
// Its operands want 8 consecutive k of two rows (activations) and of two
// channels (weights). The packed layout (int8.h, shared by every table and
// by saved weights) keeps 4 k per channel per group, so the weight operand
// needs a ZIP of two groups, and the activation operand two rows side by
// side. Done in the inner loop, those shuffles would compete with SMMLA for
// the same vector pipes (1 shuffle per 2 to 3 SMMLA); instead both operands
// are repacked once per cache block into SMMLA order and the inner loop is
// loads and SMMLA only. The repack pays for itself only over enough rows
// (each weight operand is then used rows / 2 times): below kMmlaMinRows the
// SDOT kernels of int8_sdot.h run, which read the packed layout as it is.
#include "int8_epilogue.h"
#include "int8_sdot.h"

#ifndef __ARM_FEATURE_MATMUL_INT8
#error "int8_i8mm.cpp needs the int8 matrix multiply extension (-march=...+i8mm)"
#endif

namespace pk {
namespace int8 {
namespace {

// Rows below which a packed GEMM runs on SDOT. Estimated, not measured (no
// i8mm hardware here): in llvm-mca's model (benchmarks/ARM_MCA.md) repacking
// a block's weight costs about 92 cycles per 8 k whatever the row count,
// and SMMLA with its repacking overtakes SDOT at about 14 rows.
#ifndef PK_MMLA_MIN_ROWS
#define PK_MMLA_MIN_ROWS 16
#endif
constexpr int64_t kMmlaMinRows = PK_MMLA_MIN_ROWS;

// Cache blocking: kRc rows x kKc bytes of k of the activations and the
// block's 64 channels x kKc of the weight are repacked together (24 KiB +
// 16 KiB, both L1-resident on Neoverse N1/N2/V1's 64 KiB), their partial
// sums kept in 24 KiB of int32 between k blocks. All on the stack: the
// ISA files use no allocator (int8_isa.h).
constexpr int64_t kRc = 96, kKc = 256;
constexpr int64_t kPairs = kRc / 2, kSteps = kKc / 8;

// The partner of an odd count's last row: zeros, read like a row.
alignas(16) constexpr uint8_t kZeroRow[kKc] = {};

// Where a tile's operands lie, in both repacked buffers: the four a tile
// reads each step are 32 bytes apart, interleaved with the four of its
// neighbour (the other half panel; the next group of row pairs). Adjacent,
// GCC would pair their loads into LDP, which LLVM 14's model for these cores
// (Cortex-A57's) costs three micro-ops, not two, for nothing gained: the
// loads issue at the same rate either way.
//
// Activations [r0, r0 + rc) x k [k0, k0 + kc) into SMMLA operands: row pair
// pr = 4G + p (G the tile's group of four pairs), step s at
// ap + 128 * ((G / 2) * steps + s) + 16 * (G % 2) + 32 * p holds row
// r0 + 2pr's 8 k, then the next row's (zeros past the rows and past kc, a
// multiple of 4).
[[gnu::noinline]] void repack_a(const PackedGemm& g, int64_t r0, int64_t rc, int64_t k0, int64_t kc,
                                int8_t* ap) {
  const int64_t steps = (kc + 7) / 8, full = kc / 8;
  for (int64_t pr = 0; 2 * pr < rc; ++pr) {
    const uint8_t* ra = g.a + (r0 + 2 * pr) * g.lda + k0;
    const uint8_t* rb = 2 * pr + 1 < rc ? ra + g.lda : kZeroRow;
    int8_t* dst = ap + 128 * (pr / 8) * steps + 16 * (pr / 4 % 2) + 32 * (pr % 4);
    // Unrolled: the loop's own instructions would cost as much as its
    // copies (two loads and a store pair a step).
#pragma GCC unroll 4
    for (int64_t s = 0; s < full; ++s) {
      uint64_t v[2];
      __builtin_memcpy(&v[0], ra + 8 * s, 8);
      __builtin_memcpy(&v[1], rb + 8 * s, 8);
      __builtin_memcpy(dst + 128 * s, v, 16);
    }
    if (full < steps) {  // 4 k left
      uint32_t va, vb;
      __builtin_memcpy(&va, ra + 8 * full, 4);
      __builtin_memcpy(&vb, rb + 8 * full, 4);
      const uint64_t v[2] = {va, vb};
      __builtin_memcpy(dst + 128 * full, v, 16);
    }
  }
}

// Panels [p, p + nvp) of the block at p (a multiple of 4), k [k0, k0 + kc),
// into SMMLA operands: panel j, step s, channel pair 4h + c (h the half
// panel) at bp + 128 * (j * steps + s) + 16 * h + 32 * c holds channel
// 2(4h + c)'s 8 k, then the next channel's. ZIP1 / ZIP2 of the same vector of
// two consecutive groups give exactly that: [c0 k0..3, c0 k4..7, c1 k0..3,
// c1 k4..7] and the same for c2, c3.
[[gnu::noinline]] void repack_b(const PackedGemm& g, int64_t p, int64_t nvp, int64_t k0, int64_t kc,
                                int8_t* bp) {
  int64_t gs;
  const int8_t* base = panel_base(g.b, g.kp, packed_n(g.n), p, &gs);
  const int64_t steps = (kc + 7) / 8, q0 = k0 / 4, q1 = (k0 + kc) / 4;
  for (int64_t j = 0; j < nvp; ++j)
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t q = q0 + 2 * s;
      const int8_t* w0 = base + 64 * j + q * gs;
      int8_t* dst = bp + 128 * (j * steps + s);
#pragma GCC unroll 16
      for (int t = 0; t < 4; ++t) {
        // Vector t holds channel pairs 2t and 2t + 1: half t / 2, pairs
        // 2t % 4 and 2t % 4 + 1 within it.
        const int32x4_t x = vreinterpretq_s32_s8(vld1q_s8(w0 + 16 * t));
        const int32x4_t y =
            q + 1 < q1 ? vreinterpretq_s32_s8(vld1q_s8(w0 + gs + 16 * t)) : vdupq_n_s32(0);
        int8_t* d = dst + 16 * (t / 2) + 32 * (2 * t % 4);
        vst1q_s8(d, vreinterpretq_s8_s32(vzip1q_s32(x, y)));
        vst1q_s8(d + 32, vreinterpretq_s8_s32(vzip2q_s32(x, y)));
      }
    }
}

// P <= 4 row pairs x 8 channels (half a panel) over one k block: 4 * P
// accumulators, P activation and 4 weight operands, 24 registers for P = 4
// (a whole panel's 8 weight operands against 3 pairs would need 35, and GCC
// spills accumulators). Each step of 8 k is P + 4 loads for 4 * P SMMLA.
// acc[p][cp] = [(row 2p, ch 2cp), (2p, 2cp + 1), (2p + 1, 2cp),
// (2p + 1, 2cp + 1)]. ap, bp: the tile's first operands in the repacked
// buffers (repack_a, repack_b), 128 bytes a step, 32 apart within one. part: where the sums wait
// between k blocks, pair p's at part[32 * p + cp]; first: start from zero;
// last: store the output instead, rows [r0, r0 + rows) (not a pad row) and
// the 8 columns from col.
template <int P>
[[gnu::noinline]] void mmla_tile(const PackedGemm& g, const int8_t* ap, const int8_t* bp,
                                 int64_t steps, int32x4_t* part, bool first, bool last, int64_t r0,
                                 int64_t rows, int64_t col) {
  static_assert(P >= 1 && P <= 4, "tile size");
  int32x4_t acc[P][4];
#pragma GCC unroll 4
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
    for (int cp = 0; cp < 4; ++cp) acc[p][cp] = first ? vdupq_n_s32(0) : part[32 * p + cp];
  // Two steps per iteration: the loop's own three instructions then take
  // half a dispatch slot per step of 16 SMMLA, not one.
#pragma GCC unroll 2
  for (int64_t s = 0; s < steps; ++s) {
    int8x16_t av[P], w[4];
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p) av[p] = vld1q_s8(ap + 128 * s + 32 * p);
#pragma GCC unroll 4
    for (int cp = 0; cp < 4; ++cp) w[cp] = vld1q_s8(bp + 128 * s + 32 * cp);
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
      for (int cp = 0; cp < 4; ++cp) acc[p][cp] = vmmlaq_s32(acc[p][cp], av[p], w[cp]);
  }
  if (!last) {
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
      for (int cp = 0; cp < 4; ++cp) part[32 * p + cp] = acc[p][cp];
    return;
  }
#pragma GCC unroll 4
  for (int p = 0; p < P; ++p) {
    // Rows 2p and 2p + 1 of four columns are the low and high halves of
    // two accumulators.
    int32x4_t out[2][2];
#pragma GCC unroll 2
    for (int t = 0; t < 2; ++t) {
      const int64x2_t x = vreinterpretq_s64_s32(acc[p][2 * t]);
      const int64x2_t y = vreinterpretq_s64_s32(acc[p][2 * t + 1]);
      out[0][t] = vreinterpretq_s32_s64(vzip1q_s64(x, y));
      out[1][t] = vreinterpretq_s32_s64(vzip2q_s64(x, y));
    }
    if (2 * p + 1 < rows)
      store_rows<2, 2>(g, r0 + 2 * p, col, &out[0][0], 2);
    else
      store_rows<1, 2>(g, r0 + 2 * p, col, &out[0][0], 2);
  }
}

void gemm_packed_mmla(const PackedGemm& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  if (m1 - m0 < kMmlaMinRows || g.kp == 0) {
    gemm_packed_sdot(g, m0, m1, p0, p1);
    return;
  }
  alignas(16) int8_t abuf[kPairs * kSteps * 16];
  alignas(16) int8_t bbuf[4 * kSteps * 128];
  int32x4_t part[kPairs * 32];
  for (int64_t blk = p0; blk < p1; blk += 4) {
    const int64_t nvp = p1 - blk < 4 ? p1 - blk : 4;
    for (int64_t r0 = m0; r0 < m1; r0 += kRc) {
      const int64_t rc = m1 - r0 < kRc ? m1 - r0 : kRc, pairs = (rc + 1) / 2;
      for (int64_t k0 = 0; k0 < g.kp; k0 += kKc) {
        const int64_t kc = g.kp - k0 < kKc ? g.kp - k0 : kKc, steps = (kc + 7) / 8;
        const bool first = k0 == 0, last = k0 + kc == g.kp;
        repack_a(g, r0, rc, k0, kc, abuf);
        repack_b(g, blk, nvp, k0, kc, bbuf);
        for (int64_t h = 0; h < 2 * nvp; ++h) {  // half panels of 8 channels
          const int8_t* bp = bbuf + 128 * (h / 2) * steps + 16 * (h % 2);
          const int64_t col = blk * 16 + 8 * h;
          if (col >= g.n) break;
          for (int64_t pp = 0; pp < pairs; pp += 4) {
            const int8_t* ap = abuf + 128 * (pp / 8) * steps + 16 * (pp / 4 % 2);
            int32x4_t* pt = part + 32 * pp + 4 * h;
            const int64_t r = r0 + 2 * pp, rows = rc - 2 * pp;
            switch (pairs - pp < 4 ? pairs - pp : 4) {
              case 4:
                mmla_tile<4>(g, ap, bp, steps, pt, first, last, r, rows, col);
                break;
              case 3:
                mmla_tile<3>(g, ap, bp, steps, pt, first, last, r, rows, col);
                break;
              case 2:
                mmla_tile<2>(g, ap, bp, steps, pt, first, last, r, rows, col);
                break;
              default:
                mmla_tile<1>(g, ap, bp, steps, pt, first, last, r, rows, col);
            }
          }
        }
      }
    }
  }
}

}  // namespace

const GemmKernels* gemm_kernels_i8mm() {
  static const GemmKernels table{.gemm = &gemm_rowmajor<sdot16, 4>,
                                 .gemm_packed = &gemm_packed_mmla,
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
