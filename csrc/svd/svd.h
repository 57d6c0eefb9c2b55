// svd family, torch-free API: the batched SVD of many small matrices by
// one-sided (Hestenes) Jacobi, and the two products with the big matrix that
// a randomized (block Krylov) SVD repeats. The randomized and rank-revealing
// SVDs are orchestrated in Python (see pykernels/ops/svd.py).
#pragma once
#include <cstdint>

namespace pk {
namespace svd {

// Jacobi sweeps at most; each sweep rotates every column pair once.
constexpr int kMaxSweeps = 60;

// For each of `batch` row-major m x n matrices a (float or double, chosen by
// the overload): a = u diag(s) vh with k = min(m, n), u [m, k] and vh [k, n]
// orthonormal, s descending and >= 0. Computed in double. Returns the most
// sweeps any matrix needed (kMaxSweeps + 1 if one did not converge).
int batched_svd_cpu(const float* a, int64_t batch, int64_t m, int64_t n, float* u, float* s,
                    float* vh);
int batched_svd_cpu(const double* a, int64_t batch, int64_t m, int64_t n, double* u, double* s,
                    double* vh);

// The Krylov passes, on a row-major float32 a [m, n] with row stride lda
// (>= n), each reading a once without packing it (svd_isa.h), on up to
// max_threads() threads. dot_rows: y [w, m] = q [w, n] a^T (q's row stride ldq,
// y's ldy). combine_rows: y [w, n] = k a with kt = k^T [m, w] (row stride
// ldkt), y's row stride ldy. y = 0 for m = 0.
void dot_rows_cpu(const float* a, int64_t m, int64_t n, int64_t lda, const float* q, int64_t w,
                  int64_t ldq, float* y, int64_t ldy);
void combine_rows_cpu(const float* a, int64_t m, int64_t n, int64_t lda, const float* kt, int64_t w,
                      int64_t ldkt, float* y, int64_t ldy);

}  // namespace svd
}  // namespace pk
