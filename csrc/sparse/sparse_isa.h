// Per-ISA sparse kernels (see topk_isa.h for why nothing here touches the
// standard library). They read activations transposed, xt [K][MC] (MC
// columns of M, zero-padded), so that each stored value is MC / 16 vector
// FMAs; MC = 1 is the single-token path (a gather-reduce per row).
#pragma once
#include <cstdint>

#include "sparse.h"

namespace pk {
namespace sparse {

struct Kernels {
  // Rows (CSR) or block rows (BSR) [r0, r1): y[i * ldy + row] = sum + bias[row]
  // for i < mc, from xt [K][MC] with MC in {1, 16, 32} (the padded width).
  void (*forward)(const Matrix& w, const float* xt, int mc_pad, int64_t mc, const float* bias,
                  float* y, int64_t ldy, int64_t r0, int64_t r1);
  // CSR rows [r0, r1): dxt[col][i] += v * dyt[row][i] (dxt, dyt of width mc_pad).
  void (*backward_x)(const Matrix& w, const float* dyt, int mc_pad, float* dxt, int64_t r0,
                     int64_t r1);
  // CSR rows [r0, r1): dv[j] += sum_i dyt[row][i] * xt[col][i].
  void (*sddmm)(const Matrix& w, const float* dyt, const float* xt, int mc_pad, float* dv,
                int64_t r0, int64_t r1);
};

const Kernels* kernels_portable();
const Kernels* kernels_avx2();
const Kernels* kernels_avx512();
const Kernels* kernels_neon();  // aarch64: every Arm tier

}  // namespace sparse
}  // namespace pk
