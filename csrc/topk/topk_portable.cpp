// Portable scans: plain C++ over 64-element blocks, which compilers
// auto-vectorise for whatever baseline the build targets.
#include "../common/half.h"
#include "topk_scan.h"

namespace pk {
namespace topk {
namespace {

struct Portable {
  static uint64_t mask_u32(const uint32_t* p, uint32_t t) {
    uint64_t m = 0;
    for (int j = 0; j < 64; ++j) m |= uint64_t((p[j] & 0x7fffffffu) >= t) << j;
    return m;
  }
  static uint64_t mask_u16(const uint16_t* p, uint32_t t) {
    uint64_t m = 0;
    for (int j = 0; j < 64; ++j) m |= uint64_t(uint32_t(p[j] & 0x7fffu) >= t) << j;
    return m;
  }
  template <class Cvt, class K>
  static uint64_t ef(const K* x, float* r, uint32_t t, Cvt cvt) {
    uint64_t m = 0;
    for (int j = 0; j < 64; ++j) {
      const float y = cvt(x[j]) + r[j];
      r[j] = y;
      m |= uint64_t((f32_to_bits(y) & 0x7fffffffu) >= t) << j;
    }
    return m;
  }
  static uint64_t ef_f32(const uint32_t* x, float* r, uint32_t t) {
    return ef(x, r, t, [](uint32_t b) { return bits_to_f32(b); });
  }
  static uint64_t ef_f16(const uint16_t* x, float* r, uint32_t t) {
    return ef(x, r, t, [](uint16_t h) { return f16_to_f32(h); });
  }
  static uint64_t ef_bf16(const uint16_t* x, float* r, uint32_t t) {
    return ef(x, r, t, [](uint16_t h) { return bf16_to_f32(h); });
  }
};

}  // namespace

const ScanKernels* scan_kernels_portable() { return scan::make_scan_kernels<Portable>(); }

}  // namespace topk
}  // namespace pk
