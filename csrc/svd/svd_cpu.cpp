// One-sided Jacobi SVD for many small matrices, one matrix per thread at a
// time. Rotations act on the columns of a (stored as rows of its transpose,
// so every dot product and update reads contiguous memory) until all pairs
// are orthogonal to a relative tolerance; the column norms are then the
// singular values. Accurate in relative terms, which LAPACK's bidiagonal
// path is not for small singular values, and free of per-matrix call costs.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "../common/checks.h"
#include "../common/isa_pick.h"
#include "../common/parallel.h"
#include "svd.h"
#include "svd_isa.h"

namespace pk {
namespace svd {
namespace {

constexpr double kTol = 1e-13;  // |u_p . u_q| <= kTol * |u_p| |u_q| counts as orthogonal
// A column a rotation leaves with a norm within kNoise * eps * sqrt(rows) of the
// pair's is rounding noise (the pair was parallel: a rank-deficient or constant
// matrix), and is set to zero. Left alone, its direction is random, so it is
// never orthogonal to the others to kTol and every sweep rotates it again: the
// iteration did not converge. Zeroing it changes the matrix by less than the
// rotation's own rounding error; its singular value is then 0 and its left
// vector is completed below.
constexpr double kNoise = 8.0;

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
  const double eps = std::numeric_limits<double>::epsilon();
  const double noise = (kNoise * eps) * (kNoise * eps) * double(rows);
  for (int sweep = 1; sweep <= kMaxSweeps; ++sweep) {
    // Norms refreshed once a sweep; within it the rotation updates them
    // exactly (alpha - t gamma, beta + t gamma), which saves two of the three
    // dot products per pair.
    for (int64_t j = 0; j < cols; ++j) norm2[j] = dot(&w[j * rows], &w[j * rows], rows);
    bool rotated = false;
    for (int64_t p = 0; p + 1 < cols; ++p)
      for (int64_t q = p + 1; q < cols; ++q) {
        const double alpha = norm2[p], beta = norm2[q];
        if (alpha == 0.0 || beta == 0.0) continue;
        const double gamma = dot(&w[p * rows], &w[q * rows], rows);
        // sqrt of each: their product can underflow for tiny columns.
        if (std::fabs(gamma) <= kTol * std::sqrt(alpha) * std::sqrt(beta)) continue;
        rotated = true;
        const double zeta = (beta - alpha) / (2.0 * gamma);
        // 1 + zeta^2 overflows for a tiny column against a large one, which
        // made t = 0, a rotation that did nothing, forever; past 1e150 the
        // root is |zeta| to double precision.
        const double az = std::fabs(zeta);
        const double t =
            std::copysign(1.0, zeta) / (az + (az < 1e150 ? std::sqrt(1.0 + az * az) : az));
        const double c = 1.0 / std::sqrt(1.0 + t * t), sn = c * t;
        rotate(&w[p * rows], &w[q * rows], rows, c, sn);
        rotate(&v[p * cols], &v[q * cols], cols, c, sn);
        double np = alpha - t * gamma, nq = beta + t * gamma;
        // The updates cancel when a norm drops a lot: recompute it then.
        if (np < 0.25 * alpha) np = dot(&w[p * rows], &w[p * rows], rows);
        if (nq < 0.25 * beta) nq = dot(&w[q * rows], &w[q * rows], rows);
        const double floor = noise * (alpha + beta);
        if (np <= floor) {
          std::fill(&w[p * rows], &w[p * rows] + rows, 0.0);
          np = 0.0;
        }
        if (nq <= floor) {
          std::fill(&w[q * rows], &w[q * rows] + rows, 0.0);
          nq = 0.0;
        }
        norm2[p] = np;
        norm2[q] = nq;
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
      // completed to an orthonormal set by Gram-Schmidt on the unit vector
      // the columns so far cover least: its part outside them has norm^2
      // 1 - sum_q left[q][e]^2, at least (rows - r) / rows for the best e,
      // so two passes leave it orthogonal. (A fixed bar on that norm failed
      // once most of the space was taken: many zero singular values.)
      std::vector<double> left(static_cast<size_t>(rows * cols));
      for (int64_t r = 0; r < cols; ++r) {
        const int64_t j = order[r];
        double* dst = &left[r * rows];
        if (sv[j] > 0.0) {
          for (int64_t i = 0; i < rows; ++i) dst[i] = w[j * rows + i] / sv[j];
          continue;
        }
        int64_t best = 0;
        double best_rest = -1.0;
        for (int64_t e = 0; e < rows; ++e) {
          double rest = 1.0;
          for (int64_t q = 0; q < r; ++q) rest -= left[q * rows + e] * left[q * rows + e];
          if (rest > best_rest) {
            best = e;
            best_rest = rest;
          }
        }
        for (int64_t i = 0; i < rows; ++i) dst[i] = i == best ? 1.0 : 0.0;
        for (int pass = 0; pass < 2; ++pass)
          for (int64_t q = 0; q < r; ++q) {
            const double d = dot(&left[q * rows], dst, rows);
            for (int64_t i = 0; i < rows; ++i) dst[i] -= d * left[q * rows + i];
          }
        const double nn = std::sqrt(dot(dst, dst, rows));
        for (int64_t i = 0; i < rows; ++i) dst[i] /= nn;
      }
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

namespace {

const Kernels* pass_kernels() {
  static const IsaPick<Kernels> pick({.portable = &kernels_portable,
                                      .avx2 = PK_ISA_AVX2(&kernels_avx2),
                                      .avx512 = PK_ISA_AVX512(&kernels_avx512),
                                      .neon = PK_ISA_NEON(&kernels_neon)});
  return pick();
}

void check_pass(const float* a, int64_t m, int64_t n, int64_t lda, const float* q, int64_t w,
                const float* y, int64_t ldy, int64_t y_cols) {
  PK_CHECK_ARG(m >= 0 && n >= 0 && w >= 0, "a, q: sizes must be >= 0");
  PK_CHECK_ARG(lda >= n, "a: row stride ", lda, " < ", n, " columns");
  PK_CHECK_ARG(ldy >= y_cols, "y: row stride ", ldy, " < ", y_cols, " columns");
  PK_CHECK_ARG((a || m * n == 0) && (q || w == 0) && (y || w * y_cols == 0),
               "a, q, y: null buffer");
}

// Threads for a pass over [0, len) in tiles: at most one per tile, and each
// with 2^18 multiply-adds or more (a wake-up costs about a 64 x 64 product).
int pass_threads(int64_t len, int64_t tile, int64_t other, int64_t w) {
  const int64_t tiles = (len + tile - 1) / tile;
  return int(std::min<int64_t>(threads_for(len * other * w, int64_t(1) << 18), tiles));
}

}  // namespace

void dot_rows_cpu(const float* a, int64_t m, int64_t n, int64_t lda, const float* q, int64_t w,
                  int64_t ldq, float* y, int64_t ldy) {
  check_pass(a, m, n, lda, q, w, y, ldy, m);
  PK_CHECK_ARG(ldq >= n, "q: row stride ", ldq, " < ", n, " columns");
  if (m == 0 || w == 0) return;
  const Kernels* k = pass_kernels();
  const Pass p{a, m, n, lda, w, q, ldq, y, ldy};
  const int nt = pass_threads(m, k->row_tile, n, w);
  parallel(nt, [&](int t) {
    int64_t i0, i1;
    split_range(m, nt, t, k->row_tile, &i0, &i1);
    if (i1 > i0) k->dot_rows(p, i0, i1);
  });
}

void combine_rows_cpu(const float* a, int64_t m, int64_t n, int64_t lda, const float* kt, int64_t w,
                      int64_t ldkt, float* y, int64_t ldy) {
  check_pass(a, m, n, lda, kt, w, y, ldy, n);
  PK_CHECK_ARG(ldkt >= w, "kt: row stride ", ldkt, " < ", w, " columns");
  if (w == 0 || n == 0) return;
  if (m == 0) {
    for (int64_t j = 0; j < w; ++j) std::fill(y + j * ldy, y + j * ldy + n, 0.0f);
    return;
  }
  const Kernels* k = pass_kernels();
  const Pass p{a, m, n, lda, w, kt, ldkt, y, ldy};
  // Threads take whole column strips, so no two write the same output.
  const int nt = pass_threads(n, k->col_tile, m, w);
  parallel(nt, [&](int t) {
    int64_t c0, c1;
    split_range(n, nt, t, k->col_tile, &c0, &c1);
    if (c1 > c0) k->combine_rows(p, c0, c1);
  });
}

}  // namespace svd
}  // namespace pk
