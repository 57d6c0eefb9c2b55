// The cluster kernels written once in plain C++ and compiled per ISA file
// with that file's flags (the portable build uses all of it; the AVX2 and
// AVX-512 builds their own 4-bit kernel and this 8-bit one). Everything is
// in an anonymous namespace: each ISA file gets its own copy and no flagged
// copy can leak into another file.
#pragma once
#include <cstdint>

#include "../common/dot4.h"
#include "cluster_isa.h"

namespace pk {
namespace cluster {
namespace {

// Rows [0, m) in tiles of MR rows and the rest in one smaller tile:
// tile(Rows<R>(), i) for each, R the tile's rows as a constant.
template <int R>
struct Rows {
  static constexpr int value = R;
};

template <int R, class F>
inline void last_tile(int64_t left, int64_t i, F& tile) {
  if (left == R)
    tile(Rows<R>(), i);
  else if constexpr (R > 1)
    last_tile<R - 1>(left, i, tile);
}

template <int MR, class F>
inline void row_tiles(int64_t m, F&& tile) {
  int64_t i = 0;
  for (; i + MR <= m; i += MR) tile(Rows<MR>(), i);
  if (i < m) last_tile<MR - 1>(m - i, i, tile);
}

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
    for (int64_t i = 0; i < a.m; ++i) {
      float s[4];
      dot4(a.x + i * a.ldx, f[0], f[1], f[2], f[3], k, s);
      for (int t = 0; t < nj; ++t) a.y[i * a.n + j + t] = s[t] + (a.bias ? a.bias[j + t] : 0.0f);
    }
  }
}

// Dynamic mode: four weight rows decoded to int8 in the activations' order
// (for 4-bit codes a code byte's low nibble goes to the first 64 bytes of
// its group, its high nibble to the last 64: dynamic_x_pos4), then int8 dot
// products, exact in int32.
template <int BITS>
void dynamic_generic(const DynArgs& a, int64_t n0, int64_t n1, int8_t* wq) {
  const int64_t len = a.kq;
  for (int64_t j = n0; j < n1; j += 4) {
    const int nj = int(n1 - j < 4 ? n1 - j : 4);
    int8_t* w[4] = {wq, wq + len, wq + 2 * len, wq + 3 * len};
    for (int t = 0; t < 4; ++t) {
      const int64_t r = j + (t < nj ? t : 0);
      const uint8_t* cr = a.codes + r * a.code_ld;
      const int8_t* tab = a.cq + r * a.cq_ld;
      int8_t* wt = w[t];
      if (BITS == 8) {
        for (int64_t p = 0; p < len; ++p) wt[p] = tab[cr[p]];
      } else {
        for (int64_t g = 0; g < len / kGroup4; ++g)
          for (int b = 0; b < 64; ++b) {
            const uint8_t v = cr[64 * g + b];
            wt[kGroup4 * g + b] = tab[v & 15];
            wt[kGroup4 * g + 64 + b] = tab[v >> 4];
          }
      }
    }
    for (int64_t i = 0; i < a.m; ++i) {
      int32_t s[4];
      dot4(a.xq + i * a.ldq, w[0], w[1], w[2], w[3], len, s);
      for (int t = 0; t < nj; ++t) {
        float v = float(s[t]) * (a.xs[i] * a.cs[(j + t) * a.cs_ld]);
        if (a.bias) v += a.bias[j + t];
        a.y[i * a.n + j + t] = v;
      }
    }
  }
}

// Plain loops the compiler vectorises with the file's flags
// (__builtin_nearbyintf becomes one rounding instruction from SSE4.1 on).
[[maybe_unused]] void quantize_generic(const float* src, int64_t ld, int64_t len, int8_t* dst,
                                       int64_t ldd, bool perm4, float* scale, int32_t* sum,
                                       int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = src + r * ld;
    int8_t* qr = dst + r * ldd;
    float amax = 0.0f;
    int nan = 0;
    for (int64_t c = 0; c < len; ++c) {
      const float v = xr[c] < 0.0f ? -xr[c] : xr[c];
      nan |= xr[c] != xr[c];
      amax = amax < v ? v : amax;
    }
    const float s = nan ? __builtin_nanf("") : amax / 127.0f;
    scale[r] = s;
    const bool usable = s > 0.0f && s <= 3.4028234663852886e38f;  // not 0, NaN or inf
    int32_t total = 0;
    for (int64_t c = 0; c < len; ++c) {
      float v = usable ? __builtin_nearbyintf(xr[c] / s) : 0.0f;  // round half to even
      v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
      qr[c] = int8_t(int32_t(v));
      total += int32_t(v);
    }
    for (int64_t c = len; c < ldd; ++c) qr[c] = 0;
    if (sum) sum[r] = total;
    if (perm4) {
      for (int64_t g = 0; g < ldd / kGroup4; ++g) {  // natural order -> dynamic_x_pos4
        int8_t tmp[kGroup4];
        int8_t* q = qr + kGroup4 * g;
        for (int t = 0; t < kGroup4; ++t) tmp[t] = q[t];
        for (int t = 0; t < kGroup4; ++t) q[dynamic_x_pos4(t)] = tmp[t];
      }
    }
  }
}

}  // namespace
}  // namespace cluster
}  // namespace pk
