// Portable quant loops: plain C++ that compilers auto-vectorise for whatever
// baseline the build targets. The reference semantics of quant.h, element by
// element.
#include "../common/half.h"
#include "../common/hash.h"
#include "quant_isa.h"

namespace pk {
namespace quant {
namespace {

inline float load(const void* x, DType dtype, int64_t j) {
  switch (dtype) {
    case DType::f16:
      return f16_to_f32(static_cast<const uint16_t*>(x)[j]);
    case DType::bf16:
      return bf16_to_f32(static_cast<const uint16_t*>(x)[j]);
    default:
      return static_cast<const float*>(x)[j];
  }
}

uint32_t absmax_bits(const void* x, DType dtype, float* r, int64_t len) {
  uint32_t m = 0;
  for (int64_t j = 0; j < len; ++j) {
    float y = load(x, dtype, j);
    if (r) {
      y = y + r[j];
      r[j] = y;
    }
    const uint32_t b = f32_to_bits(y) & 0x7fffffffu;
    m = b > m ? b : m;
  }
  return m;
}

void quantize(const void* src, DType dtype, int64_t len, float inv, float scale, int32_t lim,
              bool stochastic, uint32_t lo, uint32_t key, uint8_t* codes, float* r) {
  const float fl = float(lim);
  for (int64_t j = 0; j < len; ++j) {
    const float y = load(src, dtype, j);
    const float v = y * inv;
    float q;
    if (stochastic) {
      const uint32_t h = lowbias32((lo + uint32_t(j)) ^ key);
      const float u = float(h >> 8) * 5.9604644775390625e-8f;
      q = __builtin_floorf(v + u);
    } else {
      q = __builtin_rintf(v);
    }
    q = q < -fl ? -fl : q;
    q = q > fl ? fl : q;
    const int32_t c = int32_t(q) + lim;
    codes[j] = uint8_t(c);
    if (r) r[j] = y - float(c - lim) * scale;
  }
}

void dequantize(const uint8_t* codes, int64_t len, float scale, int32_t lim, float* out,
                bool accumulate) {
  if (accumulate) {
    for (int64_t j = 0; j < len; ++j) out[j] = out[j] + float(int32_t(codes[j]) - lim) * scale;
  } else {
    for (int64_t j = 0; j < len; ++j) out[j] = float(int32_t(codes[j]) - lim) * scale;
  }
}

}  // namespace

const Kernels* kernels_portable() {
  static const Kernels table{
      .absmax_bits = &absmax_bits, .quantize = &quantize, .dequantize = &dequantize};
  return &table;
}

}  // namespace quant
}  // namespace pk
