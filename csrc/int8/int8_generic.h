// The int8 kernels written once in plain C++ and compiled per ISA file with
// that file's flags (the portable and AVX2 builds use all of it, the AVX-512
// build only the weight-only kernel). Everything is in an anonymous
// namespace: each ISA file gets its own copy and no flagged copy can leak
// into another file.
#pragma once
#include <cstdint>

#include "../common/dot4.h"
#include "../common/half.h"
#include "int8_grid7.h"
#include "int8_isa.h"

namespace pk {
namespace int8 {
namespace {

inline float load_f(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::f16:
      return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case DType::bf16:
      return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

inline void store_f(void* p, DType t, int64_t i, float v) {
  switch (t) {
    case DType::f16:
      static_cast<uint16_t*>(p)[i] = f32_to_f16(v);
      break;
    case DType::bf16:
      static_cast<uint16_t*>(p)[i] = f32_to_bf16(v);
      break;
    default:
      static_cast<float*>(p)[i] = v;
  }
}

// The packed GEMM epilogue for one element (acc already has comp removed).
inline void store_out(const PackedGemm& g, int64_t row, int64_t col, int32_t acc) {
  if (!g.a_scale) {
    static_cast<int32_t*>(g.c)[row * g.ldc + col] = acc;
    return;
  }
  float v = float(acc) * (g.a_scale[row] * g.b_scale[col]);
  if (g.bias) v += g.bias[col];
  store_f(g.c, g.yt, row * g.ldc + col, v);
}

// Row-major operands, no packing: plain dot products widened to int32.
[[maybe_unused]] void gemm_rowmajor_generic(const int8_t* a, const int8_t* b, int32_t* c,
                                            int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                                            int64_t k, int64_t lda, int64_t ldb, int64_t ldc) {
  for (int64_t i = m0; i < m1; ++i) {
    const int8_t* ai = a + i * lda;
    for (int64_t j = n0; j < n1; ++j) {
      const int8_t* bj = b + j * ldb;
      int32_t s = 0;
      for (int64_t p = 0; p < k; ++p) s += int32_t(ai[p]) * int32_t(bj[p]);
      c[i * ldc + j] = s;
    }
  }
}

template <int MR>
void packed_tile_generic(const PackedGemm& g, int64_t i0, int64_t p) {
  // With a biased to unsigned, the running sum can pass 2^31 before comp is
  // subtracted; unsigned arithmetic wraps where signed would be undefined,
  // and the final difference is exact (it fits int32 whenever K < kMaxK).
  uint32_t acc[MR][16] = {};
  int64_t gs;
  const int8_t* b = panel_base(g.b, g.kp, packed_n(g.n), p, &gs);
  for (int64_t q = 0; q < g.kp / 4; ++q) {
    const int8_t* bq = b + q * gs;
    for (int i = 0; i < MR; ++i) {
      const uint8_t* aq = g.a + (i0 + i) * g.lda + 4 * q;
      for (int j = 0; j < 16; ++j)
        acc[i][j] += uint32_t(int32_t(aq[0]) * bq[4 * j] + int32_t(aq[1]) * bq[4 * j + 1] +
                              int32_t(aq[2]) * bq[4 * j + 2] + int32_t(aq[3]) * bq[4 * j + 3]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 16 && p * 16 + j < g.n; ++j)
      store_out(g, i0 + i, p * 16 + j, int32_t(acc[i][j] - uint32_t(g.comp[p * 16 + j])));
}

[[maybe_unused]] void gemm_packed_generic(const PackedGemm& g, int64_t m0, int64_t m1, int64_t p0,
                                          int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    int64_t i = m0;
    for (; i + 4 <= m1; i += 4) packed_tile_generic<4>(g, i, p);
    for (; i < m1; ++i) packed_tile_generic<1>(g, i, p);
  }
}

[[maybe_unused]] void pack_generic(const int8_t* w, int64_t n, int64_t k, int64_t ldw,
                                   int8_t* packed, int32_t* comp, int64_t p0, int64_t p1) {
  const int64_t kp = packed_k(k), np = packed_n(n);
  for (int64_t p = p0; p < p1; ++p) {
    int64_t gs;
    int8_t* base = const_cast<int8_t*>(panel_base(packed, kp, np, p, &gs));
    for (int j = 0; j < 16; ++j) {
      const int64_t row = p * 16 + j;
      int32_t sum = 0;
      for (int64_t q = 0; q < kp / 4; ++q)
        for (int i = 0; i < 4; ++i) {
          const int64_t c = 4 * q + i;
          const int8_t v = (row < n && c < k) ? w[row * ldw + c] : int8_t(0);
          base[q * gs + 4 * j + i] = v;
          sum += v;
        }
      comp[row] = 128 * sum;
    }
  }
}

inline float abs_f(float v) { return v < 0.0f ? -v : v; }

[[maybe_unused]] void quantize_u8_generic(const void* x, DType xt, int64_t ldx, int64_t k,
                                          uint8_t* q, int64_t ldq, float* scale, int64_t r0,
                                          int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    float amax = 0.0f;
    bool nan = false;
    for (int64_t c = 0; c < k; ++c) {
      const float v = load_f(x, xt, r * ldx + c);
      nan |= v != v;
      amax = amax < abs_f(v) ? abs_f(v) : amax;
    }
    const float s = nan ? __builtin_nanf("") : amax / 127.0f;
    scale[r] = s;
    uint8_t* qr = q + r * ldq;
    const bool usable = s > 0.0f && s <= 3.4028234663852886e38f;  // not 0, NaN or inf
    for (int64_t c = 0; c < k; ++c) {
      float v = usable ? __builtin_nearbyintf(load_f(x, xt, r * ldx + c) / s) : 0.0f;
      v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
      qr[c] = uint8_t(int32_t(v) + 128);
    }
    for (int64_t c = k; c < ldq; ++c) qr[c] = 128;
  }
}

// Rows [r0, r1) quantized as quantize_per_row7, stored as q + 128 (Zp false:
// the biased format of the VNNI and portable kernels) or as q + zp with zp
// written (Zp true). Padding to ldq adds nothing in either (q = 0 or zero
// weights).
template <bool Zp>
void quantize7_generic(const void* x, DType xt, int64_t ldx, int64_t k, uint8_t* q, int64_t ldq,
                       float* scale, int32_t* zp, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    float lo = 0.0f, hi = 0.0f;
    bool nan = false;
    for (int64_t c = 0; c < k; ++c) {
      const float v = load_f(x, xt, r * ldx + c);
      nan |= v != v;
      lo = v < lo ? v : lo;
      hi = v > hi ? v : hi;
    }
    const Grid7 g = grid7(lo, hi, nan);
    scale[r] = g.scale;
    if (Zp) zp[r] = g.zp;
    const int32_t off = Zp ? g.zp : 128;
    uint8_t* qr = q + r * ldq;
    for (int64_t c = 0; c < k; ++c)
      qr[c] = uint8_t((g.usable ? q7(load_f(x, xt, r * ldx + c), g) : 0) + off);
    for (int64_t c = k; c < ldq; ++c) qr[c] = uint8_t(off);
  }
}

// Four output columns at a time so each load of x serves four weight rows.
// With one or two rows of x the int8 weight is converted as it streams by;
// with more, each block of four weight rows is converted to fp32 once (into
// `wf`, 4 * k floats) and a 4 x 4 tile of dot products reuses it for every
// four rows of x.
[[maybe_unused]] void weight_only_generic(const float* x, int64_t m, int64_t k, const int8_t* w,
                                          const float* w_scale, const float* bias, void* y,
                                          DType yt, int64_t n, int64_t n0, int64_t n1, float* wf) {
  for (int64_t j = n0; j < n1; j += 4) {
    const int nj = int(n1 - j < 4 ? n1 - j : 4);
    // Rows past n1 repeat row j (in bounds) and are never stored.
    const int8_t* w0 = w + j * k;
    const int8_t* w1 = nj > 1 ? w0 + k : w0;
    const int8_t* w2 = nj > 2 ? w0 + 2 * k : w0;
    const int8_t* w3 = nj > 3 ? w0 + 3 * k : w0;
    auto finish = [&](int64_t i, const float* s) {
      for (int t = 0; t < nj; ++t) {
        float v = s[t] * w_scale[j + t];
        if (bias) v += bias[j + t];
        store_f(y, yt, i * n + j + t, v);
      }
    };
    if (m <= 2) {
      for (int64_t i = 0; i < m; ++i) {
        float s[4];
        dot4(x + i * k, w0, w1, w2, w3, k, s);
        finish(i, s);
      }
      continue;
    }
    float* f0 = wf;
    float* f1 = wf + k;
    float* f2 = wf + 2 * k;
    float* f3 = wf + 3 * k;
#pragma omp simd
    for (int64_t p = 0; p < k; ++p) {
      f0[p] = float(w0[p]);
      f1[p] = float(w1[p]);
      f2[p] = float(w2[p]);
      f3[p] = float(w3[p]);
    }
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) {
      const float* xa = x + i * k;
      const float* xb = xa + k;
      const float* xc = xa + 2 * k;
      const float* xd = xa + 3 * k;
      float a0 = 0, a1 = 0, a2 = 0, a3 = 0, b0 = 0, b1 = 0, b2 = 0, b3 = 0;
      float c0 = 0, c1 = 0, c2 = 0, c3 = 0, d0 = 0, d1 = 0, d2 = 0, d3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, d0, d1, d2, d3)
      for (int64_t p = 0; p < k; ++p) {
        a0 += xa[p] * f0[p], a1 += xa[p] * f1[p], a2 += xa[p] * f2[p], a3 += xa[p] * f3[p];
        b0 += xb[p] * f0[p], b1 += xb[p] * f1[p], b2 += xb[p] * f2[p], b3 += xb[p] * f3[p];
        c0 += xc[p] * f0[p], c1 += xc[p] * f1[p], c2 += xc[p] * f2[p], c3 += xc[p] * f3[p];
        d0 += xd[p] * f0[p], d1 += xd[p] * f1[p], d2 += xd[p] * f2[p], d3 += xd[p] * f3[p];
      }
      const float sa[4] = {a0, a1, a2, a3}, sb[4] = {b0, b1, b2, b3};
      const float sc[4] = {c0, c1, c2, c3}, sd[4] = {d0, d1, d2, d3};
      finish(i, sa);
      finish(i + 1, sb);
      finish(i + 2, sc);
      finish(i + 3, sd);
    }
    for (; i < m; ++i) {
      float s[4];
      dot4(x + i * k, f0, f1, f2, f3, k, s);
      finish(i, s);
    }
  }
}

}  // namespace
}  // namespace int8
}  // namespace pk
