// The sparse kernels, written once and compiled per ISA file with its flags;
// the inner loops run over a fixed width of M so the compiler turns them into
// whole vectors (16 floats per AVX-512 register). Anonymous namespace: each
// ISA file gets its own copy.
#pragma once
#include <cstdint>

#include "sparse_isa.h"

namespace pk {
namespace sparse {
namespace {

inline int64_t col_at(const Matrix& w, int64_t j) {
  return w.col16 ? int64_t(static_cast<const uint16_t*>(w.col)[j])
                 : int64_t(static_cast<const int32_t*>(w.col)[j]);
}

// One token: y[row] = sum_j v[j] * x[col[j]], a gather-reduce per row.
template <class Col>
void csr_forward_1(const Matrix& w, const Col* col, const float* x, const float* bias, float* y,
                   int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    float s = 0.0f;
    const int64_t j0 = w.row_ptr[r], j1 = w.row_ptr[r + 1];
#pragma omp simd reduction(+ : s)
    for (int64_t j = j0; j < j1; ++j) s += w.values[j] * x[col[j]];
    y[r] = s + (bias ? bias[r] : 0.0f);
  }
}

template <int MC, class Col>
void csr_forward(const Matrix& w, const Col* col, const float* xt, int64_t mc, const float* bias,
                 float* y, int64_t ldy, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    float acc[MC] = {};
    for (int64_t j = w.row_ptr[r]; j < w.row_ptr[r + 1]; ++j) {
      const float v = w.values[j];
      const float* xr = xt + int64_t(col[j]) * MC;
#pragma omp simd
      for (int i = 0; i < MC; ++i) acc[i] += v * xr[i];
    }
    const float b = bias ? bias[r] : 0.0f;
    for (int64_t i = 0; i < mc; ++i) y[i * ldy + r] = acc[i] + b;
  }
}

// Block rows: four output rows at once, each activation row loaded once per
// block column and used by all four.
template <int MC, class Col>
void bsr_forward(const Matrix& w, const Col* col, const float* xt, int64_t mc, const float* bias,
                 float* y, int64_t ldy, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    float acc[kBlock][MC] = {};
    for (int64_t j = w.row_ptr[b]; j < w.row_ptr[b + 1]; ++j) {
      const float* v = w.values + j * kBlock * kBlock;
      const int64_t c0 = int64_t(col[j]) * kBlock;
      for (int kk = 0; kk < kBlock; ++kk) {
        if (c0 + kk >= w.k) break;  // the zero padding past K has no activation row
        const float* xr = xt + (c0 + kk) * MC;
        const float v0 = v[kk], v1 = v[4 + kk], v2 = v[8 + kk], v3 = v[12 + kk];
#pragma omp simd
        for (int i = 0; i < MC; ++i) {
          acc[0][i] += v0 * xr[i];
          acc[1][i] += v1 * xr[i];
          acc[2][i] += v2 * xr[i];
          acc[3][i] += v3 * xr[i];
        }
      }
    }
    for (int rr = 0; rr < kBlock; ++rr) {
      const int64_t r = b * kBlock + rr;
      if (r >= w.n) break;
      const float bb = bias ? bias[r] : 0.0f;
      for (int64_t i = 0; i < mc; ++i) y[i * ldy + r] = acc[rr][i] + bb;
    }
  }
}

template <class Col>
void forward_typed(const Matrix& w, const Col* col, const float* xt, int mc_pad, int64_t mc,
                   const float* bias, float* y, int64_t ldy, int64_t r0, int64_t r1) {
  if (w.block == kBlock) {
    if (mc_pad == 32)
      bsr_forward<32>(w, col, xt, mc, bias, y, ldy, r0, r1);
    else if (mc_pad == 16)
      bsr_forward<16>(w, col, xt, mc, bias, y, ldy, r0, r1);
    else
      bsr_forward<1>(w, col, xt, mc, bias, y, ldy, r0, r1);
    return;
  }
  if (mc_pad == 32)
    csr_forward<32>(w, col, xt, mc, bias, y, ldy, r0, r1);
  else if (mc_pad == 16)
    csr_forward<16>(w, col, xt, mc, bias, y, ldy, r0, r1);
  else
    csr_forward_1(w, col, xt, bias, y, r0, r1);
}

[[maybe_unused]] void forward_generic(const Matrix& w, const float* xt, int mc_pad, int64_t mc,
                                      const float* bias, float* y, int64_t ldy, int64_t r0,
                                      int64_t r1) {
  if (w.col16)
    forward_typed(w, static_cast<const uint16_t*>(w.col), xt, mc_pad, mc, bias, y, ldy, r0, r1);
  else
    forward_typed(w, static_cast<const int32_t*>(w.col), xt, mc_pad, mc, bias, y, ldy, r0, r1);
}

template <int MC>
void backward_x_fixed(const Matrix& w, const float* dyt, float* dxt, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* dr = dyt + r * MC;
    for (int64_t j = w.row_ptr[r]; j < w.row_ptr[r + 1]; ++j) {
      const float v = w.values[j];
      float* xr = dxt + col_at(w, j) * MC;
#pragma omp simd
      for (int i = 0; i < MC; ++i) xr[i] += v * dr[i];
    }
  }
}

[[maybe_unused]] void backward_x_generic(const Matrix& w, const float* dyt, int mc_pad, float* dxt,
                                         int64_t r0, int64_t r1) {
  if (mc_pad == 32)
    backward_x_fixed<32>(w, dyt, dxt, r0, r1);
  else if (mc_pad == 16)
    backward_x_fixed<16>(w, dyt, dxt, r0, r1);
  else
    backward_x_fixed<1>(w, dyt, dxt, r0, r1);
}

template <int MC>
void sddmm_fixed(const Matrix& w, const float* dyt, const float* xt, float* dv, int64_t r0,
                 int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* dr = dyt + r * MC;
    for (int64_t j = w.row_ptr[r]; j < w.row_ptr[r + 1]; ++j) {
      const float* xr = xt + col_at(w, j) * MC;
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int i = 0; i < MC; ++i) s += dr[i] * xr[i];
      dv[j] += s;
    }
  }
}

[[maybe_unused]] void sddmm_generic(const Matrix& w, const float* dyt, const float* xt, int mc_pad,
                                    float* dv, int64_t r0, int64_t r1) {
  if (mc_pad == 32)
    sddmm_fixed<32>(w, dyt, xt, dv, r0, r1);
  else if (mc_pad == 16)
    sddmm_fixed<16>(w, dyt, xt, dv, r0, r1);
  else
    sddmm_fixed<1>(w, dyt, xt, dv, r0, r1);
}

}  // namespace
}  // namespace sparse
}  // namespace pk
