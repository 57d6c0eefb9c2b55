// svd family, torch-free API: the batched SVD of many small matrices by
// one-sided (Hestenes) Jacobi. Randomized and rank-revealing SVDs are
// orchestrated in Python over torch's BLAS (see pykernels/ops/svd.py).
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

}  // namespace svd
}  // namespace pk
