// The aarch64 cluster kernels, compiled by cluster_neon.cpp (Armv8-A) and
// cluster_dotprod.cpp (with SDOT): only the int8 dot product of the dynamic
// mode differs between them. The quantizer is the generic one.
//
// Weight-only mode: NEON has no float table lookup (no vpermps), but TBL
// looks 16 bytes up in a 16-byte table. A row's 16 fp32 entries are split
// into four byte planes (one VLD4 of the table: plane b holds byte b of
// each entry), four TBLs on one vector of 16 codes give the four bytes of 16
// weights, and two levels of ZIP put them back together: 12 instructions
// for 16 weights, against one vpermps per 16 on AVX-512. That is too dear to
// repeat for every tile of x, so four weight rows are decoded once into the
// thread's scratch, a block of K at a time (small enough to stay in L1), and
// tiles of four rows of x run over them as a dense product.
//
// Dynamic mode: one TBL looks 16 int8 weights up from the row's 16-byte
// int8 table, with the code bytes' nibbles as indices: low nibbles give the
// weights of x's bytes 0..63 of a group, high nibbles those of 64..127
// (dynamic_x_pos4), so codes and activations are both read in memory order.
//
// 8-bit codes run the same dense tiles over weights looked up from the row's
// 256-entry table: floats one at a time, int8 by TBL/TBX over 16 registers.
#pragma once
#include <arm_neon.h>

#include "cluster_generic.h"

namespace pk {
namespace cluster {
namespace {

// ---- Weight-only mode, 4-bit codes ------------------------------------------

// A row's table as byte planes: plane b, lane c = byte b of entry c (zero
// past nc, so a code >= nc reads 0).
inline uint8x16x4_t planes_of(const float* cb, int64_t nc) {
  float tab[16];
  for (int c = 0; c < 16; ++c) tab[c] = c < nc ? cb[c] : 0.0f;
  return vld4q_u8(reinterpret_cast<const uint8_t*>(tab));
}

// out[i] = table[c[i]] for the 16 codes of c (each < 16).
inline void lookup16(const uint8x16x4_t& t, uint8x16_t c, float* out) {
  const uint8x16_t b0 = vqtbl1q_u8(t.val[0], c), b1 = vqtbl1q_u8(t.val[1], c);
  const uint8x16_t b2 = vqtbl1q_u8(t.val[2], c), b3 = vqtbl1q_u8(t.val[3], c);
  // Bytes 0 and 1 of weights 0..7 (l01) and 8..15 (h01), then bytes 2, 3.
  const uint16x8_t l01 = vreinterpretq_u16_u8(vzip1q_u8(b0, b1));
  const uint16x8_t h01 = vreinterpretq_u16_u8(vzip2q_u8(b0, b1));
  const uint16x8_t l23 = vreinterpretq_u16_u8(vzip1q_u8(b2, b3));
  const uint16x8_t h23 = vreinterpretq_u16_u8(vzip2q_u8(b2, b3));
  vst1q_f32(out, vreinterpretq_f32_u16(vzip1q_u16(l01, l23)));
  vst1q_f32(out + 4, vreinterpretq_f32_u16(vzip2q_u16(l01, l23)));
  vst1q_f32(out + 8, vreinterpretq_f32_u16(vzip1q_u16(h01, h23)));
  vst1q_f32(out + 12, vreinterpretq_f32_u16(vzip2q_u16(h01, h23)));
}

// One weight row of 4-bit codes: decode() writes its weights for k in
// [kb, kb + kl) to w (kb a multiple of a group). A group's 64 code bytes are
// 16 lanes of four: VLD4 gathers byte b of every lane into one vector, whose
// low nibbles are the codes of k = 32 b + i and high nibbles those of
// 32 b + 16 + i (layout in cluster.h).
struct Row4 {
  const uint8_t* codes;
  uint8x16x4_t t;

  void init(const Args& a, int64_t row) {
    codes = a.codes + row * a.code_ld;
    t = planes_of(a.codebook + row * a.cb_ld, a.nc);
  }
  void decode(int64_t kb, int64_t kl, float* w) const {
    // Copies in registers: the stores through w, seen from here, might
    // overwrite *this (byte vectors alias anything), and the planes would be
    // reloaded after every store.
    const uint8x16x4_t t = this->t;
    const uint8_t* c = codes;
    const uint8x16_t low = vdupq_n_u8(15);
    for (int64_t p = 0; p < kl; p += kGroup4) {
      const uint8x16x4_t v = vld4q_u8(c + (kb + p) / 2);
      float part[kGroup4];  // the last group, past K: only its first kl - p weights are kept
      float* o = kl - p >= kGroup4 ? w + p : part;
#pragma GCC unroll 4
      for (int b = 0; b < 4; ++b) {
        lookup16(t, vandq_u8(v.val[b], low), o + 32 * b);
        lookup16(t, vshrq_n_u8(v.val[b], 4), o + 32 * b + 16);
      }
      if (o == part)
        for (int64_t q = 0; q < kl - p; ++q) w[p + q] = part[q];
    }
  }
};

// One weight row of 8-bit codes: a 256-entry float table (four of them are
// 4 KiB of stack), looked up one code at a time as the generic kernel does;
// what this tier adds for 8-bit codes is the dense tiles below.
struct Row8 {
  const uint8_t* codes;
  float tab[256];

  void init(const Args& a, int64_t row) {
    codes = a.codes + row * a.code_ld;
    const float* cb = a.codebook + row * a.cb_ld;
    for (int c = 0; c < 256; ++c) tab[c] = c < a.nc ? cb[c] : 0.0f;
  }
  void decode(int64_t kb, int64_t kl, float* w) const {
    for (int64_t p = 0; p < kl; ++p) w[p] = tab[codes[kb + p]];
  }
};

// Sums of four vectors in one: {sum a, sum b, sum c, sum d}.
inline float32x4_t hsum4(float32x4_t a, float32x4_t b, float32x4_t c, float32x4_t d) {
  return vpaddq_f32(vpaddq_f32(a, b), vpaddq_f32(c, d));
}

// Rows [i0, i0 + MR) of x, k in [kb, kb + kl), against the four decoded
// weight rows w[0..3] (rows past nj repeat row 0 and are not stored): MR x 4
// accumulators. The first block of K stores y = sum + bias, the others add.
template <int MR>
void dense_tile(const Args& a, const float* const (&w)[4], int64_t kb, int64_t kl, int64_t j,
                int nj, int64_t i0, bool first) {
  float32x4_t acc[MR][4];
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) acc[i][r] = vdupq_n_f32(0.0f);
  const float* x = a.x + i0 * a.ldx + kb;
  const int64_t ldx = a.ldx;
  int64_t p = 0;
  for (; p + 4 <= kl; p += 4) {
    const float32x4_t w0 = vld1q_f32(w[0] + p), w1 = vld1q_f32(w[1] + p);
    const float32x4_t w2 = vld1q_f32(w[2] + p), w3 = vld1q_f32(w[3] + p);
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) {
      const float32x4_t xv = vld1q_f32(x + i * ldx + p);
      acc[i][0] = vfmaq_f32(acc[i][0], xv, w0);
      acc[i][1] = vfmaq_f32(acc[i][1], xv, w1);
      acc[i][2] = vfmaq_f32(acc[i][2], xv, w2);
      acc[i][3] = vfmaq_f32(acc[i][3], xv, w3);
    }
  }
  for (int i = 0; i < MR; ++i) {
    float tail[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // k past the last whole vector: x is not read past K
    for (int64_t q = p; q < kl; ++q)
      for (int r = 0; r < 4; ++r) tail[r] += x[i * ldx + q] * w[r][q];
    float32x4_t s = vaddq_f32(hsum4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]), vld1q_f32(tail));
    float* y = a.y + (i0 + i) * a.n + j;
    if (nj == 4) {
      s = vaddq_f32(s, first ? (a.bias ? vld1q_f32(a.bias + j) : vdupq_n_f32(0.0f)) : vld1q_f32(y));
      vst1q_f32(y, s);
    } else {
      float t[4];
      vst1q_f32(t, s);
      for (int r = 0; r < nj; ++r) y[r] = t[r] + (first ? (a.bias ? a.bias[j + r] : 0.0f) : y[r]);
    }
  }
}

// K per block of decoded weights: four rows of 1024 floats are 16 KiB, which
// leave room in a 32 KiB L1 for the four rows of x read beside them.
constexpr int64_t kKBlock = 1024;

// Output columns [n0, n1), four at a time; wf holds 4 * min(K, kKBlock)
// floats of this thread's scratch (the driver gives 4 * K).
template <class Row>
void linear_rows(const Args& a, int64_t n0, int64_t n1, float* wf) {
  const int64_t ldw = a.k < kKBlock ? a.k : kKBlock;
  for (int64_t j = n0; j < n1; j += 4) {
    const int nj = int(n1 - j < 4 ? n1 - j : 4);
    Row rows[4];
    for (int r = 0; r < nj; ++r) rows[r].init(a, j + r);
    const float* const w[4] = {wf, wf + (nj > 1 ? ldw : 0), wf + (nj > 2 ? 2 * ldw : 0),
                               wf + (nj > 3 ? 3 * ldw : 0)};
    int64_t kb = 0;
    do {  // at least once: K = 0 still stores the bias
      const int64_t kl = a.k - kb < kKBlock ? a.k - kb : kKBlock;
      for (int r = 0; r < nj; ++r) rows[r].decode(kb, kl, wf + r * ldw);
      row_tiles<4>(a.m, [&](auto m, int64_t i) {
        dense_tile<decltype(m)::value>(a, w, kb, kl, j, nj, i, kb == 0);
      });
      kb += kl;
    } while (kb < a.k);
  }
}

void linear4(const Args& a, int64_t n0, int64_t n1, float* wf) { linear_rows<Row4>(a, n0, n1, wf); }
void linear8(const Args& a, int64_t n0, int64_t n1, float* wf) { linear_rows<Row8>(a, n0, n1, wf); }

// ---- Dynamic mode (int8), 4-bit codes ---------------------------------------

// acc += the 16 products w[i] * x[i], in int32 lanes (which lane holds which
// is the instruction's business: only the lanes' total is used). Without
// SDOT: SMULL and SMLAL2 give two products per int16 lane, which fit
// (|w|, |x| <= 127 after quantization), and SADALP widens them.
inline int32x4_t dot16(int32x4_t acc, int8x16_t w, int8x16_t x) {
#ifdef __ARM_FEATURE_DOTPROD
  return vdotq_s32(acc, w, x);
#else
  return vpadalq_s16(acc, vmlal_high_s8(vmull_s8(vget_low_s8(w), vget_low_s8(x)), w, x));
#endif
}

// Rows [i0, i0 + MR) x weight rows [j, j + nj) of y from the int32 sums
// (acc[i][r] summed over its lanes, plus tail[i][r]), dequantized, plus bias.
template <int MR>
inline void store_dyn(const DynArgs& a, const int32x4_t (&acc)[MR][4], const int32_t (&tail)[MR][4],
                      int64_t j, int nj, int64_t i0) {
  for (int i = 0; i < MR; ++i) {
    int32_t s[4];
    vst1q_s32(
        s, vaddq_s32(vpaddq_s32(vpaddq_s32(acc[i][0], acc[i][1]), vpaddq_s32(acc[i][2], acc[i][3])),
                     vld1q_s32(tail[i])));
    for (int r = 0; r < nj; ++r) {
      float v = float(s[r]) * (a.xs[i0 + i] * a.cs[(j + r) * a.cs_ld]);
      if (a.bias) v += a.bias[j + r];
      a.y[(i0 + i) * a.n + j + r] = v;
    }
  }
}

// Up to three rows of x against weight rows j .. j + 3 (rows past nj repeat
// row j and are not stored), the weights looked up as they are used: with so
// few rows, decoding into memory first would cost as much as it saves.
template <int MR>
void dyn_tile(const DynArgs& a, int64_t j, int nj, int64_t i0) {
  int8x16_t t[4];
  const uint8_t* c[4];
  for (int r = 0; r < 4; ++r) {
    const int64_t row = j + (r < nj ? r : 0);
    t[r] = vld1q_s8(a.cq + row * a.cq_ld);
    c[r] = a.codes + row * a.code_ld;
  }
  int32x4_t acc[MR][4];
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) acc[i][r] = vdupq_n_s32(0);
  const uint8x16_t low = vdupq_n_u8(15);
  const int8_t* x = a.xq + i0 * a.ldq;
  const int64_t ldq = a.ldq;
  for (int64_t p = 0; p < a.kq; p += kGroup4) {
#pragma GCC unroll 4
    for (int s = 0; s < 64; s += 16) {
      int8x16_t wl[4], wh[4];
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) {
        const uint8x16_t v = vld1q_u8(c[r] + p / 2 + s);
        wl[r] = vqtbl1q_s8(t[r], vandq_u8(v, low));
        wh[r] = vqtbl1q_s8(t[r], vshrq_n_u8(v, 4));
      }
#pragma GCC unroll 4
      for (int i = 0; i < MR; ++i) {
        const int8x16_t xl = vld1q_s8(x + i * ldq + p + s);
        const int8x16_t xh = vld1q_s8(x + i * ldq + p + 64 + s);
#pragma GCC unroll 4
        for (int r = 0; r < 4; ++r) acc[i][r] = dot16(dot16(acc[i][r], wl[r], xl), wh[r], xh);
      }
    }
  }
  const int32_t none[MR][4] = {};  // kq is whole groups: no tail
  store_dyn(a, acc, none, j, nj, i0);
}

// Rows of x against the four weight rows decoded into w (rows of kq bytes,
// in x's order): MR x 4 accumulators, each weight load serving MR rows. kq
// need not be a multiple of 16 (8-bit codes: kq = K): the rest is summed in
// scalars, since neither x's rows nor w's need hold anything past kq.
template <int MR>
void buf_tile(const DynArgs& a, const int8_t* w, int64_t j, int nj, int64_t i0) {
  int32x4_t acc[MR][4];
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) acc[i][r] = vdupq_n_s32(0);
  const int8_t* x = a.xq + i0 * a.ldq;
  const int64_t ldq = a.ldq, kq = a.kq;
  int64_t p = 0;
  for (; p + 16 <= kq; p += 16) {
    const int8x16_t w0 = vld1q_s8(w + p), w1 = vld1q_s8(w + kq + p);
    const int8x16_t w2 = vld1q_s8(w + 2 * kq + p), w3 = vld1q_s8(w + 3 * kq + p);
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) {
      const int8x16_t xv = vld1q_s8(x + i * ldq + p);
      acc[i][0] = dot16(acc[i][0], w0, xv);
      acc[i][1] = dot16(acc[i][1], w1, xv);
      acc[i][2] = dot16(acc[i][2], w2, xv);
      acc[i][3] = dot16(acc[i][3], w3, xv);
    }
  }
  int32_t tail[MR][4] = {};
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < 4; ++r)
      for (int64_t q = p; q < kq; ++q) tail[i][r] += int32_t(x[i * ldq + q]) * w[r * kq + q];
  store_dyn(a, acc, tail, j, nj, i0);
}

// Columns [n0, n1), four at a time; wq holds 4 * kq bytes of scratch. From
// four rows of x on, the four weight rows are decoded once into wq (L1) and
// every tile reads them there.
void dynamic4(const DynArgs& a, int64_t n0, int64_t n1, int8_t* wq) {
  const uint8x16_t low = vdupq_n_u8(15);
  for (int64_t j = n0; j < n1; j += 4) {
    const int nj = int(n1 - j < 4 ? n1 - j : 4);
    if (a.m < 4) {
      row_tiles<3>(a.m,
                   [&](auto rows, int64_t i) { dyn_tile<decltype(rows)::value>(a, j, nj, i); });
      continue;
    }
    for (int r = 0; r < 4; ++r) {
      const int64_t row = j + (r < nj ? r : 0);
      const int8x16_t t = vld1q_s8(a.cq + row * a.cq_ld);
      const uint8_t* c = a.codes + row * a.code_ld;
      int8_t* wr = wq + r * a.kq;
      for (int64_t p = 0; p < a.kq; p += kGroup4)
#pragma GCC unroll 4
        for (int s = 0; s < 64; s += 16) {
          const uint8x16_t v = vld1q_u8(c + p / 2 + s);
          vst1q_s8(wr + p + s, vqtbl1q_s8(t, vandq_u8(v, low)));
          vst1q_s8(wr + p + 64 + s, vqtbl1q_s8(t, vshrq_n_u8(v, 4)));
        }
    }
    row_tiles<4>(a.m,
                 [&](auto rows, int64_t i) { buf_tile<decltype(rows)::value>(a, wq, j, nj, i); });
  }
}

// 8-bit codes: four weight rows looked up into wq (rows of kq = K bytes)
// from the row's 256-entry int8 table, 16 registers: TBL over the first 64
// entries, TBX (which leaves lanes whose index is out of its range) over the
// next three quarters, each with the index moved down by 64 (wrapping, so
// codes below the quarter are out of range too). Then the dense tiles.
void dynamic8(const DynArgs& a, int64_t n0, int64_t n1, int8_t* wq) {
  const uint8x16_t q64 = vdupq_n_u8(64);
  const int64_t kq = a.kq;
  for (int64_t j = n0; j < n1; j += 4) {
    const int nj = int(n1 - j < 4 ? n1 - j : 4);
    for (int r = 0; r < 4; ++r) {
      const int64_t row = j + (r < nj ? r : 0);
      const int8_t* tab = a.cq + row * a.cq_ld;
      const int8x16x4_t t0 = vld1q_s8_x4(tab), t1 = vld1q_s8_x4(tab + 64);
      const int8x16x4_t t2 = vld1q_s8_x4(tab + 128), t3 = vld1q_s8_x4(tab + 192);
      const uint8_t* c = a.codes + row * a.code_ld;
      int8_t* wr = wq + r * kq;
      int64_t p = 0;
      for (; p + 16 <= kq; p += 16) {
        uint8x16_t v = vld1q_u8(c + p);
        int8x16_t wv = vqtbl4q_s8(t0, v);
        v = vsubq_u8(v, q64);
        wv = vqtbx4q_s8(wv, t1, v);
        v = vsubq_u8(v, q64);
        wv = vqtbx4q_s8(wv, t2, v);
        wv = vqtbx4q_s8(wv, t3, vsubq_u8(v, q64));
        vst1q_s8(wr + p, wv);
      }
      for (; p < kq; ++p) wr[p] = tab[c[p]];
    }
    row_tiles<4>(a.m,
                 [&](auto rows, int64_t i) { buf_tile<decltype(rows)::value>(a, wq, j, nj, i); });
  }
}

}  // namespace
}  // namespace cluster
}  // namespace pk
