// Per-ISA part of the qat family: the row loops, written once in
// qat_generic.h and compiled by each ISA file with its own flags (nearbyint
// becomes one vroundps from SSE4.1 on, a libm call on the baseline). Nothing
// here uses the standard library, so no function compiled with wide-vector
// flags can leak into the portable path.
#pragma once
#include <cstdint>

namespace pk {
namespace qat {

struct Kernels {
  // Rows [r0, r1) of fake_quant_per_row_cpu.
  void (*fake_quant_rows)(const float* x, int64_t cols, int64_t ld, float* y, uint8_t* mask,
                          float* scale, int64_t r0, int64_t r1);
  // Elements [i0, i1) of fake_quant_backward_cpu.
  void (*backward)(const float* grad, const uint8_t* mask, float* out, int64_t i0, int64_t i1);
};

const Kernels* kernels_portable();
const Kernels* kernels_avx2();
const Kernels* kernels_avx512();

}  // namespace qat
}  // namespace pk
