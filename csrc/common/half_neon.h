// fp16 / bf16 -> fp32 on four NEON lanes, bit for bit as common/half.h's
// scalar conversions (static, for the same reason as half.h: only the Arm
// tier files include this). FCVTL is exact except on NaN, where it sets the
// quiet bit that the scalar conversion leaves clear in a signalling NaN; NaN
// lanes are rebuilt as the scalar code builds them, so what passes x's bits
// on (quant's absmax) agrees with the portable path there too.
#pragma once
#include <arm_neon.h>

namespace pk {

static inline float32x4_t f16x4_to_f32(uint16x4_t h) {
  const uint32x4_t hw = vmovl_u16(h);
  const uint32x4_t cvt = vreinterpretq_u32_f32(vcvt_f32_f16(vreinterpret_f16_u16(h)));
  const uint32x4_t is_nan = vcgtq_u32(vandq_u32(hw, vdupq_n_u32(0x7fff)), vdupq_n_u32(0x7c00));
  const uint32x4_t nan = vorrq_u32(
      vorrq_u32(vshlq_n_u32(vandq_u32(hw, vdupq_n_u32(0x8000)), 16), vdupq_n_u32(0x7f800000)),
      vshlq_n_u32(vandq_u32(hw, vdupq_n_u32(0x3ff)), 13));
  return vreinterpretq_f32_u32(vbslq_u32(is_nan, nan, cvt));
}

static inline float32x4_t bf16x4_to_f32(uint16x4_t h) {
  return vreinterpretq_f32_u32(vshll_n_u16(h, 16));
}

}  // namespace pk
