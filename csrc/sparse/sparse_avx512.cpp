// AVX-512 sparse kernels. GCC does not vectorise the generic loops over M
// (it unrolls them into scalar FMAs), so the hot paths are written out: a
// gather-reduce per row for one token, two 16-lane FMAs per stored value for
// a 32-column chunk of M (four independent accumulator sets, so the FMA
// latency is hidden), and a 4-row register block for BSR.
#include <immintrin.h>

#include "sparse_generic.h"

namespace pk {
namespace sparse {
namespace {

inline __m512i load_cols16(const uint16_t* c, __mmask16 m) {
  return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, c));
}
inline __m512i load_cols16(const int32_t* c, __mmask16 m) { return _mm512_maskz_loadu_epi32(m, c); }

inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
}

template <class Col>
void csr_rows_1(const Matrix& w, const Col* col, const float* x, const float* bias, float* y,
                int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    int64_t j = w.row_ptr[r];
    const int64_t j1 = w.row_ptr[r + 1];
    for (; j + 32 <= j1; j += 32) {
      const __m512i i0 = load_cols16(col + j, 0xffff), i1 = load_cols16(col + j + 16, 0xffff);
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w.values + j), _mm512_i32gather_ps(i0, x, 4), a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w.values + j + 16), _mm512_i32gather_ps(i1, x, 4), a1);
    }
    for (; j < j1; j += 16) {
      const __mmask16 m = tail_mask(j1 - j);
      const __m512i i0 = load_cols16(col + j, m);
      a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w.values + j),
                           _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, i0, x, 4), a0);
    }
    y[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) + (bias ? bias[r] : 0.0f);
  }
}

inline void store_column(float* y, int64_t ldy, int64_t mc, __m512 lo, __m512 hi, float b) {
  alignas(64) float t[32];
  _mm512_store_ps(t, lo);
  _mm512_store_ps(t + 16, hi);
  for (int64_t i = 0; i < mc; ++i) y[i * ldy] = t[i] + b;
}

// MC = 16 or 32 columns of M per stored value.
template <int MC, class Col>
void csr_rows(const Matrix& w, const Col* col, const float* xt, int64_t mc, const float* bias,
              float* y, int64_t ldy, int64_t r0, int64_t r1) {
  constexpr bool two = MC == 32;
  for (int64_t r = r0; r < r1; ++r) {
    __m512 p0 = _mm512_setzero_ps(), p1 = p0, q0 = p0, q1 = p0, s0 = p0, s1 = p0, t0 = p0, t1 = p0;
    int64_t j = w.row_ptr[r];
    const int64_t j1 = w.row_ptr[r + 1];
    for (; j + 4 <= j1; j += 4) {
      const float* xa = xt + int64_t(col[j]) * MC;
      const float* xb = xt + int64_t(col[j + 1]) * MC;
      const float* xc = xt + int64_t(col[j + 2]) * MC;
      const float* xd = xt + int64_t(col[j + 3]) * MC;
      const __m512 va = _mm512_set1_ps(w.values[j]), vb = _mm512_set1_ps(w.values[j + 1]);
      const __m512 vc = _mm512_set1_ps(w.values[j + 2]), vd = _mm512_set1_ps(w.values[j + 3]);
      p0 = _mm512_fmadd_ps(va, _mm512_loadu_ps(xa), p0);
      q0 = _mm512_fmadd_ps(vb, _mm512_loadu_ps(xb), q0);
      s0 = _mm512_fmadd_ps(vc, _mm512_loadu_ps(xc), s0);
      t0 = _mm512_fmadd_ps(vd, _mm512_loadu_ps(xd), t0);
      if (two) {
        p1 = _mm512_fmadd_ps(va, _mm512_loadu_ps(xa + 16), p1);
        q1 = _mm512_fmadd_ps(vb, _mm512_loadu_ps(xb + 16), q1);
        s1 = _mm512_fmadd_ps(vc, _mm512_loadu_ps(xc + 16), s1);
        t1 = _mm512_fmadd_ps(vd, _mm512_loadu_ps(xd + 16), t1);
      }
    }
    for (; j < j1; ++j) {
      const float* xa = xt + int64_t(col[j]) * MC;
      const __m512 va = _mm512_set1_ps(w.values[j]);
      p0 = _mm512_fmadd_ps(va, _mm512_loadu_ps(xa), p0);
      if (two) p1 = _mm512_fmadd_ps(va, _mm512_loadu_ps(xa + 16), p1);
    }
    const __m512 lo = _mm512_add_ps(_mm512_add_ps(p0, q0), _mm512_add_ps(s0, t0));
    const __m512 hi = _mm512_add_ps(_mm512_add_ps(p1, q1), _mm512_add_ps(s1, t1));
    store_column(y + r, ldy, mc, lo, hi, bias ? bias[r] : 0.0f);
  }
}

// One token, 4x4 blocks: the block (16 values) times x[c0..c0+3] repeated in
// each 128-bit lane, summed per lane at the end.
template <class Col>
void bsr_rows_1(const Matrix& w, const Col* col, const float* x, const float* bias, float* y,
                int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = w.row_ptr[b]; j < w.row_ptr[b + 1]; ++j) {
      const int64_t c0 = int64_t(col[j]) * kBlock;
      const int64_t left = w.k - c0;
      const __m128 x4 = _mm_maskz_loadu_ps(left >= 4 ? 0xf : __mmask8((1u << left) - 1), x + c0);
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(w.values + j * 16), _mm512_broadcast_f32x4(x4), acc);
    }
    alignas(64) float t[16];
    _mm512_store_ps(t, acc);
    for (int rr = 0; rr < kBlock && b * kBlock + rr < w.n; ++rr) {
      const int64_t r = b * kBlock + rr;
      y[r] = t[4 * rr] + t[4 * rr + 1] + t[4 * rr + 2] + t[4 * rr + 3] + (bias ? bias[r] : 0.0f);
    }
  }
}

template <int MC, class Col>
void bsr_rows(const Matrix& w, const Col* col, const float* xt, int64_t mc, const float* bias,
              float* y, int64_t ldy, int64_t b0, int64_t b1) {
  constexpr bool two = MC == 32;
  for (int64_t b = b0; b < b1; ++b) {
    __m512 a00 = _mm512_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00,
           a30 = a00, a31 = a00;
    for (int64_t j = w.row_ptr[b]; j < w.row_ptr[b + 1]; ++j) {
      const float* v = w.values + j * 16;
      const int64_t c0 = int64_t(col[j]) * kBlock;
      const int kmax = w.k - c0 < kBlock ? int(w.k - c0) : kBlock;
      for (int kk = 0; kk < kmax; ++kk) {
        const float* xr = xt + (c0 + kk) * MC;
        const __m512 x0 = _mm512_loadu_ps(xr);
        const __m512 x1 = two ? _mm512_loadu_ps(xr + 16) : x0;
        const __m512 v0 = _mm512_set1_ps(v[kk]), v1 = _mm512_set1_ps(v[4 + kk]);
        const __m512 v2 = _mm512_set1_ps(v[8 + kk]), v3 = _mm512_set1_ps(v[12 + kk]);
        a00 = _mm512_fmadd_ps(v0, x0, a00);
        a10 = _mm512_fmadd_ps(v1, x0, a10);
        a20 = _mm512_fmadd_ps(v2, x0, a20);
        a30 = _mm512_fmadd_ps(v3, x0, a30);
        if (two) {
          a01 = _mm512_fmadd_ps(v0, x1, a01);
          a11 = _mm512_fmadd_ps(v1, x1, a11);
          a21 = _mm512_fmadd_ps(v2, x1, a21);
          a31 = _mm512_fmadd_ps(v3, x1, a31);
        }
      }
    }
    const __m512 lo[4] = {a00, a10, a20, a30}, hi[4] = {a01, a11, a21, a31};
    for (int rr = 0; rr < kBlock && b * kBlock + rr < w.n; ++rr) {
      const int64_t r = b * kBlock + rr;
      store_column(y + r, ldy, mc, lo[rr], hi[rr], bias ? bias[r] : 0.0f);
    }
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

template <int MC>
void backward_x_rows(const Matrix& w, const float* dyt, float* dxt, int64_t r0, int64_t r1) {
  constexpr bool two = MC == 32;
  for (int64_t r = r0; r < r1; ++r) {
    const __m512 d0 = _mm512_loadu_ps(dyt + r * MC);
    const __m512 d1 = two ? _mm512_loadu_ps(dyt + r * MC + 16) : d0;
    for (int64_t j = w.row_ptr[r]; j < w.row_ptr[r + 1]; ++j) {
      float* xr = dxt + col_at(w, j) * MC;
      const __m512 v = _mm512_set1_ps(w.values[j]);
      _mm512_storeu_ps(xr, _mm512_fmadd_ps(v, d0, _mm512_loadu_ps(xr)));
      if (two) _mm512_storeu_ps(xr + 16, _mm512_fmadd_ps(v, d1, _mm512_loadu_ps(xr + 16)));
    }
  }
}

void backward_x(const Matrix& w, const float* dyt, int mc_pad, float* dxt, int64_t r0, int64_t r1) {
  if (mc_pad == 32)
    backward_x_rows<32>(w, dyt, dxt, r0, r1);
  else if (mc_pad == 16)
    backward_x_rows<16>(w, dyt, dxt, r0, r1);
  else
    backward_x_generic(w, dyt, mc_pad, dxt, r0, r1);
}

template <int MC>
void sddmm_rows(const Matrix& w, const float* dyt, const float* xt, float* dv, int64_t r0,
                int64_t r1) {
  constexpr bool two = MC == 32;
  for (int64_t r = r0; r < r1; ++r) {
    const __m512 d0 = _mm512_loadu_ps(dyt + r * MC);
    const __m512 d1 = two ? _mm512_loadu_ps(dyt + r * MC + 16) : _mm512_setzero_ps();
    for (int64_t j = w.row_ptr[r]; j < w.row_ptr[r + 1]; ++j) {
      const float* xr = xt + col_at(w, j) * MC;
      __m512 p = _mm512_mul_ps(d0, _mm512_loadu_ps(xr));
      if (two) p = _mm512_fmadd_ps(d1, _mm512_loadu_ps(xr + 16), p);
      dv[j] += _mm512_reduce_add_ps(p);
    }
  }
}

void sddmm(const Matrix& w, const float* dyt, const float* xt, int mc_pad, float* dv, int64_t r0,
           int64_t r1) {
  if (mc_pad == 32)
    sddmm_rows<32>(w, dyt, xt, dv, r0, r1);
  else if (mc_pad == 16)
    sddmm_rows<16>(w, dyt, xt, dv, r0, r1);
  else
    sddmm_generic(w, dyt, xt, mc_pad, dv, r0, r1);
}

}  // namespace

const Kernels* kernels_avx512() {
  static const Kernels table{.forward = &forward, .backward_x = &backward_x, .sddmm = &sddmm};
  return &table;
}

}  // namespace sparse
}  // namespace pk
