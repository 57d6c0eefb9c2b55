// Per-ISA kernels of the svd family: the two products of a randomized
// (block Krylov) SVD with the big matrix, compiled once per instruction set
// (see topk_isa.h for why nothing here touches the standard library).
#pragma once
#include <cstdint>

namespace pk {
namespace svd {

// One product with a row-major float matrix a [m, n] (row stride lda) and a
// block of w vectors. Both read a once, unpacked: a BLAS packs a into
// panels first, which for w of 8-80 costs as much as the product.
struct Pass {
  const float* a;
  int64_t m, n, lda;
  int64_t w;
  // dot_rows: q [w, n] (row stride ldq), y [w, m] (row stride ldy).
  // combine_rows: q = k^T [m, w] (row stride ldq), y [w, n] (row stride ldy).
  const float* q;
  int64_t ldq;
  float* y;
  int64_t ldy;
};

struct Kernels {
  // y[j, i] = sum_k q[j, k] * a[i, k] for rows i in [i0, i1) of a.
  void (*dot_rows)(const Pass& p, int64_t i0, int64_t i1);
  // y[j, c] = sum_i q[i, j] * a[i, c] for columns c in [c0, c1) of a.
  void (*combine_rows)(const Pass& p, int64_t c0, int64_t c1);
  // Alignment of the ranges a thread should get (a tile's rows / columns).
  int64_t row_tile, col_tile;
};

const Kernels* kernels_portable();
const Kernels* kernels_avx2();
const Kernels* kernels_avx512();
const Kernels* kernels_neon();

}  // namespace svd
}  // namespace pk
