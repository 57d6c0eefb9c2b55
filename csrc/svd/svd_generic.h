// The Krylov-pass kernels (svd_isa.h), written once over a vector type V and
// compiled per ISA file with its flags. V supplies: kLanes, reg, zero(),
// load(p), load_part(p, lanes), store_part(p, v, lanes), fma(a, b, c) = a*b+c,
// set1(x), sum(v). Register tiles: dot_rows keeps R rows of a by J rows of q
// in R * J accumulators; combine_rows keeps C vectors of a row of a by J
// outputs in J * C. Anonymous namespace: each ISA file gets its own copy.
#pragma once
#include <cstdint>

#include "svd_isa.h"

namespace pk {
namespace svd {
namespace {

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// R rows of a (r of them real) against J rows of q (jn real): the R x J dot
// products over the whole length n. Full tiles run an unmasked loop; the
// ragged edges of a and q take the masked one, reading zeros past them.
template <class V, int R, int J>
void dot_tile(const Pass& p, int64_t i0, int r, int64_t j0, int jn) {
  using Reg = typename V::reg;
  Reg acc[R][J];
  for (int x = 0; x < R; ++x)
    for (int z = 0; z < J; ++z) acc[x][z] = V::zero();
  const float* ar[R];
  const float* qr[J];
  for (int x = 0; x < R; ++x) ar[x] = p.a + (i0 + (x < r ? x : 0)) * p.lda;
  for (int z = 0; z < J; ++z) qr[z] = p.q + (j0 + (z < jn ? z : 0)) * p.ldq;
  int64_t k = 0;
  const int64_t n = p.n;
  if (r == R && jn == J) {
    for (; k + V::kLanes <= n; k += V::kLanes) {
      Reg av[R];
      for (int x = 0; x < R; ++x) av[x] = V::load(ar[x] + k);
      for (int z = 0; z < J; ++z) {
        const Reg qv = V::load(qr[z] + k);
        for (int x = 0; x < R; ++x) acc[x][z] = V::fma(av[x], qv, acc[x][z]);
      }
    }
  }
  for (; k < n; k += V::kLanes) {
    const int lanes = int(min64(V::kLanes, n - k));
    Reg av[R];
    for (int x = 0; x < R; ++x) av[x] = x < r ? V::load_part(ar[x] + k, lanes) : V::zero();
    for (int z = 0; z < jn; ++z) {
      const Reg qv = V::load_part(qr[z] + k, lanes);
      for (int x = 0; x < R; ++x) acc[x][z] = V::fma(av[x], qv, acc[x][z]);
    }
  }
  for (int z = 0; z < jn; ++z)
    for (int x = 0; x < r; ++x) p.y[(j0 + z) * p.ldy + i0 + x] = V::sum(acc[x][z]);
}

template <class V, int R, int J>
void dot_rows_generic(const Pass& p, int64_t i0, int64_t i1) {
  // q's rows stay in L2 (w x n floats, 320 KB at 20 x 4096) while R rows of a
  // are reused from L1 by every tile of J rows of q.
  for (int64_t i = i0; i < i1; i += R) {
    const int r = int(min64(R, i1 - i));
    for (int64_t j = 0; j < p.w; j += J) dot_tile<V, R, J>(p, i, r, j, int(min64(J, p.w - j)));
  }
}

// Columns [c0, c0 + C * kLanes) of outputs j0..j0+jn over rows [i0, i1) of a,
// added to what the earlier row chunks left in y (zero for the first).
template <class V, int C, int J>
void combine_tile(const Pass& p, int64_t c0, int64_t i0, int64_t i1, int64_t j0, int jn) {
  using Reg = typename V::reg;
  int lanes[C];
  bool full = jn == J;
  for (int c = 0; c < C; ++c) {
    const int64_t left = p.n - c0 - int64_t(c) * V::kLanes;
    lanes[c] = left >= V::kLanes ? V::kLanes : left > 0 ? int(left) : 0;
    full = full && lanes[c] == V::kLanes;
  }
  Reg acc[J][C];
  for (int z = 0; z < J; ++z)
    for (int c = 0; c < C; ++c)
      acc[z][c] = i0 == 0 || z >= jn
                      ? V::zero()
                      : V::load_part(p.y + (j0 + z) * p.ldy + c0 + c * V::kLanes, lanes[c]);
  if (full) {
    for (int64_t i = i0; i < i1; ++i) {
      const float* ai = p.a + i * p.lda + c0;
      const float* qi = p.q + i * p.ldq + j0;
      Reg av[C];
      for (int c = 0; c < C; ++c) av[c] = V::load(ai + c * V::kLanes);
      for (int z = 0; z < J; ++z) {
        const Reg kv = V::set1(qi[z]);
        for (int c = 0; c < C; ++c) acc[z][c] = V::fma(av[c], kv, acc[z][c]);
      }
    }
  } else {
    for (int64_t i = i0; i < i1; ++i) {
      const float* ai = p.a + i * p.lda + c0;
      const float* qi = p.q + i * p.ldq + j0;
      Reg av[C];
      for (int c = 0; c < C; ++c) av[c] = V::load_part(ai + c * V::kLanes, lanes[c]);
      for (int z = 0; z < jn; ++z) {
        const Reg kv = V::set1(qi[z]);
        for (int c = 0; c < C; ++c) acc[z][c] = V::fma(av[c], kv, acc[z][c]);
      }
    }
  }
  for (int z = 0; z < jn; ++z)
    for (int c = 0; c < C; ++c)
      V::store_part(p.y + (j0 + z) * p.ldy + c0 + c * V::kLanes, acc[z][c], lanes[c]);
}

template <class V, int C, int J>
void combine_rows_generic(const Pass& p, int64_t c0, int64_t c1) {
  constexpr int64_t kStrip = int64_t(C) * V::kLanes;
  constexpr int64_t kRows = 64;
  // Blocks of columns whose outputs (w rows) and a chunk of kRows rows of a
  // fit in about 512 KB of L2 together: the outputs then stay there while
  // the chunks go by (reloading them from L3 for every chunk made wide
  // blocks 1.4x slower at w = 64), and each chunk, read once from memory,
  // serves every tile of J outputs. A chunk's output tiles are loaded and
  // stored once per kRows rows.
  const int64_t fit = (512 * 1024 / int64_t(sizeof(float))) / (kRows + p.w);
  const int64_t block = fit < kStrip ? kStrip : fit / kStrip * kStrip;
  for (int64_t b0 = c0; b0 < c1; b0 += block) {
    const int64_t b1 = min64(c1, b0 + block);
    for (int64_t i0 = 0; i0 < p.m; i0 += kRows) {
      const int64_t i1 = min64(p.m, i0 + kRows);
      for (int64_t c = b0; c < b1; c += kStrip)
        for (int64_t j = 0; j < p.w; j += J)
          combine_tile<V, C, J>(p, c, i0, i1, j, int(min64(J, p.w - j)));
    }
  }
}

}  // namespace
}  // namespace svd
}  // namespace pk
