// CPU sparse driver: checks, the transposed activation chunks the kernels
// read, threads split by stored values (not rows, so skewed rows balance),
// ISA choice per call.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../common/checks.h"
#include "../common/isa_pick.h"
#include "../common/parallel.h"
#include "../common/scratch.h"
#include "sparse.h"
#include "sparse_isa.h"

namespace pk {
namespace sparse {
namespace {

const Kernels* kernels() {
  static const IsaPick<Kernels> pick({.portable = &kernels_portable,
                                      .avx2 = PK_ISA_AVX2(&kernels_avx2),
                                      .avx512 = PK_ISA_AVX512(&kernels_avx512),
                                      .neon = PK_ISA_NEON(&kernels_neon)});
  return pick();
}

// Columns of M per chunk of transposed activations (the kernels' MC), for
// the rows of x still to do. AVX2: 8, 16 or 32, the smallest that holds
// what is left, so a short last chunk is not padded to 32, and at most 16
// for 4x4 blocks (sparse_avx2.cpp says why); a lone row takes the
// one-token path. Others: 16 when M <= 16, else 32 for every chunk.
int chunk_width(const Kernels* kern, const Matrix& w, int64_t m, int64_t left) {
#ifdef PK_HAVE_AVX2
  if (kern == kernels_avx2()) {
    const int widest = w.block == 1 ? 32 : 16;
    return left == 1 ? 1 : left <= 8 ? 8 : left <= 16 || widest == 16 ? 16 : 32;
  }
#else
  (void)kern;
  (void)w;
#endif
  (void)left;
  return m == 1 ? 1 : (m <= 16 ? 16 : 32);
}

// Scratch slot `slot` holding `count` floats, 64-byte aligned: malloc's 16
// bytes would split every other 32-byte load of a chunk row across two
// cache lines.
float* aligned_scratch(int slot, int64_t count) {
  float* p = scratch<float>(slot, count + 16);
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63));
}

int64_t stored_rows(const Matrix& w) { return w.block == 1 ? w.n : (w.n + kBlock - 1) / kBlock; }

// First row of part t of nt, cutting where the stored values are split evenly.
int64_t balanced_cut(const Matrix& w, int64_t rows, int t, int nt) {
  if (t <= 0) return 0;
  if (t >= nt) return rows;
  const int64_t target = w.row_ptr[rows] / nt * t;
  return std::lower_bound(w.row_ptr, w.row_ptr + rows + 1, target) - w.row_ptr;
}

// xt[c][i] = x[m0 + i][c] for i < mc, zero for mc <= i < mc_pad.
void transpose_chunk(const float* x, int64_t ldx, int64_t m0, int64_t mc, int64_t cols, int mc_pad,
                     float* xt, int nt) {
  parallel_for(0, (cols + 63) / 64, nt, [&](int64_t blk) {
    const int64_t c0 = blk * 64, c1 = std::min(cols, c0 + 64);
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t i = mc; i < mc_pad; ++i) xt[c * mc_pad + i] = 0.0f;
    for (int64_t i = 0; i < mc; ++i) {
      const float* xr = x + (m0 + i) * ldx;
      for (int64_t c = c0; c < c1; ++c) xt[c * mc_pad + i] = xr[c];
    }
  });
}

void check(const Matrix& w) {
  PK_CHECK_ARG(w.n >= 0 && w.k >= 0, "weight: negative shape");
  PK_CHECK_ARG(w.block == 1 || w.block == kBlock, "weight: block size must be 1 or ", kBlock);
  // A BSR index counts block columns, so 16 bits address 4 x 65536 columns.
  const int64_t kcols = w.block == 1 ? w.k : (w.k + kBlock - 1) / kBlock;
  PK_CHECK_ARG(!w.col16 || kcols <= 65536,
               "weight: 16-bit column indices address at most 65536 columns (block columns for "
               "BSR), got ",
               kcols);
  PK_CHECK_ARG(w.row_ptr, "weight: row_ptr must not be null");
}

}  // namespace

void linear_cpu(const Matrix& w, const float* x, int64_t m, int64_t ldx, const float* bias,
                float* y) {
  check(w);
  PK_CHECK_ARG(m >= 0, "x: negative number of rows");
  PK_CHECK_ARG(ldx >= w.k, "x: row stride ", ldx, " is smaller than K = ", w.k);
  if (m == 0 || w.n == 0) return;
  const Kernels* kern = kernels();
  const int64_t rows = stored_rows(w), nnz = w.row_ptr[rows];
  const int nt = std::max(1, int(std::min<int64_t>(threads_for(nnz * m + w.n, 1 << 16), rows)));
  const int widest = chunk_width(kern, w, m, m);  // the first chunk is the widest
  float* xt = widest == 1 ? nullptr : aligned_scratch(0, w.k * widest);
  for (int64_t m0 = 0, mc; m0 < m; m0 += mc) {
    const int mc_pad = chunk_width(kern, w, m, m - m0);
    mc = std::min<int64_t>(mc_pad, m - m0);
    const float* src = x + m0 * ldx;  // one token: its row is already contiguous
    if (mc_pad != 1) {
      transpose_chunk(x, ldx, m0, mc, w.k, mc_pad, xt, nt);
      src = xt;
    }
    parallel_for(0, nt, nt, [&](int t) {
      const int64_t r0 = balanced_cut(w, rows, t, nt), r1 = balanced_cut(w, rows, t + 1, nt);
      if (r0 < r1) kern->forward(w, src, mc_pad, mc, bias, y + m0 * w.n, w.n, r0, r1);
    });
  }
}

void linear_backward_cpu(const Matrix& w, const float* dy, const float* x, int64_t m, int64_t ldx,
                         float* dx, float* dvalues) {
  check(w);
  PK_CHECK_ARG(w.block == 1, "backward takes CSR; expand blocks first");
  PK_CHECK_ARG(m >= 0 && ldx >= w.k, "x: bad shape or row stride");
  const int64_t rows = w.n, nnz = w.row_ptr[rows];
  if (dvalues) std::memset(dvalues, 0, sizeof(float) * size_t(nnz));
  if (dx) std::memset(dx, 0, sizeof(float) * size_t(m * w.k));
  if (m == 0 || w.n == 0) return;
  const Kernels* kern = kernels();
  const int nt =
      std::max(1, int(std::min<int64_t>(threads_for(nnz * m + w.n + w.k, 1 << 16), rows)));
  const int widest = chunk_width(kern, w, m, m);  // the first chunk is the widest
  float* xt = aligned_scratch(0, w.k * widest);
  float* dyt = aligned_scratch(1, w.n * widest);
  // dx: each thread scatters its rows into a private K x mc_pad buffer; the
  // buffers are summed after (no two threads write one element).
  float* dxt = dx ? aligned_scratch(2, int64_t(nt) * w.k * widest) : nullptr;
  for (int64_t m0 = 0, mc; m0 < m; m0 += mc) {
    const int mc_pad = chunk_width(kern, w, m, m - m0);
    mc = std::min<int64_t>(mc_pad, m - m0);
    transpose_chunk(dy, w.n, m0, mc, w.n, mc_pad, dyt, nt);
    if (dvalues) transpose_chunk(x, ldx, m0, mc, w.k, mc_pad, xt, nt);
    parallel_for(0, nt, nt, [&](int t) {
      const int64_t r0 = balanced_cut(w, rows, t, nt), r1 = balanced_cut(w, rows, t + 1, nt);
      if (dvalues && r0 < r1) kern->sddmm(w, dyt, xt, mc_pad, dvalues, r0, r1);
      if (dx) {
        float* mine = dxt + int64_t(t) * w.k * mc_pad;
        std::memset(mine, 0, sizeof(float) * size_t(w.k * mc_pad));
        if (r0 < r1) kern->backward_x(w, dyt, mc_pad, mine, r0, r1);
      }
    });
    if (dx) {
      parallel_for(0, w.k, nt, [&](int64_t c) {
        for (int64_t i = 0; i < mc; ++i) {
          float s = 0.0f;
          for (int t = 0; t < nt; ++t) s += dxt[(int64_t(t) * w.k + c) * mc_pad + i];
          dx[(m0 + i) * w.k + c] = s;
        }
      });
    }
  }
}

}  // namespace sparse
}  // namespace pk
