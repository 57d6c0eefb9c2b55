// The cluster kernels written once in plain C++ and compiled per ISA file
// with that file's flags (the portable build uses all of it; the AVX2 and
// AVX-512 builds their own 4-bit kernel and this 8-bit one). Everything is
// in an anonymous namespace: each ISA file gets its own copy and no flagged
// copy can leak into another file.
#pragma once
#include <cstdint>

#include "cluster_isa.h"

namespace pk {
namespace cluster {
namespace {

// The code of w[., k] in one row of packed codes (layout in cluster.h).
template <int BITS>
inline unsigned code_at(const uint8_t* row, int64_t k) {
  if (BITS == 8) return row[k];
  const int64_t g = k / kGroup4, i = k % 16, j = (k % kGroup4) / 16;
  return (row[64 * g + 4 * i + j / 2] >> (4 * (j & 1))) & 15u;
}

// Output columns [n0, n1), four at a time: the four weight rows are decoded
// into `wf` (4 * k floats, in cache: never the whole weight), then each row
// of x is dotted with all four, so each load of x serves four rows.
template <int BITS>
void linear_generic(const Args& a, int64_t n0, int64_t n1, float* wf) {
  const int64_t k = a.k;
  for (int64_t j = n0; j < n1; j += 4) {
    const int nj = int(n1 - j < 4 ? n1 - j : 4);
    float* f[4] = {wf, wf + k, wf + 2 * k, wf + 3 * k};
    for (int t = 0; t < 4; ++t) {
      // Rows past n1 repeat row j (in bounds) and are never stored.
      const int64_t r = j + (t < nj ? t : 0);
      const uint8_t* cr = a.codes + r * a.code_ld;
      const float* cb = a.codebook + r * a.cb_ld;
      float tab[256];
      for (int c = 0; c < 256; ++c) tab[c] = c < a.nc ? cb[c] : 0.0f;
      float* ft = f[t];
      for (int64_t p = 0; p < k; ++p) ft[p] = tab[code_at<BITS>(cr, p)];
    }
    const float* f0 = f[0];
    const float* f1 = f[1];
    const float* f2 = f[2];
    const float* f3 = f[3];
    for (int64_t i = 0; i < a.m; ++i) {
      const float* xi = a.x + i * a.ldx;
      float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t p = 0; p < k; ++p) {
        s0 += xi[p] * f0[p];
        s1 += xi[p] * f1[p];
        s2 += xi[p] * f2[p];
        s3 += xi[p] * f3[p];
      }
      const float s[4] = {s0, s1, s2, s3};
      for (int t = 0; t < nj; ++t) a.y[i * a.n + j + t] = s[t] + (a.bias ? a.bias[j + t] : 0.0f);
    }
  }
}

}  // namespace
}  // namespace cluster
}  // namespace pk
