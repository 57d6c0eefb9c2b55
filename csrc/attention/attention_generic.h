// The attention kernels, written once over GCC's vector extensions and
// compiled by each ISA file at its own width (4 floats portable, 8 AVX2, 16
// AVX-512); anonymous namespace, so each file keeps its own copy.
//
// Per (batch, head) the keys are packed transposed, kt [d][kpad], so that a
// block of scores is a small GEMM whose inner step is one vector load of kt
// per NV key vectors and one broadcast of q per row (no horizontal sums).
// Query rows go in blocks of R; keys in blocks of KC with the online
// (flash) softmax: a running max and sum per row, the output block rescaled
// when the max grows. At S <= KC that is exactly a two-pass softmax over a
// row of scores that stays in L1.
#pragma once
#include <cstdint>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "../common/vec.h"
#include "attention_isa.h"

namespace pk {
namespace attention {
namespace {

constexpr int R = 16;    // query rows per block
constexpr int KC = 256;  // keys per block (scores R x KC: 16 KiB)
constexpr float kLog2e = 1.4426950408889634f;

template <int W>
struct Simd {
  using V = typename VecTypes<W>::V;
  using I = typename VecTypes<W>::I;

  static V load(const float* p) {
    V v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
  }
  static void store(float* p, V v) { __builtin_memcpy(p, &v, sizeof v); }
  // Not V{} + x: 0.0f + x is a real addition under IEEE rules (-0.0f + 0.0f
  // is +0.0f), which GCC then emits before every broadcast of the hot loops;
  // x - 0.0f is x exactly, so this is a plain broadcast.
  static V splat(float x) { return x - V{}; }
  static V vmax(V a, V b) { return a > b ? a : b; }
  // Horizontal reductions as a tree of half-width vectors: a scalar chain of
  // W dependent adds per row cost as much as the row's exp at D = 32.
  static float hmax(V v) {
    if constexpr (W == 4) {
      const float a = v[0] > v[2] ? v[0] : v[2], b = v[1] > v[3] ? v[1] : v[3];
      return a > b ? a : b;
    } else {
      using H = Simd<W / 2>;
      return H::hmax(H::vmax(lo_half(v), hi_half(v)));
    }
  }
  static float hsum(V v) {
    if constexpr (W == 4) {
      return (v[0] + v[2]) + (v[1] + v[3]);
    } else {
      using H = Simd<W / 2>;
      return H::hsum(lo_half(v) + hi_half(v));
    }
  }
  // Not memcpy: taking the address of a vector kept the row sum of the exp
  // loop on the stack, a store-to-load chain through every iteration.
  static typename VecTypes<W / 2>::V lo_half(V v) {
    if constexpr (W == 16) return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
    if constexpr (W == 8) return __builtin_shufflevector(v, v, 0, 1, 2, 3);
    if constexpr (W == 4) return __builtin_shufflevector(v, v, 0, 1);
  }
  static typename VecTypes<W / 2>::V hi_half(V v) {
    if constexpr (W == 16) return __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    if constexpr (W == 8) return __builtin_shufflevector(v, v, 4, 5, 6, 7);
    if constexpr (W == 4) return __builtin_shufflevector(v, v, 2, 3);
  }

  // dst[c * ldd + i] = src[i * lds + c] for a W x W block: log2(W) rounds of
  // interleaving row i with row i + W/2 (a perfect shuffle of the index bits
  // each round), W two-source permutes a round. The scalar transpose of the
  // keys cost 9% of a head at D = 32.
  static void transpose(const float* src, int64_t lds, float* dst, int64_t ldd) {
    I lo, hi;
    for (int i = 0; i < W; ++i) {
      lo[i] = i % 2 == 0 ? i / 2 : W + i / 2;
      hi[i] = lo[i] + W / 2;
    }
    V r[W], t[W];
#pragma GCC unroll 16
    for (int i = 0; i < W; ++i) r[i] = load(src + i * lds);
#pragma GCC unroll 4
    for (int round = 1; round < W; round *= 2) {
#pragma GCC unroll 8
      for (int i = 0; i < W / 2; ++i) {
        t[2 * i] = __builtin_shuffle(r[i], r[i + W / 2], lo);
        t[2 * i + 1] = __builtin_shuffle(r[i], r[i + W / 2], hi);
      }
#pragma GCC unroll 16
      for (int i = 0; i < W; ++i) r[i] = t[i];
    }
#pragma GCC unroll 16
    for (int i = 0; i < W; ++i) store(dst + i * ldd, r[i]);
  }

  // 2^x for x <= 0 (what softmax needs after subtracting the max), NaN
  // propagating, exactly 0 for -inf (masked scores) and far below (under
  // 2^-127 here, 2^-150 with AVX-512). Cephes' exp2f polynomial on
  // [-0.5, 0.5]: relative error <= 1.7e-7 (about 2 ulp; the tests measure it).
  static V exp2_neg(V x) {
#ifdef __AVX512F__
    if constexpr (W == 16) {
      // vscalefps forms p * 2^f in one instruction, and below -150 it gives
      // exactly 0: max(lo, x) keeps a NaN x (the second operand wins), and
      // -inf clamps to -160, whose 2^f underflows to 0.
      const __m512 xc = _mm512_max_ps(_mm512_set1_ps(-160.0f), x);
      const __m512 f = _mm512_roundscale_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      return _mm512_scalef_ps(poly(V(xc) - V(f)), f);
    }
#endif
    // Clamped at -127, whose exponent field (f + 127 = 0) makes 2^f exactly
    // 0: masked -inf scores give 0 without a select. A NaN x fails the
    // comparison and stays NaN.
    const V lo = splat(-127.0f);
    const V xc = x < lo ? lo : x;
    const V magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
    const V f = (xc + magic) - magic;
    const I e = (__builtin_convertvector(f, I) + 127) << 23;
    return poly(xc - f) * __builtin_bit_cast(V, e);
  }
  // 2^r on [-0.5, 0.5] (Cephes' exp2f polynomial).
  static V poly(V r) {
    V p = splat(1.535336188319500e-4f);
    p = p * r + 1.339887440266574e-3f;
    p = p * r + 9.618437357674640e-3f;
    p = p * r + 5.550332471162809e-2f;
    p = p * r + 2.402264791363012e-1f;
    p = p * r + 6.931472028550421e-1f;
    return p * r + 1.0f;
  }
  static float exp2_scalar(float x) { return exp2_neg(splat(x))[0]; }
};

// Per-ISA shapes of the register tiles: scores MR x (NV * W), output rows
// with at most ACC vector accumulators.
template <int W, int QK_MR, int QK_NV, int ACC>
struct Attention {
  using S = Simd<W>;
  using V = typename S::V;
  static constexpr int KW = QK_NV * W;  // keys per score tile

  static int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

  // s[r][0 .. KW) = q[r] . kt[:, 0 .. KW) for MR rows, q packed transposed
  // (qt[c * R + r]): each broadcast is then at a fixed offset from one
  // pointer, where row pointers cost a load of the pointer per broadcast.
  template <int MR>
  static void qk_tile(const float* qt, const float* kt, int64_t ldkt, int64_t d, float* s,
                      int64_t lds) {
    V acc[MR][QK_NV];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int n = 0; n < QK_NV; ++n) acc[r][n] = V{};
    for (int64_t c = 0; c < d; ++c) {
      V kv[QK_NV];
#pragma GCC unroll 4
      for (int n = 0; n < QK_NV; ++n) kv[n] = S::load(kt + c * ldkt + n * W);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const V qb = S::splat(qt[c * R + r]);
#pragma GCC unroll 4
        for (int n = 0; n < QK_NV; ++n) acc[r][n] += qb * kv[n];
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int n = 0; n < QK_NV; ++n) S::store(s + r * lds + n * W, acc[r][n]);
  }

  // qt[c * R + r] = q row ib + r (the last row repeated past `rows`) times
  // scale, for all R rows of a block.
  static void pack_q(const float* q, int64_t ldq, int64_t rows, int64_t d, float scale, float* qt) {
    if (rows == R && R % W == 0 && d % W == 0) {
      for (int64_t c = 0; c < d; c += W)
        for (int r = 0; r < R; r += W) S::transpose(q + r * ldq + c, ldq, qt + c * R + r, R);
      const V vs = S::splat(scale);
      for (int64_t i = 0; i < d * R; i += W) S::store(qt + i, S::load(qt + i) * vs);
      return;
    }
    for (int r = 0; r < R; ++r) {
      const float* row = q + (r < rows ? r : rows - 1) * ldq;
      for (int64_t c = 0; c < d; ++c) qt[c * R + r] = row[c] * scale;
    }
  }

  // o[r][0 .. NV * W) += sum_j p[r][j] v[j][0 .. NV * W) for MR rows.
  template <int MR, int NV>
  static void pv_tile(const float* p, int64_t ldp, const float* v, int64_t ldv, int64_t nk,
                      float* o, int64_t ldo) {
    V acc[MR][NV];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int n = 0; n < NV; ++n) acc[r][n] = S::load(o + r * ldo + n * W);
    for (int64_t j = 0; j < nk; ++j) {
      V vj[NV];
#pragma GCC unroll 4
      for (int n = 0; n < NV; ++n) vj[n] = S::load(v + j * ldv + n * W);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const V pb = S::splat(p[r * ldp + j]);
#pragma GCC unroll 4
        for (int n = 0; n < NV; ++n) acc[r][n] += pb * vj[n];
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int n = 0; n < NV; ++n) S::store(o + r * ldo + n * W, acc[r][n]);
  }

  static constexpr int pv_mr(int nv) {
    int mr = 1;
    while (mr * 2 <= 8 && mr * 2 * nv <= ACC) mr *= 2;
    return mr;
  }

  // All R rows (rows past the block's end compute garbage nobody reads).
  template <int NV>
  static void pv_rows(const float* p, const float* v, int64_t ldv, int64_t nk, float* o,
                      int64_t ldo) {
    constexpr int MR = pv_mr(NV);
    for (int r = 0; r < R; r += MR) pv_tile<MR, NV>(p + r * KC, KC, v, ldv, nk, o + r * ldo, ldo);
  }

  static void pv_block(const float* p, const float* v, int64_t ldv, int64_t nk, float* o,
                       int64_t dvp) {
    int64_t c = 0;
    if constexpr (W >= 8) {
      // Two vectors of columns by more rows (4 AVX2, 8 AVX-512) rather than
      // four by fewer: measured 17-22% less time for the whole head on AVX2
      // at D = 32 and 64, the same on AVX-512 at 64 and 5% less at 128. The
      // portable tier is 3% slower so, and keeps four.
      for (; c + 2 * W <= dvp; c += 2 * W) pv_rows<2>(p, v + c, ldv, nk, o + c, dvp);
    }
    for (; c + 4 * W <= dvp; c += 4 * W) pv_rows<4>(p, v + c, ldv, nk, o + c, dvp);
    switch ((dvp - c) / W) {
      case 3:
        pv_rows<3>(p, v + c, ldv, nk, o + c, dvp);
        break;
      case 2:
        pv_rows<2>(p, v + c, ldv, nk, o + c, dvp);
        break;
      case 1:
        pv_rows<1>(p, v + c, ldv, nk, o + c, dvp);
        break;
      default:
        break;
    }
  }

  // One row of a score block: scale and mask it, fold it into the row's
  // running max m and sum l, turn it into probabilities in place (zeros from
  // vr to jw) and rescale the row's output accumulators if the max grew.
  // The scores come scaled (q was packed times the scale). Without a mask
  // they and m are in base 2 (the scale includes log2 e), so the exp pass is
  // a subtraction and the polynomial. With one they stay in base e until the
  // max is subtracted: Hugging Face's finfo.min times log2 e would overflow
  // to -inf, and a row of it must average v (as in SDPA), not count as
  // fully masked.
  static void softmax_row(float* s, int64_t vr, int64_t jw, const float* mrow, float* m, float* l,
                          float* o, int64_t dvp) {
    const float ninf = -__builtin_inff();
    V mx = S::splat(ninf);
    int64_t j = 0;
    if (mrow) {
      for (; j + W <= vr; j += W) {
        const V t = S::load(s + j) + S::load(mrow + j);
        S::store(s + j, t);
        mx = S::vmax(mx, t);
      }
    } else {
      for (; j + W <= vr; j += W) mx = S::vmax(mx, S::load(s + j));
    }
    float mb = S::hmax(mx);
    for (; j < vr; ++j) {
      const float t = s[j] + (mrow ? mrow[j] : 0.0f);
      s[j] = t;
      mb = t > mb ? t : mb;
    }
    const float mo = *m;
    const float mn = mb > mo ? mb : mo;
    // A row with nothing unmasked yet: exp(-inf - 0) = 0, never -inf - -inf.
    const float mu = mn == ninf ? 0.0f : mn;
    const V vmu = S::splat(mu);
    const float unit = mrow ? kLog2e : 1.0f;
    const V vunit = S::splat(unit);
    V sum = V{};
    j = 0;
    if (mrow) {
      for (; j + W <= vr; j += W) {
        const V e = S::exp2_neg((S::load(s + j) - vmu) * vunit);
        S::store(s + j, e);
        sum += e;
      }
    } else {
      for (; j + W <= vr; j += W) {
        const V e = S::exp2_neg(S::load(s + j) - vmu);
        S::store(s + j, e);
        sum += e;
      }
    }
    if (j < vr) {
      float tail[W];
      for (int i = 0; i < W; ++i) tail[i] = j + i < vr ? s[j + i] : ninf;
      const V e = S::exp2_neg((S::load(tail) - vmu) * vunit);
      for (int64_t i = 0; j + i < vr; ++i) s[j + i] = e[i];
      sum += e;
      j = vr;
    }
    for (j = vr < 0 ? 0 : vr; j < jw; ++j) s[j] = 0.0f;
    const float alpha = S::exp2_scalar((mo - mu) * unit);
    *l = *l * alpha + S::hsum(sum);
    *m = mn;
    if (alpha != 1.0f) {
      const V va = S::splat(alpha);
      for (int64_t c = 0; c < dvp; c += W) S::store(o + c, S::load(o + c) * va);
    }
  }

  static int64_t scratch_floats(const Problem& p) {
    const int64_t kpad = round_up(p.sk, KW);
    const int64_t dvp = round_up(p.dv, W);
    return p.d * kpad + kpad * dvp + R * KC + R * dvp + 2 * R + R * p.d;
  }

  static void zero_rows(float* out, int64_t ld, int64_t i0, int64_t i1, int64_t dv) {
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t c = 0; c < dv; ++c) out[i * ld + c] = 0.0f;
  }

  static void head(const Problem& p, int64_t b, int64_t h, int64_t i0, int64_t i1, float* scratch) {
    auto clamp = [](int64_t x, int64_t hi) { return x < 0 ? 0 : (x > hi ? hi : x); };
    const int64_t n = p.kv_len ? clamp(p.kv_len[b], p.sk) : p.sk;
    const int64_t nq = p.q_len ? clamp(p.q_len[b], p.sq) : p.sq;
    float* out = p.out + b * p.ov.sb + h * p.ov.sh;
    const int64_t ldo = p.ov.ss;
    const int64_t ie = i1 < nq ? i1 : nq;
    if (ie < i1) zero_rows(out, ldo, ie > i0 ? ie : i0, i1, p.dv);
    if (i0 >= ie) return;
    const int64_t kmax = p.causal ? (n < ie ? n : ie) : n;
    if (kmax == 0) {
      zero_rows(out, ldo, i0, ie, p.dv);
      return;
    }
    const int64_t d = p.d, dv = p.dv, dvp = round_up(dv, W);
    const int64_t kpad = round_up(kmax, KW);
    float* kt = scratch;
    float* vpack = kt + d * round_up(p.sk, KW);
    float* sblk = vpack + round_up(p.sk, KW) * dvp;
    float* oblk = sblk + R * KC;
    float* mrow = oblk + R * dvp;
    float* lrow = mrow + R;
    float* qt = lrow + R;

    const float* k = p.k + b * p.kv.sb + h * p.kv.sh;
    const int64_t jfull = kmax / W * W, cfull = d / W * W;
    for (int64_t j = 0; j < jfull; j += W)
      for (int64_t c = 0; c < cfull; c += W)
        S::transpose(k + j * p.kv.ss + c, p.kv.ss, kt + c * kpad + j, kpad);
    for (int64_t j = 0; j < kmax; ++j)
      for (int64_t c = j < jfull ? cfull : 0; c < d; ++c) kt[c * kpad + j] = k[j * p.kv.ss + c];
    for (int64_t c = 0; c < d; ++c)
      for (int64_t j = kmax; j < kpad; ++j) kt[c * kpad + j] = 0.0f;
    const float* v = p.v + b * p.vv.sb + h * p.vv.sh;
    int64_t ldv = p.vv.ss;
    if (dv != dvp) {  // pad rows to whole vectors
      for (int64_t j = 0; j < kmax; ++j)
        for (int64_t c = 0; c < dvp; ++c) vpack[j * dvp + c] = c < dv ? v[j * ldv + c] : 0.0f;
      v = vpack;
      ldv = dvp;
    }
    const float* q = p.q + b * p.qv.sb + h * p.qv.sh;
    const float* mbase = p.mask ? p.mask + b * p.mv.sb + h * p.mv.sh : nullptr;
    const float scale = p.mask ? p.scale : p.scale * kLog2e;

    for (int64_t ib = i0; ib < ie; ib += R) {
      const int64_t rows = ie - ib < R ? ie - ib : R;
      pack_q(q + ib * p.qv.ss, p.qv.ss, rows, d, scale, qt);
      for (int r = 0; r < R; ++r) {
        mrow[r] = -__builtin_inff();
        lrow[r] = 0.0f;
      }
      for (int64_t c = 0; c < R * dvp; ++c) oblk[c] = 0.0f;
      const int64_t kend = p.causal ? (n < ib + rows ? n : ib + rows) : n;
      for (int64_t j0 = 0; j0 < kend; j0 += KC) {
        const int64_t jw = kend - j0 < KC ? kend - j0 : KC;
        const int64_t jwp = round_up(jw, KW);
        for (int r = 0; r < R; r += QK_MR)
          for (int64_t kc = 0; kc < jwp; kc += KW)
            qk_tile<QK_MR>(qt + r, kt + j0 + kc, kpad, d, sblk + r * KC + kc, KC);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = ib + r;
          int64_t vr = jw;
          if (p.causal && i + 1 - j0 < vr) vr = i + 1 - j0;
          softmax_row(sblk + r * KC, vr, jw, mbase ? mbase + i * p.mv.ss + j0 : nullptr, mrow + r,
                      lrow + r, oblk + r * dvp, dvp);
        }
        pv_block(sblk, v + j0 * ldv, ldv, jw, oblk, dvp);
      }
      for (int64_t r = 0; r < rows; ++r) {
        float* orow = out + (ib + r) * ldo;
        const float* acc = oblk + r * dvp;
        const float lr = lrow[r];
        // l == 0: every key masked; torch's SDPA gives zeros there too.
        const float inv = lr == 0.0f ? 0.0f : 1.0f / lr;
        const V vi = S::splat(inv);
        int64_t c = 0;
        for (; c + W <= dv; c += W) S::store(orow + c, S::load(acc + c) * vi);
        for (; c < dv; ++c) orow[c] = lr == 0.0f ? 0.0f : acc[c] * inv;
      }
    }
  }

  static const Kernels* table() {
    static const Kernels t{.scratch_floats = &scratch_floats, .head = &head};
    return &t;
  }
};

}  // namespace
}  // namespace attention
}  // namespace pk
