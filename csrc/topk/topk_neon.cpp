// Armv8-A Advanced SIMD scans; compiled with -march=armv8-a only in this
// file. The dotprod and i8mm tiers have nothing to add to a compare-and-mask
// scan, so this table serves them too (isa_pick.h falls back to it).
// NEON compares unsigned directly, so key >= t needs no signed rewrite; its
// one gap is a movemask, built below from byte lanes and pairwise adds.
#include <arm_neon.h>

#include "../common/half_neon.h"
#include "topk_scan.h"

namespace pk {
namespace topk {
namespace {

// Bit j of the result is lane j of the 64 byte lanes (each 0 or 0xff) of
// a, b, c, d: each lane keeps its weight 1 << (j % 8), then three rounds of
// pairwise adds sum every 8 consecutive lanes into one byte, in order.
inline uint64_t movemask64(uint8x16_t a, uint8x16_t b, uint8x16_t c, uint8x16_t d) {
  static const uint8_t kWeights[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
  const uint8x16_t w = vld1q_u8(kWeights);
  const uint8x16_t ab = vpaddq_u8(vandq_u8(a, w), vandq_u8(b, w));
  const uint8x16_t cd = vpaddq_u8(vandq_u8(c, w), vandq_u8(d, w));
  const uint8x16_t s = vpaddq_u8(ab, cd);
  return vgetq_lane_u64(vreinterpretq_u64_u8(vpaddq_u8(s, s)), 0);
}

// 16 lanes of 32-bit compare results (4 vectors, in order) as 16 byte lanes.
inline uint8x16_t narrow32(uint32x4_t c0, uint32x4_t c1, uint32x4_t c2, uint32x4_t c3) {
  const uint16x8_t lo = vcombine_u16(vmovn_u32(c0), vmovn_u32(c1));
  const uint16x8_t hi = vcombine_u16(vmovn_u32(c2), vmovn_u32(c3));
  return vcombine_u8(vmovn_u16(lo), vmovn_u16(hi));
}

struct Neon {
  static uint64_t mask_u32(const uint32_t* p, uint32_t t) {
    const uint32x4_t vm = vdupq_n_u32(0x7fffffff), vt = vdupq_n_u32(t);
    auto group = [&](const uint32_t* s) {
      return narrow32(vcgeq_u32(vandq_u32(vld1q_u32(s), vm), vt),
                      vcgeq_u32(vandq_u32(vld1q_u32(s + 4), vm), vt),
                      vcgeq_u32(vandq_u32(vld1q_u32(s + 8), vm), vt),
                      vcgeq_u32(vandq_u32(vld1q_u32(s + 12), vm), vt));
    };
    return movemask64(group(p), group(p + 16), group(p + 32), group(p + 48));
  }
  static uint64_t mask_u16(const uint16_t* p, uint32_t t) {
    // Keys are at most 0x7fff: a threshold past 16 bits (outside what the
    // driver sends) passes none, as the saturated 0xffff does and as the
    // portable scan's 32-bit compare would.
    const uint16x8_t vm = vdupq_n_u16(0x7fff),
                     vt = vdupq_n_u16(uint16_t(t > 0xffffu ? 0xffffu : t));
    auto group = [&](const uint16_t* s) {
      return vcombine_u8(vmovn_u16(vcgeq_u16(vandq_u16(vld1q_u16(s), vm), vt)),
                         vmovn_u16(vcgeq_u16(vandq_u16(vld1q_u16(s + 8), vm), vt)));
    };
    return movemask64(group(p), group(p + 16), group(p + 32), group(p + 48));
  }
  // Four elements q: y = load(q) + r, r = y, and the compare of y's key.
  template <class Load>
  static uint64_t ef(Load load, float* r, uint32_t t) {
    const uint32x4_t vm = vdupq_n_u32(0x7fffffff), vt = vdupq_n_u32(t);
    auto step = [&](int q) {
      const float32x4_t y = vaddq_f32(load(q), vld1q_f32(r + 4 * q));
      vst1q_f32(r + 4 * q, y);
      return vcgeq_u32(vandq_u32(vreinterpretq_u32_f32(y), vm), vt);
    };
    auto group = [&](int q) { return narrow32(step(q), step(q + 1), step(q + 2), step(q + 3)); };
    return movemask64(group(0), group(4), group(8), group(12));
  }
  static uint64_t ef_f32(const uint32_t* x, float* r, uint32_t t) {
    return ef([&](int q) { return vreinterpretq_f32_u32(vld1q_u32(x + 4 * q)); }, r, t);
  }
  static uint64_t ef_f16(const uint16_t* x, float* r, uint32_t t) {
    return ef([&](int q) { return f16x4_to_f32(vld1_u16(x + 4 * q)); }, r, t);
  }
  static uint64_t ef_bf16(const uint16_t* x, float* r, uint32_t t) {
    return ef([&](int q) { return bf16x4_to_f32(vld1_u16(x + 4 * q)); }, r, t);
  }
};

}  // namespace

const ScanKernels* scan_kernels_neon() { return scan::make_scan_kernels<Neon>(); }

}  // namespace topk
}  // namespace pk
