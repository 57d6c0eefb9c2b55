// One-sided Jacobi SVD for many small matrices, one matrix per thread at a
// time. Rotations act on the columns of a (stored as rows of its transpose,
// so every dot product and update reads contiguous memory) until all pairs
// are orthogonal to a relative tolerance; the column norms are then the
// singular values. Accurate in relative terms, which LAPACK's bidiagonal
// path is not for small singular values, and free of per-matrix call costs.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <numeric>
#include <vector>

#include "../common/checks.h"
#include "../common/parallel.h"
#include "svd.h"

namespace pk {
namespace svd {
namespace {

constexpr double kTol = 1e-13;  // |u_p . u_q| <= kTol * |u_p| |u_q| counts as orthogonal

double dot(const double* x, const double* y, int64_t len) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < len; ++i) s += x[i] * y[i];
  return s;
}

void rotate(double* x, double* y, int64_t len, double c, double sn) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const double a = x[i], b = y[i];
    x[i] = c * a - sn * b;
    y[i] = sn * a + c * b;
  }
}

// One tall matrix (rows >= cols), given as cols x rows (w[j] = column j).
// On return w holds u * s by column, v (cols x cols, v[j] = column j of V).
int jacobi(std::vector<double>& w, std::vector<double>& v, int64_t rows, int64_t cols) {
  for (int64_t j = 0; j < cols; ++j)
    for (int64_t i = 0; i < cols; ++i) v[j * cols + i] = i == j ? 1.0 : 0.0;
  std::vector<double> norm2(static_cast<size_t>(cols));
  for (int sweep = 1; sweep <= kMaxSweeps; ++sweep) {
    // Norms refreshed once a sweep; within it the rotation updates them
    // exactly (alpha - t gamma, beta + t gamma), which saves two of the three
    // dot products per pair.
    for (int64_t j = 0; j < cols; ++j) norm2[j] = dot(&w[j * rows], &w[j * rows], rows);
    bool rotated = false;
    for (int64_t p = 0; p + 1 < cols; ++p)
      for (int64_t q = p + 1; q < cols; ++q) {
        const double alpha = norm2[p], beta = norm2[q];
        const double gamma = dot(&w[p * rows], &w[q * rows], rows);
        if (alpha == 0.0 || beta == 0.0 || std::fabs(gamma) <= kTol * std::sqrt(alpha * beta))
          continue;
        rotated = true;
        const double zeta = (beta - alpha) / (2.0 * gamma);
        const double t =
            std::copysign(1.0, zeta) / (std::fabs(zeta) + std::sqrt(1.0 + zeta * zeta));
        const double c = 1.0 / std::sqrt(1.0 + t * t), sn = c * t;
        rotate(&w[p * rows], &w[q * rows], rows, c, sn);
        rotate(&v[p * cols], &v[q * cols], cols, c, sn);
        norm2[p] = std::max(0.0, alpha - t * gamma);
        norm2[q] = beta + t * gamma;
      }
    if (!rotated) return sweep;
  }
  return kMaxSweeps + 1;
}

template <class T>
int run(const T* a, int64_t batch, int64_t m, int64_t n, T* u, T* s, T* vh) {
  PK_CHECK_ARG(batch >= 0 && m >= 0 && n >= 0, "a: negative shape");
  const int64_t k = std::min(m, n);
  if (batch == 0 || k == 0) return 0;
  PK_CHECK_ARG(a && u && s && vh, "a, u, s and vh must not be null");
  // Work on the tall orientation: columns of the tall matrix are rotated.
  const bool wide = m < n;
  const int64_t rows = wide ? n : m, cols = k;
  int worst = 0;
  const int nt = std::max(1, int(std::min<int64_t>(max_threads(), batch)));
  // Matrices go to whichever thread is free (they converge in different
  // numbers of sweeps); each thread keeps its own buffers and worst count.
  std::atomic<int64_t> next{0};
  std::vector<int> worst_of(size_t(nt), 0);
  parallel(nt, [&](int t) {
    std::vector<double> w(static_cast<size_t>(rows * cols)), v(static_cast<size_t>(cols * cols));
    std::vector<int64_t> order(static_cast<size_t>(cols));
    int mine = 0;
    for (int64_t b = next++; b < batch; b = next++) {
      const T* ab = a + b * m * n;
      // w[j] = column j of the tall matrix: a[:, j] (tall) or a[j, :] (wide).
      for (int64_t j = 0; j < cols; ++j)
        for (int64_t i = 0; i < rows; ++i)
          w[j * rows + i] = double(wide ? ab[j * n + i] : ab[i * n + j]);
      mine = std::max(mine, jacobi(w, v, rows, cols));
      std::vector<double> sv(static_cast<size_t>(cols));
      for (int64_t j = 0; j < cols; ++j) sv[j] = std::sqrt(dot(&w[j * rows], &w[j * rows], rows));
      std::iota(order.begin(), order.end(), int64_t(0));
      std::stable_sort(order.begin(), order.end(),
                       [&](int64_t x, int64_t y) { return sv[x] > sv[y]; });
      // Left vectors of the tall matrix: w[j] / s_j; zero columns are
      // completed to an orthonormal set by Gram-Schmidt on unit vectors.
      std::vector<double> left(static_cast<size_t>(rows * cols));
      int64_t filled = 0;
      for (int64_t r = 0; r < cols; ++r) {
        const int64_t j = order[r];
        double* dst = &left[r * rows];
        if (sv[j] > 0.0) {
          for (int64_t i = 0; i < rows; ++i) dst[i] = w[j * rows + i] / sv[j];
          ++filled;
        } else {
          for (int64_t e = 0; e < rows; ++e) {
            for (int64_t i = 0; i < rows; ++i) dst[i] = i == e ? 1.0 : 0.0;
            for (int pass = 0; pass < 2; ++pass)
              for (int64_t q = 0; q < r; ++q) {
                const double d = dot(&left[q * rows], dst, rows);
                for (int64_t i = 0; i < rows; ++i) dst[i] -= d * left[q * rows + i];
              }
            const double nn = std::sqrt(dot(dst, dst, rows));
            if (nn > 0.5) {
              for (int64_t i = 0; i < rows; ++i) dst[i] /= nn;
              break;
            }
          }
        }
      }
      (void)filled;
      T* ub = u + b * m * k;
      T* vb = vh + b * k * n;
      T* sb = s + b * k;
      for (int64_t r = 0; r < cols; ++r) {
        const int64_t j = order[r];
        sb[r] = T(sv[j]);
        if (!wide) {  // a = L S V^T: u = L [m, k], vh = V^T [k, n]
          for (int64_t i = 0; i < m; ++i) ub[i * k + r] = T(left[r * rows + i]);
          for (int64_t i = 0; i < n; ++i) vb[r * n + i] = T(v[j * cols + i]);
        } else {  // a^T = L S V^T, so a = V S L^T: u = V [m, k], vh = L^T [k, n]
          for (int64_t i = 0; i < m; ++i) ub[i * k + r] = T(v[j * cols + i]);
          for (int64_t i = 0; i < n; ++i) vb[r * n + i] = T(left[r * rows + i]);
        }
      }
    }
    worst_of[size_t(t)] = mine;
  });
  for (int m_ : worst_of) worst = std::max(worst, m_);
  return worst;
}

}  // namespace

int batched_svd_cpu(const float* a, int64_t batch, int64_t m, int64_t n, float* u, float* s,
                    float* vh) {
  return run(a, batch, m, n, u, s, vh);
}
int batched_svd_cpu(const double* a, int64_t batch, int64_t m, int64_t n, double* u, double* s,
                    double* vh) {
  return run(a, batch, m, n, u, s, vh);
}

}  // namespace svd
}  // namespace pk
