// Armv8-A Advanced SIMD quant loops, 16 elements per step; compiled with
// -march=armv8-a (and, as every quant file, -ffp-contract=off: GCC writes
// vmulq_f32 and vaddq_f32 as plain * and +, which it would otherwise fuse).
// The dotprod and i8mm tiers have nothing to add here and run this table.
// Tails go through the same vector body on a zero-padded copy, so the tail
// converts and rounds exactly as the body does.
#include <arm_neon.h>

#include "../common/half_neon.h"
#include "../common/hash.h"
#include "quant_isa.h"

namespace pk {
namespace quant {
namespace {

// The element type of a source dtype, for the padded tail copies.
template <DType DT>
struct Elem {
  using T = float;
};
template <>
struct Elem<DType::f16> {
  using T = uint16_t;
};
template <>
struct Elem<DType::bf16> {
  using T = uint16_t;
};

template <DType DT>
inline float32x4_t load4(const void* x, int64_t j) {
  if constexpr (DT == DType::f16) {
    return f16x4_to_f32(vld1_u16(static_cast<const uint16_t*>(x) + j));
  } else if constexpr (DT == DType::bf16) {
    return bf16x4_to_f32(vld1_u16(static_cast<const uint16_t*>(x) + j));
  } else {
    return vld1q_f32(static_cast<const float*>(x) + j);
  }
}

inline void copy_bytes(void* dst, const void* src, int64_t n) {
  unsigned char* d = static_cast<unsigned char*>(dst);
  const unsigned char* s = static_cast<const unsigned char*>(src);
  for (int64_t i = 0; i < n; ++i) d[i] = s[i];
}

// common/hash.h's lowbias32 on 4 lanes.
inline uint32x4_t lowbias32(uint32x4_t h) {
  h = veorq_u32(h, vshrq_n_u32(h, 16));
  h = vmulq_u32(h, vdupq_n_u32(kLowbias32Mul1));
  h = veorq_u32(h, vshrq_n_u32(h, 15));
  h = vmulq_u32(h, vdupq_n_u32(kLowbias32Mul2));
  h = veorq_u32(h, vshrq_n_u32(h, 16));
  return h;
}

// Max of the sign-cleared bits of y, 8 elements at a time; with EF,
// y = x + r and r = y.
template <DType DT, bool EF>
uint32_t absmax_bits_dt(const void* x, float* r, int64_t len) {
  using T = typename Elem<DT>::T;
  const uint32x4_t mask = vdupq_n_u32(0x7fffffff);
  uint32x4_t m0 = vdupq_n_u32(0), m1 = vdupq_n_u32(0);
  auto step = [&](const void* xs, float* rs, int64_t j) {
    float32x4_t a = load4<DT>(xs, j), b = load4<DT>(xs, j + 4);
    if constexpr (EF) {
      a = vaddq_f32(a, vld1q_f32(rs + j));
      b = vaddq_f32(b, vld1q_f32(rs + j + 4));
      vst1q_f32(rs + j, a);
      vst1q_f32(rs + j + 4, b);
    }
    m0 = vmaxq_u32(m0, vandq_u32(vreinterpretq_u32_f32(a), mask));
    m1 = vmaxq_u32(m1, vandq_u32(vreinterpretq_u32_f32(b), mask));
  };
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) step(x, r, j);
  if (j < len) {
    const int64_t cnt = len - j;
    // Zeros: y = 0 + 0 adds nothing to the max.
    alignas(16) T tx[8] = {};
    alignas(16) float tr[8] = {};
    copy_bytes(tx, static_cast<const T*>(x) + j, cnt * int64_t(sizeof(T)));
    if (EF) copy_bytes(tr, r + j, cnt * 4);
    step(tx, tr, 0);
    if (EF) copy_bytes(r + j, tr, cnt * 4);
  }
  return vmaxvq_u32(vmaxq_u32(m0, m1));
}

template <DType DT>
uint32_t absmax_bits_ef(const void* x, float* r, int64_t len) {
  return r ? absmax_bits_dt<DT, true>(x, r, len) : absmax_bits_dt<DT, false>(x, r, len);
}

uint32_t absmax_bits(const void* x, DType dtype, float* r, int64_t len) {
  switch (dtype) {
    case DType::f16:
      return absmax_bits_ef<DType::f16>(x, r, len);
    case DType::bf16:
      return absmax_bits_ef<DType::bf16>(x, r, len);
    default:
      return absmax_bits_ef<DType::f32>(x, r, len);
  }
}

struct QuantStep {
  float32x4_t inv, scale, lo_lim, hi_lim, two_m24;
  int32x4_t lim;
  uint32x4_t key, iota;

  // Codes (as int32) of 4 values y whose first element index is lo.
  template <bool ST>
  int32x4_t codes(float32x4_t y, uint32_t lo) const {
    const float32x4_t v = vmulq_f32(y, inv);
    float32x4_t q;
    if constexpr (ST) {
      const uint32x4_t h = lowbias32(veorq_u32(vaddq_u32(vdupq_n_u32(lo), iota), key));
      const float32x4_t u = vmulq_f32(vcvtq_f32_u32(vshrq_n_u32(h, 8)), two_m24);
      q = vrndmq_f32(vaddq_f32(v, u));
    } else {
      q = vrndnq_f32(v);  // rint: ties to even, the default rounding mode
    }
    // v is finite (the driver sends only finite buckets), so max/min see no
    // NaN and clamp as the portable compares do, -0.0 included.
    q = vminq_f32(vmaxq_f32(q, lo_lim), hi_lim);
    return vaddq_s32(vcvtq_s32_f32(q), lim);
  }
  // y - float(code - lim) * scale; from the integer code, not q, whose -0.0
  // would flip the sign of a zero remainder.
  float32x4_t remainder(float32x4_t y, int32x4_t c) const {
    return vsubq_f32(y, vmulq_f32(vcvtq_f32_s32(vsubq_s32(c, lim)), scale));
  }
};

// The low byte of each of 16 int32 (all in [0, 255]), in order.
inline uint8x16_t narrow16(int32x4_t a, int32x4_t b, int32x4_t c, int32x4_t d) {
  const uint16x8_t ab =
      vcombine_u16(vmovn_u32(vreinterpretq_u32_s32(a)), vmovn_u32(vreinterpretq_u32_s32(b)));
  const uint16x8_t cd =
      vcombine_u16(vmovn_u32(vreinterpretq_u32_s32(c)), vmovn_u32(vreinterpretq_u32_s32(d)));
  return vcombine_u8(vmovn_u16(ab), vmovn_u16(cd));
}

// 16 elements from src + j (of type DT) into codes + j, and r + j with EF:
// specialised on the source type, rounding and error feedback so the loop
// body has no branches; four hash chains in flight.
template <DType DT, bool ST, bool EF>
inline void quantize16(const QuantStep& s, const void* src, int64_t j, uint32_t lo, uint8_t* codes,
                       float* r) {
  const float32x4_t y0 = load4<DT>(src, j), y1 = load4<DT>(src, j + 4);
  const float32x4_t y2 = load4<DT>(src, j + 8), y3 = load4<DT>(src, j + 12);
  const int32x4_t c0 = s.codes<ST>(y0, lo), c1 = s.codes<ST>(y1, lo + 4u);
  const int32x4_t c2 = s.codes<ST>(y2, lo + 8u), c3 = s.codes<ST>(y3, lo + 12u);
  vst1q_u8(codes + j, narrow16(c0, c1, c2, c3));
  if constexpr (EF) {
    vst1q_f32(r + j, s.remainder(y0, c0));
    vst1q_f32(r + j + 4, s.remainder(y1, c1));
    vst1q_f32(r + j + 8, s.remainder(y2, c2));
    vst1q_f32(r + j + 12, s.remainder(y3, c3));
  }
}

template <DType DT, bool ST, bool EF>
void quantize_dt(const QuantStep& s, const void* src, int64_t len, uint32_t lo, uint8_t* codes,
                 float* r) {
  int64_t j = 0;
  for (; j + 16 <= len; j += 16) quantize16<DT, ST, EF>(s, src, j, lo + uint32_t(j), codes, r);
  if (j < len) {
    using T = typename Elem<DT>::T;
    const int64_t cnt = len - j;
    alignas(16) T tx[16] = {};
    alignas(16) float tr[16];
    alignas(16) uint8_t tc[16];
    copy_bytes(tx, static_cast<const T*>(src) + j, cnt * int64_t(sizeof(T)));
    quantize16<DT, ST, EF>(s, tx, 0, lo + uint32_t(j), tc, tr);
    copy_bytes(codes + j, tc, cnt);
    if (EF) copy_bytes(r + j, tr, cnt * 4);
  }
}

template <DType DT>
void quantize_st(const QuantStep& s, bool stochastic, const void* src, int64_t len, uint32_t lo,
                 uint8_t* codes, float* r) {
  if (stochastic)
    return r ? quantize_dt<DT, true, true>(s, src, len, lo, codes, r)
             : quantize_dt<DT, true, false>(s, src, len, lo, codes, r);
  return r ? quantize_dt<DT, false, true>(s, src, len, lo, codes, r)
           : quantize_dt<DT, false, false>(s, src, len, lo, codes, r);
}

void quantize(const void* src, DType dtype, int64_t len, float inv, float scale, int32_t lim,
              bool stochastic, uint32_t lo, uint32_t key, uint8_t* codes, float* r) {
  static const uint32_t kIota[4] = {0, 1, 2, 3};
  QuantStep s;
  s.inv = vdupq_n_f32(inv);
  s.scale = vdupq_n_f32(scale);
  s.lo_lim = vdupq_n_f32(-float(lim));
  s.hi_lim = vdupq_n_f32(float(lim));
  s.two_m24 = vdupq_n_f32(5.9604644775390625e-8f);
  s.lim = vdupq_n_s32(lim);
  s.key = vdupq_n_u32(key);
  s.iota = vld1q_u32(kIota);
  switch (dtype) {
    case DType::f16:
      return quantize_st<DType::f16>(s, stochastic, src, len, lo, codes, r);
    case DType::bf16:
      return quantize_st<DType::bf16>(s, stochastic, src, len, lo, codes, r);
    default:
      return quantize_st<DType::f32>(s, stochastic, src, len, lo, codes, r);
  }
}

// out (+)= float(code - lim) * scale for 16 codes.
template <bool ACC>
inline void dequantize16(const uint8_t* c, float32x4_t vs, int32x4_t vl, float* o) {
  const uint8x16_t b = vld1q_u8(c);
  const uint16x8_t lo = vmovl_u8(vget_low_u8(b)), hi = vmovl_u8(vget_high_u8(b));
  auto put = [&](uint16x4_t w, float* d) {
    float32x4_t v =
        vmulq_f32(vcvtq_f32_s32(vsubq_s32(vreinterpretq_s32_u32(vmovl_u16(w)), vl)), vs);
    if constexpr (ACC) v = vaddq_f32(vld1q_f32(d), v);
    vst1q_f32(d, v);
  };
  put(vget_low_u16(lo), o);
  put(vget_high_u16(lo), o + 4);
  put(vget_low_u16(hi), o + 8);
  put(vget_high_u16(hi), o + 12);
}

template <bool ACC>
void dequantize_acc(const uint8_t* codes, int64_t len, float scale, int32_t lim, float* out) {
  const float32x4_t vs = vdupq_n_f32(scale);
  const int32x4_t vl = vdupq_n_s32(lim);
  int64_t j = 0;
  for (; j + 16 <= len; j += 16) dequantize16<ACC>(codes + j, vs, vl, out + j);
  if (j < len) {
    const int64_t cnt = len - j;
    alignas(16) uint8_t tc[16] = {};
    alignas(16) float to[16] = {};
    copy_bytes(tc, codes + j, cnt);
    if (ACC) copy_bytes(to, out + j, cnt * 4);
    dequantize16<ACC>(tc, vs, vl, to);
    copy_bytes(out + j, to, cnt * 4);
  }
}

void dequantize(const uint8_t* codes, int64_t len, float scale, int32_t lim, float* out,
                bool accumulate) {
  if (accumulate) return dequantize_acc<true>(codes, len, scale, lim, out);
  dequantize_acc<false>(codes, len, scale, lim, out);
}

}  // namespace

const Kernels* kernels_neon() {
  static const Kernels table{
      .absmax_bits = &absmax_bits, .quantize = &quantize, .dequantize = &dequantize};
  return &table;
}

}  // namespace quant
}  // namespace pk
