// The fused epilogue of the int8 linear (activation, then residual add) over
// a block of fp32 outputs, written once over GCC's vector extensions and
// compiled by each ISA file at its own width: 4 floats (portable, Arm), 8
// (AVX2), 16 (AVX-512). The driver runs it on the block a thread has just
// written, while that block is still in its cache, so the activation costs no
// extra pass over memory (the unfused path writes y, reads it for GELU, writes
// it again, and reads it once more for the residual add).
//
// Accuracy against the exact functions (tests measure it): exp <= 2 ulp; erf
// <= 4e-7 absolute (Eigen's fast_erf rational approximation); GELU-tanh's
// tanh <= 3e-7 absolute. NaN in
// gives NaN out for every activation (ReLU included, as torch.relu).
#pragma once
#include <cstdint>

#include "../common/vec.h"
#include "int8_isa.h"

namespace pk {
namespace int8 {
namespace {

template <int W>
struct EpilogueMath {
  using V = typename VecTypes<W>::V;
  using I = typename VecTypes<W>::I;

  static V splat(float x) { return V{} + x; }
  // Clamps that keep NaN (a comparison with NaN is false, so x is kept).
  static V at_least(V x, float lo) { return x < lo ? splat(lo) : x; }
  static V at_most(V x, float hi) { return x > hi ? splat(hi) : x; }

  // e^x: 2^(x log2 e) split into 2^f (exponent bits) and 2^r, r in [-0.5,
  // 0.5] (Cephes' exp2f polynomial). x is clamped to [-87, 88]: below, e^x
  // is under the smallest normal float and 0 would do as well; above, the
  // result saturates at 1.6e38 instead of inf, which every caller here turns
  // into the right limit (1 / (1 + big) = 0).
  static V exp(V x) {
    const V t = at_most(at_least(x, -87.0f), 88.0f) * 1.4426950408889634f;
    const V magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
    const V f = (t + magic) - magic;
    const V r = t - f;
    V p = splat(1.535336188319500e-4f);
    p = p * r + 1.339887440266574e-3f;
    p = p * r + 9.618437357674640e-3f;
    p = p * r + 5.550332471162809e-2f;
    p = p * r + 2.402264791363012e-1f;
    p = p * r + 6.931472028550421e-1f;
    p = p * r + 1.0f;
    // f in [-126, 127] after the clamp; NaN makes garbage bits here, but p
    // is NaN then and so is the product.
    const I e = (__builtin_convertvector(f, I) + 127) << 23;
    V s;
    __builtin_memcpy(&s, &e, sizeof s);
    return p * s;
  }

  // erf(x), Eigen's generic_fast_erf_float: x * P(x^2) / Q(x^2) on [-4, 4]
  // (erf(+-4) rounds to +-1 in fp32).
  static V erf(V x) {
    const V xc = at_most(at_least(x, -4.0f), 4.0f);
    const V x2 = xc * xc;
    V p = splat(-2.72614225801306e-10f);
    p = p * x2 + 2.77068142495902e-08f;
    p = p * x2 + -2.10102402082508e-06f;
    p = p * x2 + -5.69250639462346e-05f;
    p = p * x2 + -7.34990630326855e-04f;
    p = p * x2 + -2.95459980854025e-03f;
    p = p * x2 + -1.60960333262415e-02f;
    p = p * xc;
    V q = splat(-1.45660718464996e-05f);
    q = q * x2 + -2.13374055278905e-04f;
    q = q * x2 + -1.68282697438203e-03f;
    q = q * x2 + -7.37332916720468e-03f;
    q = q * x2 + -1.42647390514189e-02f;
    return p / q;
  }

  static V act(V v, Act a) {
    switch (a) {
      case Act::relu:
        return v < 0.0f ? V{} : v;
      case Act::gelu:
        return 0.5f * v * (1.0f + erf(v * 0.7071067811865476f));
      case Act::gelu_tanh: {
        // tanh(u) = 1 - 2 / (e^(2u) + 1): exact limits at both ends.
        const V u = 0.7978845608028654f * (v + 0.044715f * v * v * v);
        return 0.5f * v * (2.0f - 2.0f / (exp(2.0f * u) + 1.0f));
      }
      case Act::silu:
        return v / (1.0f + exp(-v));
      default:
        return v;
    }
  }

  static V load(const float* p) {
    V v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
  }
  static void store(float* p, V v) { __builtin_memcpy(p, &v, sizeof v); }

  // Gated: y[r, c0 .. c1) is whole 64-column blocks (32 gate, 32 up; see
  // Epilogue::gated); their products go to e.gated.
  static void apply_gated(const Epilogue& e, const float* y, int64_t ldy, int64_t m0, int64_t m1,
                          int64_t c0, int64_t c1) {
    static_assert(32 % W == 0, "a half block is whole vectors");
    for (int64_t r = m0; r < m1; ++r) {
      const float* yr = y + r * ldy;
      float* gr = e.gated + r * e.ldg;
      for (int64_t cb = c0; cb < c1; cb += 64) {
        const int64_t j0 = cb / 2, cnt = e.gated_n - j0 < 32 ? e.gated_n - j0 : 32;
        for (int64_t j = 0; j < cnt; j += W) {
          const V v = act(load(yr + cb + j), e.act) * load(yr + cb + 32 + j);
          if (j + W <= cnt) {
            store(gr + j0 + j, v);
          } else {
            float buf[W];
            store(buf, v);
            for (int64_t i = 0; j + i < cnt; ++i) gr[j0 + j + i] = buf[i];
          }
        }
      }
    }
  }

  // y[r, c0 .. c1) for rows [m0, m1): act, then + residual (if any).
  static void apply(const Epilogue& e, float* y, int64_t ldy, int64_t m0, int64_t m1, int64_t c0,
                    int64_t c1) {
    if (e.gated) return apply_gated(e, y, ldy, m0, m1, c0, c1);
    if (e.act == Act::none && !e.residual) return;
    for (int64_t r = m0; r < m1; ++r) {
      float* yr = y + r * ldy;
      const float* rr = e.residual ? e.residual + r * e.ldr : nullptr;
      int64_t c = c0;
      for (; c + W <= c1; c += W) {
        V v;
        __builtin_memcpy(&v, yr + c, sizeof v);
        v = act(v, e.act);
        if (rr) {
          V t;
          __builtin_memcpy(&t, rr + c, sizeof t);
          v += t;
        }
        __builtin_memcpy(yr + c, &v, sizeof v);
      }
      if (c < c1) {  // the tail through a padded vector
        float buf[W] = {};
        for (int64_t i = 0; c + i < c1; ++i) buf[i] = yr[c + i];
        V v;
        __builtin_memcpy(&v, buf, sizeof v);
        v = act(v, e.act);
        __builtin_memcpy(buf, &v, sizeof v);
        for (int64_t i = 0; c + i < c1; ++i) yr[c + i] = buf[i] + (rr ? rr[c + i] : 0.0f);
      }
    }
  }

  // The sum of a row's n values (tail through a zero-padded vector).
  template <class F>
  static float row_sum(const float* y, int64_t n, F f) {
    V acc{};
    int64_t c = 0;
    for (; c + W <= n; c += W) acc += f(load(y + c));
    if (c < n) {
      float buf[W] = {};
      for (int64_t i = 0; c + i < n; ++i) buf[i] = y[c + i];
      V t = f(load(buf));
      for (int64_t i = n - c; i < W; ++i) t[i] = 0.0f;  // f(0) need not be 0
      acc += t;
    }
    float s = 0.0f;
    for (int i = 0; i < W; ++i) s += acc[i];
    return s;
  }

  // Rows [m0, m1) of y (n columns) normalized in place by e.norm.
  static void norm_rows(const Epilogue& e, float* y, int64_t ldy, int64_t m0, int64_t m1,
                        int64_t n) {
    if (e.norm == Norm::none || n == 0) return;
    const float inv_n = 1.0f / float(n);
    for (int64_t r = m0; r < m1; ++r) {
      float* yr = y + r * ldy;
      float mean = 0.0f;
      if (e.norm == Norm::layer) mean = row_sum(yr, n, [](V v) { return v; }) * inv_n;
      const float var = row_sum(yr, n, [mean](V v) { return (v - mean) * (v - mean); }) * inv_n;
      const float rstd = 1.0f / __builtin_sqrtf(var + e.eps);
      const bool beta = e.beta && e.norm == Norm::layer;
      int64_t c = 0;
      for (; c + W <= n; c += W) {
        V v = (load(yr + c) - mean) * rstd;
        if (e.gamma) v *= load(e.gamma + c);
        if (beta) v += load(e.beta + c);
        store(yr + c, v);
      }
      for (; c < n; ++c) {
        float v = (yr[c] - mean) * rstd;
        if (e.gamma) v *= e.gamma[c];
        if (e.beta && e.norm == Norm::layer) v += e.beta[c];
        yr[c] = v;
      }
    }
  }
};

}  // namespace
}  // namespace int8
}  // namespace pk
