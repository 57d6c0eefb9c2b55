// AVX2 sparse kernels, tuned on Zen 3 (16 ymm registers, two FMA pipes of
// latency 4, two 256-bit loads a cycle). GCC leaves the generic loops scalar
// over M, so the hot paths are intrinsics. With M >= 2 each stored value
// reads a row of the transposed chunk (K x MC floats, far past L1), so L2
// bandwidth, not the FMAs, bounds them; blocking K to keep the chunk in L1
// measured slower (the per-row segment bookkeeping costs more than the reuse).
#include <immintrin.h>

#include "sparse_generic.h"

namespace pk {
namespace sparse {
namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One token: y[row] = sum_j v[j] * x[col[j]]. The eight x values of a
// vector are loaded one by one and inserted: on Zen 3 that measured 1.6x
// faster than vgatherdps (and 1.3x faster than scalar FMAs) at 90%
// sparsity, N = K = 4096. Four vectors in flight.
template <class Col>
void csr_rows_1(const Matrix& w, const Col* col, const float* x, const float* bias, float* y,
                int64_t r0, int64_t r1) {
  auto gather8 = [&](int64_t j) {
    return _mm256_setr_ps(x[col[j]], x[col[j + 1]], x[col[j + 2]], x[col[j + 3]], x[col[j + 4]],
                          x[col[j + 5]], x[col[j + 6]], x[col[j + 7]]);
  };
  for (int64_t r = r0; r < r1; ++r) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t j = w.row_ptr[r];
    const int64_t j1 = w.row_ptr[r + 1];
    for (; j + 32 <= j1; j += 32) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w.values + j), gather8(j), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w.values + j + 8), gather8(j + 8), a1);
      a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w.values + j + 16), gather8(j + 16), a2);
      a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w.values + j + 24), gather8(j + 24), a3);
    }
    for (; j + 8 <= j1; j += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w.values + j), gather8(j), a0);
    float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; j < j1; ++j) s += w.values[j] * x[col[j]];
    y[r] = s + (bias ? bias[r] : 0.0f);
  }
}

inline void store_column(float* y, int64_t ldy, int64_t mc, const float* t, float b) {
  for (int64_t i = 0; i < mc; ++i) y[i * ldy] = t[i] + b;
}

// Results of eight consecutive rows of y for MC columns of M, written out
// together: y is [M][N], so one row's MC results are MC stores N floats
// apart, all in one L1 set when N * 4 is a multiple of 4 KiB. Transposed
// 8x8, eight rows go out as one 32-byte store per column of M.
template <int MC>
struct Tile8 {
  alignas(32) float t[8][MC];

  void flush(float* y, int64_t ldy, int64_t mc, const float* bias, int nr) const {
    if (nr < 8) {
      for (int rr = 0; rr < nr; ++rr) store_column(y + rr, ldy, mc, t[rr], bias ? bias[rr] : 0.0f);
      return;
    }
    const __m256 b = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
    for (int i0 = 0; i0 < mc; i0 += 8) {
      const __m256 t0 = _mm256_unpacklo_ps(_mm256_load_ps(t[0] + i0), _mm256_load_ps(t[1] + i0));
      const __m256 t1 = _mm256_unpackhi_ps(_mm256_load_ps(t[0] + i0), _mm256_load_ps(t[1] + i0));
      const __m256 t2 = _mm256_unpacklo_ps(_mm256_load_ps(t[2] + i0), _mm256_load_ps(t[3] + i0));
      const __m256 t3 = _mm256_unpackhi_ps(_mm256_load_ps(t[2] + i0), _mm256_load_ps(t[3] + i0));
      const __m256 t4 = _mm256_unpacklo_ps(_mm256_load_ps(t[4] + i0), _mm256_load_ps(t[5] + i0));
      const __m256 t5 = _mm256_unpackhi_ps(_mm256_load_ps(t[4] + i0), _mm256_load_ps(t[5] + i0));
      const __m256 t6 = _mm256_unpacklo_ps(_mm256_load_ps(t[6] + i0), _mm256_load_ps(t[7] + i0));
      const __m256 t7 = _mm256_unpackhi_ps(_mm256_load_ps(t[6] + i0), _mm256_load_ps(t[7] + i0));
      const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xee);
      const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xee);
      const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xee);
      const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xee);
      const __m256 o[8] = {
          _mm256_permute2f128_ps(s0, s4, 0x20), _mm256_permute2f128_ps(s1, s5, 0x20),
          _mm256_permute2f128_ps(s2, s6, 0x20), _mm256_permute2f128_ps(s3, s7, 0x20),
          _mm256_permute2f128_ps(s0, s4, 0x31), _mm256_permute2f128_ps(s1, s5, 0x31),
          _mm256_permute2f128_ps(s2, s6, 0x31), _mm256_permute2f128_ps(s3, s7, 0x31)};
      const int64_t n = mc - i0 < 8 ? mc - i0 : 8;
      for (int64_t q = 0; q < n; ++q) _mm256_storeu_ps(y + (i0 + q) * ldy, _mm256_add_ps(o[q], b));
    }
  }
};

// MC columns of M (V = MC / 8 vectors) per stored value, U values in flight,
// each into its own accumulators: U * V independent FMA chains hide the
// latency (8 needed on Zen 3).
template <int MC, int U, class Col>
void csr_rows(const Matrix& w, const Col* col, const float* xt, int64_t mc, const float* bias,
              float* y, int64_t ldy, int64_t r0, int64_t r1) {
  constexpr int V = MC / 8;
  Tile8<MC> tile;
  for (int64_t g = r0; g < r1; g += 8) {
    const int nr = r1 - g < 8 ? int(r1 - g) : 8;
    for (int rr = 0; rr < nr; ++rr) {
      const int64_t r = g + rr;
      __m256 acc[U][V];
#pragma GCC unroll 16
      for (int u = 0; u < U; ++u)
#pragma GCC unroll 16
        for (int q = 0; q < V; ++q) acc[u][q] = _mm256_setzero_ps();
      int64_t j = w.row_ptr[r];
      const int64_t j1 = w.row_ptr[r + 1];
      for (; j + U <= j1; j += U) {
#pragma GCC unroll 16
        for (int u = 0; u < U; ++u) {
          const float* xr = xt + int64_t(col[j + u]) * MC;
          const __m256 v = _mm256_broadcast_ss(w.values + j + u);
#pragma GCC unroll 16
          for (int q = 0; q < V; ++q)
            acc[u][q] = _mm256_fmadd_ps(v, _mm256_load_ps(xr + 8 * q), acc[u][q]);
        }
      }
      for (; j < j1; ++j) {
        const float* xr = xt + int64_t(col[j]) * MC;
        const __m256 v = _mm256_broadcast_ss(w.values + j);
#pragma GCC unroll 16
        for (int q = 0; q < V; ++q)
          acc[0][q] = _mm256_fmadd_ps(v, _mm256_load_ps(xr + 8 * q), acc[0][q]);
      }
#pragma GCC unroll 16
      for (int q = 0; q < V; ++q) {
        __m256 s = acc[0][q];
#pragma GCC unroll 16
        for (int u = 1; u < U; ++u) s = _mm256_add_ps(s, acc[u][q]);
        _mm256_store_ps(tile.t[rr] + 8 * q, s);
      }
    }
    tile.flush(y + g, ldy, mc, bias ? bias + g : nullptr, nr);
  }
}

// One token, 4x4 blocks: a ymm holds two rows of the block; x[c0..c0+3] is
// broadcast to both 128-bit lanes. Four blocks in flight (8 accumulators).
template <class Col>
void bsr_rows_1(const Matrix& w, const Col* col, const float* x, const float* bias, float* y,
                int64_t b0, int64_t b1) {
  const int64_t kfull = w.k / kBlock;  // block columns with all four activations inside K
  for (int64_t b = b0; b < b1; ++b) {
    __m256 p0 = _mm256_setzero_ps(), p1 = p0, q0 = p0, q1 = p0, s0 = p0, s1 = p0, t0 = p0, t1 = p0;
    int64_t j = w.row_ptr[b];
    const int64_t j1 = w.row_ptr[b + 1];
    auto x4 = [&](int64_t jj) -> __m256 {
      const int64_t c = int64_t(col[jj]);
      if (c < kfull) return _mm256_broadcast_ps(reinterpret_cast<const __m128*>(x + c * kBlock));
      // The edge block: lanes past K are not loaded (their weights are zero,
      // but memory past x need not be readable or finite).
      const int64_t left = w.k - c * kBlock;
      const __m128i m = _mm_cmpgt_epi32(_mm_set1_epi32(int(left)), _mm_setr_epi32(0, 1, 2, 3));
      const __m128 v = _mm_maskload_ps(x + c * kBlock, m);
      return _mm256_set_m128(v, v);
    };
    for (; j + 4 <= j1; j += 4) {
      const float* v = w.values + j * 16;
      const __m256 xa = x4(j), xb = x4(j + 1), xc = x4(j + 2), xd = x4(j + 3);
      p0 = _mm256_fmadd_ps(_mm256_loadu_ps(v), xa, p0);
      p1 = _mm256_fmadd_ps(_mm256_loadu_ps(v + 8), xa, p1);
      q0 = _mm256_fmadd_ps(_mm256_loadu_ps(v + 16), xb, q0);
      q1 = _mm256_fmadd_ps(_mm256_loadu_ps(v + 24), xb, q1);
      s0 = _mm256_fmadd_ps(_mm256_loadu_ps(v + 32), xc, s0);
      s1 = _mm256_fmadd_ps(_mm256_loadu_ps(v + 40), xc, s1);
      t0 = _mm256_fmadd_ps(_mm256_loadu_ps(v + 48), xd, t0);
      t1 = _mm256_fmadd_ps(_mm256_loadu_ps(v + 56), xd, t1);
    }
    for (; j < j1; ++j) {
      const float* v = w.values + j * 16;
      const __m256 xa = x4(j);
      p0 = _mm256_fmadd_ps(_mm256_loadu_ps(v), xa, p0);
      p1 = _mm256_fmadd_ps(_mm256_loadu_ps(v + 8), xa, p1);
    }
    // a: rows 0 | 1 (four partial products each), c: rows 2 | 3.
    const __m256 a = _mm256_add_ps(_mm256_add_ps(p0, q0), _mm256_add_ps(s0, t0));
    const __m256 c = _mm256_add_ps(_mm256_add_ps(p1, q1), _mm256_add_ps(s1, t1));
    const __m256 h = _mm256_hadd_ps(a, c);  // [r0 r0 r2 r2 | r1 r1 r3 r3]
    alignas(32) float t[8];
    _mm256_store_ps(t, _mm256_hadd_ps(h, h));  // [r0 r2 r0 r2 | r1 r3 r1 r3]
    const float sums[4] = {t[0], t[4], t[1], t[5]};
    for (int rr = 0; rr < kBlock && b * kBlock + rr < w.n; ++rr) {
      const int64_t r = b * kBlock + rr;
      y[r] = sums[rr] + (bias ? bias[r] : 0.0f);
    }
  }
}

// 4x4 blocks, MC = 8 or 16 columns of M: 4 rows x 2 vectors, 8
// accumulators, what 16 registers leave room for (4 x 4 for 32 columns
// would leave none for the operands; 32-wide chunks also measured slower
// here, their 512 KiB of activations crowding L2). For MC = 8, even and odd
// columns of the block go to separate accumulators, so 8 chains still run.
// Two block rows fill one 8-row output tile.
template <int MC, class Col>
void bsr_rows(const Matrix& w, const Col* col, const float* xt, int64_t mc, const float* bias,
              float* y, int64_t ldy, int64_t b0, int64_t b1) {
  static_assert(MC == 8 || MC == 16, "4x4 blocks take 8 or 16 columns of M");
  constexpr bool wide = MC == 16;
  Tile8<MC> tile;
  for (int64_t g = b0; g < b1; g += 2) {
    const int nb = b1 - g < 2 ? 1 : 2;
    for (int bb = 0; bb < nb; ++bb) {
      const int64_t b = g + bb;
      __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00,
             a30 = a00, a31 = a00;
      const int64_t j1 = w.row_ptr[b + 1];
      for (int64_t j = w.row_ptr[b]; j < j1; ++j) {
        const float* v = w.values + j * 16;
        const int64_t c0 = int64_t(col[j]) * kBlock;
        const int kmax = w.k - c0 < kBlock ? int(w.k - c0) : kBlock;
        const float* xr = xt + c0 * MC;
        if (wide) {
          for (int kk = 0; kk < kmax; ++kk, xr += MC) {
            const __m256 x0 = _mm256_load_ps(xr), x1 = _mm256_load_ps(xr + 8);
            const __m256 v0 = _mm256_broadcast_ss(v + kk), v1 = _mm256_broadcast_ss(v + 4 + kk);
            a00 = _mm256_fmadd_ps(v0, x0, a00);
            a01 = _mm256_fmadd_ps(v0, x1, a01);
            a10 = _mm256_fmadd_ps(v1, x0, a10);
            a11 = _mm256_fmadd_ps(v1, x1, a11);
            const __m256 v2 = _mm256_broadcast_ss(v + 8 + kk),
                         v3 = _mm256_broadcast_ss(v + 12 + kk);
            a20 = _mm256_fmadd_ps(v2, x0, a20);
            a21 = _mm256_fmadd_ps(v2, x1, a21);
            a30 = _mm256_fmadd_ps(v3, x0, a30);
            a31 = _mm256_fmadd_ps(v3, x1, a31);
          }
        } else {
          int kk = 0;
          for (; kk + 2 <= kmax; kk += 2, xr += 2 * MC) {
            const __m256 x0 = _mm256_load_ps(xr), x1 = _mm256_load_ps(xr + MC);
            a00 = _mm256_fmadd_ps(_mm256_broadcast_ss(v + kk), x0, a00);
            a01 = _mm256_fmadd_ps(_mm256_broadcast_ss(v + kk + 1), x1, a01);
            a10 = _mm256_fmadd_ps(_mm256_broadcast_ss(v + 4 + kk), x0, a10);
            a11 = _mm256_fmadd_ps(_mm256_broadcast_ss(v + 5 + kk), x1, a11);
            a20 = _mm256_fmadd_ps(_mm256_broadcast_ss(v + 8 + kk), x0, a20);
            a21 = _mm256_fmadd_ps(_mm256_broadcast_ss(v + 9 + kk), x1, a21);
            a30 = _mm256_fmadd_ps(_mm256_broadcast_ss(v + 12 + kk), x0, a30);
            a31 = _mm256_fmadd_ps(_mm256_broadcast_ss(v + 13 + kk), x1, a31);
          }
          if (kk < kmax) {
            const __m256 x0 = _mm256_load_ps(xr);
            a00 = _mm256_fmadd_ps(_mm256_broadcast_ss(v + kk), x0, a00);
            a10 = _mm256_fmadd_ps(_mm256_broadcast_ss(v + 4 + kk), x0, a10);
            a20 = _mm256_fmadd_ps(_mm256_broadcast_ss(v + 8 + kk), x0, a20);
            a30 = _mm256_fmadd_ps(_mm256_broadcast_ss(v + 12 + kk), x0, a30);
          }
        }
      }
      float* t = tile.t[4 * bb];
      if (wide) {
        _mm256_store_ps(t, a00);
        _mm256_store_ps(t + 8, a01);
        _mm256_store_ps(t + MC, a10);
        _mm256_store_ps(t + MC + 8, a11);
        _mm256_store_ps(t + 2 * MC, a20);
        _mm256_store_ps(t + 2 * MC + 8, a21);
        _mm256_store_ps(t + 3 * MC, a30);
        _mm256_store_ps(t + 3 * MC + 8, a31);
      } else {
        _mm256_store_ps(t, _mm256_add_ps(a00, a01));
        _mm256_store_ps(t + MC, _mm256_add_ps(a10, a11));
        _mm256_store_ps(t + 2 * MC, _mm256_add_ps(a20, a21));
        _mm256_store_ps(t + 3 * MC, _mm256_add_ps(a30, a31));
      }
    }
    const int64_t r = g * kBlock, left = w.n - r;  // rows past N (edge block) are not written
    const int nr = left < 4 * nb ? int(left) : 4 * nb;
    tile.flush(y + r, ldy, mc, bias ? bias + r : nullptr, nr);
  }
}

template <class Col>
void forward_col(const Matrix& w, const Col* col, const float* xt, int mc_pad, int64_t mc,
                 const float* bias, float* y, int64_t ldy, int64_t r0, int64_t r1) {
  const bool bsr = w.block == kBlock;
  switch (mc_pad) {
    case 1:
      if (bsr)
        bsr_rows_1(w, col, xt, bias, y, r0, r1);
      else
        csr_rows_1(w, col, xt, bias, y, r0, r1);
      break;
    case 8:
      if (bsr)
        bsr_rows<8>(w, col, xt, mc, bias, y, ldy, r0, r1);
      else
        csr_rows<8, 8>(w, col, xt, mc, bias, y, ldy, r0, r1);
      break;
    case 16:
      if (bsr)
        bsr_rows<16>(w, col, xt, mc, bias, y, ldy, r0, r1);
      else
        csr_rows<16, 4>(w, col, xt, mc, bias, y, ldy, r0, r1);
      break;
    default:
      csr_rows<32, 2>(w, col, xt, mc, bias, y, ldy, r0, r1);  // the driver keeps BSR to 16
  }
}

void forward(const Matrix& w, const float* xt, int mc_pad, int64_t mc, const float* bias, float* y,
             int64_t ldy, int64_t r0, int64_t r1) {
  if (w.col16)
    forward_col(w, static_cast<const uint16_t*>(w.col), xt, mc_pad, mc, bias, y, ldy, r0, r1);
  else
    forward_col(w, static_cast<const int32_t*>(w.col), xt, mc_pad, mc, bias, y, ldy, r0, r1);
}

// dxt[col] += v * dyt[row]: a load, an FMA and a store per vector (stores,
// one a cycle, bound it). Columns within a row are distinct, so the
// read-modify-writes of consecutive values never depend on each other.
template <int MC, class Col>
void backward_x_rows(const Matrix& w, const Col* col, const float* dyt, float* dxt, int64_t r0,
                     int64_t r1) {
  constexpr int V = MC / 8;
  for (int64_t r = r0; r < r1; ++r) {
    __m256 d[V];
#pragma GCC unroll 4
    for (int q = 0; q < V; ++q) d[q] = _mm256_loadu_ps(dyt + r * MC + 8 * q);
    const int64_t j1 = w.row_ptr[r + 1];
    for (int64_t j = w.row_ptr[r]; j < j1; ++j) {
      float* xr = dxt + int64_t(col[j]) * MC;
      const __m256 v = _mm256_broadcast_ss(w.values + j);
#pragma GCC unroll 4
      for (int q = 0; q < V; ++q)
        _mm256_storeu_ps(xr + 8 * q, _mm256_fmadd_ps(v, d[q], _mm256_loadu_ps(xr + 8 * q)));
    }
  }
}

// One token: dx[col] += v * dy[row].
template <class Col>
void backward_x_1(const Matrix& w, const Col* col, const float* dy, float* dx, int64_t r0,
                  int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float d = dy[r];
    const int64_t j1 = w.row_ptr[r + 1];
    for (int64_t j = w.row_ptr[r]; j < j1; ++j) dx[col[j]] += w.values[j] * d;
  }
}

template <class Col>
void backward_x_col(const Matrix& w, const Col* col, const float* dyt, int mc_pad, float* dxt,
                    int64_t r0, int64_t r1) {
  switch (mc_pad) {
    case 1:
      backward_x_1(w, col, dyt, dxt, r0, r1);
      break;
    case 8:
      backward_x_rows<8>(w, col, dyt, dxt, r0, r1);
      break;
    case 16:
      backward_x_rows<16>(w, col, dyt, dxt, r0, r1);
      break;
    default:
      backward_x_rows<32>(w, col, dyt, dxt, r0, r1);
  }
}

void backward_x(const Matrix& w, const float* dyt, int mc_pad, float* dxt, int64_t r0, int64_t r1) {
  if (w.col16)
    backward_x_col(w, static_cast<const uint16_t*>(w.col), dyt, mc_pad, dxt, r0, r1);
  else
    backward_x_col(w, static_cast<const int32_t*>(w.col), dyt, mc_pad, dxt, r0, r1);
}

// Eight row vectors -> one vector of their eight horizontal sums.
inline __m256 hsum8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6,
                    __m256 a7) {
  const __m256 g0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  const __m256 g1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
  return _mm256_add_ps(_mm256_permute2f128_ps(g0, g1, 0x20), _mm256_permute2f128_ps(g0, g1, 0x31));
}

// dv[j] += <dyt[row], xt[col[j]]>: eight stored values at a time, eight
// independent dot products reduced together (seven hadds for eight values,
// not four shuffles each).
template <int MC, class Col>
void sddmm_rows(const Matrix& w, const Col* col, const float* dyt, const float* xt, float* dv,
                int64_t r0, int64_t r1) {
  constexpr int V = MC / 8;
  for (int64_t r = r0; r < r1; ++r) {
    __m256 d[V];
#pragma GCC unroll 4
    for (int q = 0; q < V; ++q) d[q] = _mm256_loadu_ps(dyt + r * MC + 8 * q);
    auto dot = [&](int64_t jj) {
      const float* xr = xt + int64_t(col[jj]) * MC;
      __m256 p = _mm256_mul_ps(d[0], _mm256_loadu_ps(xr));
#pragma GCC unroll 4
      for (int q = 1; q < V; ++q) p = _mm256_fmadd_ps(d[q], _mm256_loadu_ps(xr + 8 * q), p);
      return p;
    };
    int64_t j = w.row_ptr[r];
    const int64_t j1 = w.row_ptr[r + 1];
    for (; j + 8 <= j1; j += 8) {
      const __m256 s = hsum8(dot(j), dot(j + 1), dot(j + 2), dot(j + 3), dot(j + 4), dot(j + 5),
                             dot(j + 6), dot(j + 7));
      _mm256_storeu_ps(dv + j, _mm256_add_ps(_mm256_loadu_ps(dv + j), s));
    }
    for (; j < j1; ++j) dv[j] += hsum(dot(j));
  }
}

// One token: dv[j] += dy[row] * x[col[j]].
template <class Col>
void sddmm_1(const Matrix& w, const Col* col, const float* dy, const float* x, float* dv,
             int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float d = dy[r];
    const int64_t j1 = w.row_ptr[r + 1];
    for (int64_t j = w.row_ptr[r]; j < j1; ++j) dv[j] += d * x[col[j]];
  }
}

template <class Col>
void sddmm_col(const Matrix& w, const Col* col, const float* dyt, const float* xt, int mc_pad,
               float* dv, int64_t r0, int64_t r1) {
  switch (mc_pad) {
    case 1:
      sddmm_1(w, col, dyt, xt, dv, r0, r1);
      break;
    case 8:
      sddmm_rows<8>(w, col, dyt, xt, dv, r0, r1);
      break;
    case 16:
      sddmm_rows<16>(w, col, dyt, xt, dv, r0, r1);
      break;
    default:
      sddmm_rows<32>(w, col, dyt, xt, dv, r0, r1);
  }
}

void sddmm(const Matrix& w, const float* dyt, const float* xt, int mc_pad, float* dv, int64_t r0,
           int64_t r1) {
  if (w.col16)
    sddmm_col(w, static_cast<const uint16_t*>(w.col), dyt, xt, mc_pad, dv, r0, r1);
  else
    sddmm_col(w, static_cast<const int32_t*>(w.col), dyt, xt, mc_pad, dv, r0, r1);
}

}  // namespace

const Kernels* kernels_avx2() {
  static const Kernels table{.forward = &forward, .backward_x = &backward_x, .sddmm = &sddmm};
  return &table;
}

}  // namespace sparse
}  // namespace pk
