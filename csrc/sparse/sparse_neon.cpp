// NEON sparse kernels (Armv8-A baseline, 32 registers of 4 floats). GCC 12
// leaves the generic loops poor on aarch64 too: it unrolls the CSR forward's
// loop over stored values by two and runs that body in scalar FMAs on an
// accumulator array kept in memory (only the odd last value is vectorised),
// gathers the one-token path through vectors of addresses, and reduces each
// SDDMM dot product in a serial chain. So the hot paths are intrinsics:
//  - CSR, 16 or 32 columns of M: 16 accumulators (4 values x 4 vectors, or
//    2 x 8) so that two FMA pipes of latency 4 stay busy, the stored values
//    loaded as one vector and applied by lane (FMLA by element: no
//    broadcast), results of four rows written through a 4x4 transpose.
//  - BSR: a block's 16 values are four vectors, one per row, and each
//    activation row is applied to all four by lane (16 accumulators; 32
//    columns take two passes of 16, 4 x 8 accumulators not fitting).
//  - one token: lane loads gather four activations per vector.
#include <arm_neon.h>

#include "sparse_generic.h"

namespace pk {
namespace sparse {
namespace {

// Results of four consecutive rows of y for MC columns of M. y is [M][N],
// so one row's results are N floats apart; transposed 4x4, four rows go out
// as one 16-byte store per column of M.
template <int MC>
struct Tile4 {
  float t[4][MC];

  void flush(float* y, int64_t ldy, int64_t mc, const float* bias, int nr) const {
    if (nr < 4) {
      for (int rr = 0; rr < nr; ++rr) {
        const float b = bias ? bias[rr] : 0.0f;
        for (int64_t i = 0; i < mc; ++i) y[i * ldy + rr] = t[rr][i] + b;
      }
      return;
    }
    const float32x4_t b = bias ? vld1q_f32(bias) : vdupq_n_f32(0.0f);
    for (int64_t i0 = 0; i0 < mc; i0 += 4) {
      const float32x4_t r0 = vld1q_f32(t[0] + i0), r1 = vld1q_f32(t[1] + i0);
      const float32x4_t r2 = vld1q_f32(t[2] + i0), r3 = vld1q_f32(t[3] + i0);
      const float64x2_t a0 = vreinterpretq_f64_f32(vtrn1q_f32(r0, r1));
      const float64x2_t a1 = vreinterpretq_f64_f32(vtrn2q_f32(r0, r1));
      const float64x2_t a2 = vreinterpretq_f64_f32(vtrn1q_f32(r2, r3));
      const float64x2_t a3 = vreinterpretq_f64_f32(vtrn2q_f32(r2, r3));
      const float32x4_t o[4] = {
          vreinterpretq_f32_f64(vtrn1q_f64(a0, a2)), vreinterpretq_f32_f64(vtrn1q_f64(a1, a3)),
          vreinterpretq_f32_f64(vtrn2q_f64(a0, a2)), vreinterpretq_f32_f64(vtrn2q_f64(a1, a3))};
      const int64_t n = mc - i0 < 4 ? mc - i0 : 4;
      for (int64_t q = 0; q < n; ++q) vst1q_f32(y + (i0 + q) * ldy, vaddq_f32(o[q], b));
    }
  }
};

// Four activations gathered into one vector (no gather instruction: a load
// into each lane).
template <class Col>
inline float32x4_t gather4(const float* x, const Col* c) {
  float32x4_t v = vld1q_dup_f32(x + c[0]);
  v = vld1q_lane_f32(x + c[1], v, 1);
  v = vld1q_lane_f32(x + c[2], v, 2);
  return vld1q_lane_f32(x + c[3], v, 3);
}

// One token: y[row] = sum_j v[j] * x[col[j]], four vectors in flight.
template <class Col>
void csr_rows_1(const Matrix& w, const Col* col, const float* x, const float* bias, float* y,
                int64_t r0, int64_t r1) {
  const float* val = w.values;
  for (int64_t r = r0; r < r1; ++r) {
    float32x4_t a0 = vdupq_n_f32(0.0f), a1 = a0, a2 = a0, a3 = a0;
    int64_t j = w.row_ptr[r];
    const int64_t j1 = w.row_ptr[r + 1];
    for (; j + 16 <= j1; j += 16) {
      a0 = vfmaq_f32(a0, vld1q_f32(val + j), gather4(x, col + j));
      a1 = vfmaq_f32(a1, vld1q_f32(val + j + 4), gather4(x, col + j + 4));
      a2 = vfmaq_f32(a2, vld1q_f32(val + j + 8), gather4(x, col + j + 8));
      a3 = vfmaq_f32(a3, vld1q_f32(val + j + 12), gather4(x, col + j + 12));
    }
    for (; j + 4 <= j1; j += 4) a0 = vfmaq_f32(a0, vld1q_f32(val + j), gather4(x, col + j));
    float s = vaddvq_f32(vaddq_f32(vaddq_f32(a0, a1), vaddq_f32(a2, a3)));
    for (; j < j1; ++j) s += val[j] * x[col[j]];
    y[r] = s + (bias ? bias[r] : 0.0f);
  }
}

// acc[u][q] += value u (lane u of vals) * xt[col[j + u]][4q .. 4q + 3].
template <int U, int V, class Col>
inline void csr_step(float32x4_t (&acc)[U][V], const Col* col, const float* xt, float32x4_t vals) {
  constexpr int MC = 4 * V;
#pragma GCC unroll 4
  for (int u = 0; u < U; ++u) {
    const float* xr = xt + int64_t(col[u]) * MC;
#pragma GCC unroll 8
    for (int q = 0; q < V; ++q) {
      const float32x4_t xv = vld1q_f32(xr + 4 * q);
      // The lane must be a constant: u is one after unrolling.
      switch (u) {
        case 0:
          acc[u][q] = vfmaq_laneq_f32(acc[u][q], xv, vals, 0);
          break;
        case 1:
          acc[u][q] = vfmaq_laneq_f32(acc[u][q], xv, vals, 1);
          break;
        case 2:
          acc[u][q] = vfmaq_laneq_f32(acc[u][q], xv, vals, 2);
          break;
        default:
          acc[u][q] = vfmaq_laneq_f32(acc[u][q], xv, vals, 3);
      }
    }
  }
}

// MC = 16 or 32 columns of M (V = MC / 4 vectors) per stored value, U values
// at a time, each into its own accumulators: U * V = 16 independent chains.
template <int MC, class Col>
void csr_rows(const Matrix& w, const Col* col, const float* xt, int64_t mc, const float* bias,
              float* y, int64_t ldy, int64_t r0, int64_t r1) {
  constexpr int V = MC / 4, U = 16 / V;
  const float* val = w.values;
  Tile4<MC> tile;
  for (int64_t g = r0; g < r1; g += 4) {
    const int nr = r1 - g < 4 ? int(r1 - g) : 4;
    for (int rr = 0; rr < nr; ++rr) {
      const int64_t r = g + rr;
      float32x4_t acc[U][V];
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u)
#pragma GCC unroll 8
        for (int q = 0; q < V; ++q) acc[u][q] = vdupq_n_f32(0.0f);
      int64_t j = w.row_ptr[r];
      const int64_t j1 = w.row_ptr[r + 1];
      for (; j + U <= j1; j += U) {
        // U = 2 loads two values only: the next two may lie past the array.
        const float32x4_t vals =
            U == 4 ? vld1q_f32(val + j) : vcombine_f32(vld1_f32(val + j), vdup_n_f32(0.0f));
        csr_step(acc, col + j, xt, vals);
      }
      for (; j < j1; ++j) {
        const float* xr = xt + int64_t(col[j]) * MC;
        const float v = val[j];
#pragma GCC unroll 8
        for (int q = 0; q < V; ++q) acc[0][q] = vfmaq_n_f32(acc[0][q], vld1q_f32(xr + 4 * q), v);
      }
#pragma GCC unroll 8
      for (int q = 0; q < V; ++q) {
        float32x4_t s = acc[0][q];
#pragma GCC unroll 4
        for (int u = 1; u < U; ++u) s = vaddq_f32(s, acc[u][q]);
        vst1q_f32(tile.t[rr] + 4 * q, s);
      }
    }
    tile.flush(y + g, ldy, mc, bias ? bias + g : nullptr, nr);
  }
}

// x[c0 .. c0 + 3], zero past K: the edge block's lanes past K are not loaded
// (their weights are zero, but memory past x need not be readable or finite).
inline float32x4_t load_x4(const float* x, int64_t c0, int64_t k) {
  if (c0 + 4 <= k) return vld1q_f32(x + c0);
  float t[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t i = 0; c0 + i < k; ++i) t[i] = x[c0 + i];
  return vld1q_f32(t);
}

// Row sums of four vectors: {sum a, sum b, sum c, sum d}.
inline float32x4_t hsum4(float32x4_t a, float32x4_t b, float32x4_t c, float32x4_t d) {
  return vpaddq_f32(vpaddq_f32(a, b), vpaddq_f32(c, d));
}

// Writes a block row's four sums (rows past N are not written).
inline void store_block_row(const Matrix& w, int64_t b, float32x4_t s, const float* bias,
                            float* y) {
  const int64_t r = b * kBlock;
  if (r + kBlock <= w.n) {
    vst1q_f32(y + r, vaddq_f32(s, bias ? vld1q_f32(bias + r) : vdupq_n_f32(0.0f)));
    return;
  }
  float t[4];
  vst1q_f32(t, s);
  for (int rr = 0; r + rr < w.n; ++rr) y[r + rr] = t[rr] + (bias ? bias[r + rr] : 0.0f);
}

// One token, 4x4 blocks: each row of the block times x[c0 .. c0 + 3]
// elementwise, summed per row at the end; two blocks in flight.
template <class Col>
void bsr_rows_1(const Matrix& w, const Col* col, const float* x, const float* bias, float* y,
                int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    float32x4_t a0 = vdupq_n_f32(0.0f), a1 = a0, a2 = a0, a3 = a0, c0 = a0, c1 = a0, c2 = a0,
                c3 = a0;
    int64_t j = w.row_ptr[b];
    const int64_t j1 = w.row_ptr[b + 1];
    for (; j + 2 <= j1; j += 2) {
      const float* v = w.values + j * 16;
      const float32x4_t xa = load_x4(x, int64_t(col[j]) * kBlock, w.k);
      const float32x4_t xb = load_x4(x, int64_t(col[j + 1]) * kBlock, w.k);
      a0 = vfmaq_f32(a0, vld1q_f32(v), xa);
      a1 = vfmaq_f32(a1, vld1q_f32(v + 4), xa);
      a2 = vfmaq_f32(a2, vld1q_f32(v + 8), xa);
      a3 = vfmaq_f32(a3, vld1q_f32(v + 12), xa);
      c0 = vfmaq_f32(c0, vld1q_f32(v + 16), xb);
      c1 = vfmaq_f32(c1, vld1q_f32(v + 20), xb);
      c2 = vfmaq_f32(c2, vld1q_f32(v + 24), xb);
      c3 = vfmaq_f32(c3, vld1q_f32(v + 28), xb);
    }
    if (j < j1) {
      const float* v = w.values + j * 16;
      const float32x4_t xa = load_x4(x, int64_t(col[j]) * kBlock, w.k);
      a0 = vfmaq_f32(a0, vld1q_f32(v), xa);
      a1 = vfmaq_f32(a1, vld1q_f32(v + 4), xa);
      a2 = vfmaq_f32(a2, vld1q_f32(v + 8), xa);
      a3 = vfmaq_f32(a3, vld1q_f32(v + 12), xa);
    }
    const float32x4_t s =
        hsum4(vaddq_f32(a0, c0), vaddq_f32(a1, c1), vaddq_f32(a2, c2), vaddq_f32(a3, c3));
    store_block_row(w, b, s, bias, y);
  }
}

// acc[rr][q] += v[rr][KK] * xt[c0 + KK][4q ..]: block column KK applied to
// the four rows, by lane.
template <int KK>
inline void bsr_step(float32x4_t (&acc)[4][4], const float* xr, const float32x4_t (&v)[4]) {
#pragma GCC unroll 4
  for (int q = 0; q < 4; ++q) {
    const float32x4_t xv = vld1q_f32(xr + 4 * q);
#pragma GCC unroll 4
    for (int rr = 0; rr < 4; ++rr) acc[rr][q] = vfmaq_laneq_f32(acc[rr][q], xv, v[rr], KK);
  }
}

// 4x4 blocks, MC = 16 or 32 columns of M, 16 of them per pass (4 rows x 4
// vectors: 16 accumulators, 4 block rows and 4 activations besides).
template <int MC, class Col>
void bsr_rows(const Matrix& w, const Col* col, const float* xt, int64_t mc, const float* bias,
              float* y, int64_t ldy, int64_t b0, int64_t b1) {
  Tile4<MC> tile;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t j0 = w.row_ptr[b], j1 = w.row_ptr[b + 1];
    for (int h = 0; h < MC; h += 16) {
      float32x4_t acc[4][4];
#pragma GCC unroll 4
      for (int rr = 0; rr < 4; ++rr)
#pragma GCC unroll 4
        for (int q = 0; q < 4; ++q) acc[rr][q] = vdupq_n_f32(0.0f);
      for (int64_t j = j0; j < j1; ++j) {
        const float* vp = w.values + j * 16;
        const float32x4_t v[4] = {vld1q_f32(vp), vld1q_f32(vp + 4), vld1q_f32(vp + 8),
                                  vld1q_f32(vp + 12)};
        const int64_t c0 = int64_t(col[j]) * kBlock;
        const float* xr = xt + c0 * MC + h;
        // Block columns past K (the edge block) have no activation row.
        const int64_t kmax = w.k - c0;
        bsr_step<0>(acc, xr, v);
        if (kmax > 1) bsr_step<1>(acc, xr + MC, v);
        if (kmax > 2) bsr_step<2>(acc, xr + 2 * MC, v);
        if (kmax > 3) bsr_step<3>(acc, xr + 3 * MC, v);
      }
#pragma GCC unroll 4
      for (int rr = 0; rr < 4; ++rr)
#pragma GCC unroll 4
        for (int q = 0; q < 4; ++q) vst1q_f32(tile.t[rr] + h + 4 * q, acc[rr][q]);
    }
    const int64_t r = b * kBlock, left = w.n - r;
    tile.flush(y + r, ldy, mc, bias ? bias + r : nullptr, left < 4 ? int(left) : 4);
  }
}

template <class Col>
void forward_col(const Matrix& w, const Col* col, const float* xt, int mc_pad, int64_t mc,
                 const float* bias, float* y, int64_t ldy, int64_t r0, int64_t r1) {
  const bool bsr = w.block == kBlock;
  if (mc_pad == 1) {
    if (bsr)
      bsr_rows_1(w, col, xt, bias, y, r0, r1);
    else
      csr_rows_1(w, col, xt, bias, y, r0, r1);
  } else if (mc_pad == 16) {
    if (bsr)
      bsr_rows<16>(w, col, xt, mc, bias, y, ldy, r0, r1);
    else
      csr_rows<16>(w, col, xt, mc, bias, y, ldy, r0, r1);
  } else {
    if (bsr)
      bsr_rows<32>(w, col, xt, mc, bias, y, ldy, r0, r1);
    else
      csr_rows<32>(w, col, xt, mc, bias, y, ldy, r0, r1);
  }
}

void forward(const Matrix& w, const float* xt, int mc_pad, int64_t mc, const float* bias, float* y,
             int64_t ldy, int64_t r0, int64_t r1) {
  if (w.col16)
    forward_col(w, static_cast<const uint16_t*>(w.col), xt, mc_pad, mc, bias, y, ldy, r0, r1);
  else
    forward_col(w, static_cast<const int32_t*>(w.col), xt, mc_pad, mc, bias, y, ldy, r0, r1);
}

// dxt[col] += v * dyt[row]: a load, an FMA and a store per vector. Columns
// within a row are distinct, so consecutive values' read-modify-writes never
// depend on each other. The index width is a template parameter (the
// generic loop tests it per value).
template <int MC, class Col>
void backward_x_rows(const Matrix& w, const Col* col, const float* dyt, float* dxt, int64_t r0,
                     int64_t r1) {
  constexpr int V = MC / 4;
  for (int64_t r = r0; r < r1; ++r) {
    float32x4_t d[V];
#pragma GCC unroll 8
    for (int q = 0; q < V; ++q) d[q] = vld1q_f32(dyt + r * MC + 4 * q);
    const int64_t j1 = w.row_ptr[r + 1];
    for (int64_t j = w.row_ptr[r]; j < j1; ++j) {
      float* xr = dxt + int64_t(col[j]) * MC;
      const float v = w.values[j];
#pragma GCC unroll 8
      for (int q = 0; q < V; ++q)
        vst1q_f32(xr + 4 * q, vfmaq_n_f32(vld1q_f32(xr + 4 * q), d[q], v));
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
  if (mc_pad == 1)
    backward_x_1(w, col, dyt, dxt, r0, r1);
  else if (mc_pad == 16)
    backward_x_rows<16>(w, col, dyt, dxt, r0, r1);
  else
    backward_x_rows<32>(w, col, dyt, dxt, r0, r1);
}

void backward_x(const Matrix& w, const float* dyt, int mc_pad, float* dxt, int64_t r0, int64_t r1) {
  if (w.col16)
    backward_x_col(w, static_cast<const uint16_t*>(w.col), dyt, mc_pad, dxt, r0, r1);
  else
    backward_x_col(w, static_cast<const int32_t*>(w.col), dyt, mc_pad, dxt, r0, r1);
}

// dv[j] += <dyt[row], xt[col[j]]>: four stored values at a time, each dot
// product in two chains (even and odd vectors: eight chains in all), the
// four reduced together by pairwise adds into one vector of dv.
template <int MC, class Col>
void sddmm_rows(const Matrix& w, const Col* col, const float* dyt, const float* xt, float* dv,
                int64_t r0, int64_t r1) {
  constexpr int V = MC / 4;
  for (int64_t r = r0; r < r1; ++r) {
    float32x4_t d[V];
#pragma GCC unroll 8
    for (int q = 0; q < V; ++q) d[q] = vld1q_f32(dyt + r * MC + 4 * q);
    auto dot = [&](int64_t jj) {
      const float* xr = xt + int64_t(col[jj]) * MC;
      float32x4_t p = vmulq_f32(d[0], vld1q_f32(xr)), o = vmulq_f32(d[1], vld1q_f32(xr + 4));
#pragma GCC unroll 8
      for (int q = 2; q < V; q += 2) {
        p = vfmaq_f32(p, d[q], vld1q_f32(xr + 4 * q));
        o = vfmaq_f32(o, d[q + 1], vld1q_f32(xr + 4 * q + 4));
      }
      return vaddq_f32(p, o);
    };
    int64_t j = w.row_ptr[r];
    const int64_t j1 = w.row_ptr[r + 1];
    for (; j + 4 <= j1; j += 4) {
      const float32x4_t s = hsum4(dot(j), dot(j + 1), dot(j + 2), dot(j + 3));
      vst1q_f32(dv + j, vaddq_f32(vld1q_f32(dv + j), s));
    }
    for (; j < j1; ++j) dv[j] += vaddvq_f32(dot(j));
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
  if (mc_pad == 1)
    sddmm_1(w, col, dyt, xt, dv, r0, r1);
  else if (mc_pad == 16)
    sddmm_rows<16>(w, col, dyt, xt, dv, r0, r1);
  else
    sddmm_rows<32>(w, col, dyt, xt, dv, r0, r1);
}

void sddmm(const Matrix& w, const float* dyt, const float* xt, int mc_pad, float* dv, int64_t r0,
           int64_t r1) {
  if (w.col16)
    sddmm_col(w, static_cast<const uint16_t*>(w.col), dyt, xt, mc_pad, dv, r0, r1);
  else
    sddmm_col(w, static_cast<const int32_t*>(w.col), dyt, xt, mc_pad, dv, r0, r1);
}

}  // namespace

const Kernels* kernels_neon() {
  static const Kernels table{.forward = &forward, .backward_x = &backward_x, .sddmm = &sddmm};
  return &table;
}

}  // namespace sparse
}  // namespace pk
