// The SDOT int8 kernels (Armv8.2-A dot product), shared by int8_dotprod.cpp
// and int8_i8mm.cpp (which keeps them for the row counts too small to repay
// its SMMLA repacking). Anonymous namespace: each file its own copy.
//
// The packed layout (int8.h) is already SDOT's: a group's 16-byte vector t
// is four channels x 4 consecutive k, and SDOT's by-element form adds, to
// each int32 lane j, the dot product of lane j's four bytes with one chosen
// 4-byte lane of a second vector. One 16-byte load of an activation row
// holds four groups' worth of k, lanes 0..3: no broadcast, no shuffle, one
// instruction per 16 MACs, signed x signed and exact (the driver keeps the
// activations in [-127, 127]; -128 would be exact too).
#pragma once
#ifndef __ARM_FEATURE_DOTPROD
#error "int8_sdot.h needs the dot product extension (-march=...+dotprod)"
#endif
#include "int8_arm.h"

namespace pk {
namespace int8 {
namespace {

// ---- Packed GEMM ----------------------------------------------------------
// Group L of four (the activation lanes L) against NV panels' vectors.
// Forced inline and fully unrolled: the accumulators must become 16 named
// registers, which GCC makes of an array only when every index is constant.
template <int MR, int NV, int L>
[[gnu::always_inline]] inline void sdot_group(int32x4_t (&acc)[MR][4 * NV],
                                              const int8x16_t (&av)[MR], const int8_t* bq,
                                              int64_t gs) {
#pragma GCC unroll 16
  for (int j = 0; j < NV; ++j)
#pragma GCC unroll 16
    for (int t = 0; t < 4; ++t) {
      const int8x16_t w = vld1q_s8(bq + L * gs + 64 * j + 16 * t);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i)
        acc[i][4 * j + t] = vdotq_laneq_s32(acc[i][4 * j + t], w, av[i], L);
    }
}

// An MR x 16*NV register tile over the whole of K, MR * NV <= 4: 4 x 16 for
// many rows (16 accumulators, four activation rows, four weight vectors: 64
// SDOT per 20 loads each step of four groups), 1 x 64 for a single row (a
// whole block of four panels per pass: its 256 bytes per group are
// contiguous). Not inlined, so that each tile's loop is compiled on its own
// (and can be found in the assembly, benchmarks/arm_mca.sh).
template <int MR, int NV>
[[gnu::noinline]] void sdot_tile(const PackedGemm& g, int64_t i0, int64_t p0) {
  static_assert(MR >= 1 && NV >= 1 && MR * NV <= 4, "tile size");
  int32x4_t acc[MR][4 * NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int t = 0; t < 4 * NV; ++t) acc[i][t] = vdupq_n_s32(0);
  int64_t gs;
  const int8_t* b = panel_base(g.b, g.kp, packed_n(g.n), p0, &gs);
  const int8_t* a = reinterpret_cast<const int8_t*>(g.a) + i0 * g.lda;
  const int64_t lda = g.lda, groups = g.kp / 4, g4 = groups / 4 * 4;
  for (int64_t q = 0; q < g4; q += 4) {
    const int8_t* bq = b + q * gs;
    int8x16_t av[MR];
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) av[i] = vld1q_s8(a + i * lda + 4 * q);
    sdot_group<MR, NV, 0>(acc, av, bq, gs);
    sdot_group<MR, NV, 1>(acc, av, bq, gs);
    sdot_group<MR, NV, 2>(acc, av, bq, gs);
    sdot_group<MR, NV, 3>(acc, av, bq, gs);
  }
  // The last 1..3 groups: a row's bytes end at kp (or a little later), so
  // they are read four at a time, into lane 0.
  for (int64_t q = g4; q < groups; ++q) {
    const int8_t* bq = b + q * gs;
    int8x16_t av[MR];
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      int32_t v;
      __builtin_memcpy(&v, a + i * lda + 4 * q, 4);
      av[i] = vreinterpretq_s8_s32(vdupq_n_s32(v));
    }
    sdot_group<MR, NV, 0>(acc, av, bq, gs);
  }
#pragma GCC unroll 16
  for (int j = 0; j < NV; ++j) store_rows<MR>(g, i0, (p0 + j) * 16, &acc[0][4 * j], 4 * NV);
}

// Rows [i, i + r), r < 4, against panels [p0, p1): the widest tile that r
// rows allow, so each activation load serves as many panels as it can.
void sdot_tail_rows(const PackedGemm& g, int64_t i, int64_t r, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1;) {
    const int64_t left = p1 - p;
    if (r == 3) {
      sdot_tile<3, 1>(g, i, p);
      p += 1;
    } else if (r == 2) {
      if (left >= 2) {
        sdot_tile<2, 2>(g, i, p);
        p += 2;
      } else {
        sdot_tile<2, 1>(g, i, p);
        p += 1;
      }
    } else {
      switch (left < 4 ? left : 4) {
        case 4:
          sdot_tile<1, 4>(g, i, p);
          break;
        case 3:
          sdot_tile<1, 3>(g, i, p);
          break;
        case 2:
          sdot_tile<1, 2>(g, i, p);
          break;
        default:
          sdot_tile<1, 1>(g, i, p);
      }
      p += left < 4 ? left : 4;
    }
  }
}

void gemm_packed_sdot(const PackedGemm& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  // Rows in chunks of about 192 KiB of activations, each swept against every
  // panel of the block while it sits in L2, rather than every row per panel
  // from further out.
  const int64_t chunk = (196608 / g.lda + 3) / 4 * 4;
  for (int64_t c0 = m0; c0 < m1; c0 += chunk) {
    const int64_t c1 = m1 - c0 < chunk ? m1 : c0 + chunk;
    const int64_t full = c0 + (c1 - c0) / 4 * 4;
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t i = c0; i < full; i += 4) sdot_tile<4, 1>(g, i, p);
    if (full < c1) sdot_tail_rows(g, full, c1 - full, p0, p1);
  }
}

// ---- Row-major operands (int8_gemm with few rows of a) ----------------------
// SDOT's plain form: each int32 lane of acc gathers four byte products of the
// same k positions, 16 MACs per instruction; ADDV sums the lanes at the end.
inline int32x4_t sdot16(int32x4_t acc, int8x16_t a, int8x16_t b) { return vdotq_s32(acc, a, b); }

}  // namespace
}  // namespace int8
}  // namespace pk
