// int4 family, torch-free API: linear layers over group-wise 4-bit weights.
//
// Weight format (the one pykernels.ops.int4 documents; the kernels read it as
// it is, nothing is prepacked): packed, uint8 [N, K / 2], byte j of row n
// holding column 2j in its low nibble and 2j + 1 in its high nibble (codes
// 0..15); scales, float32 [N, K / g]; zeros, uint8 [N, K / g] in 0..15;
// w_hat[n, k] = (q[n, k] - zeros[n, k / g]) * scales[n, k / g]. The group
// size g is 32, 64 or 128 and divides K.
#pragma once
#include <cstdint>

#include "../common/dtype.h"

namespace pk {
namespace int4 {

// Weight-only (W4A16): y[m, n] = sum_k x[m, k] * w_hat[n, k] + bias[n],
// w_hat exactly as above (one float32 rounding), accumulated in float32.
// x: M x K of type xt with row stride ldx; y: M x N of type yt, contiguous;
// bias may be null.
void linear_weight_only_cpu(const void* x, DType xt, int64_t m, int64_t k, int64_t ldx,
                            const uint8_t* packed, const float* scales, const uint8_t* zeros,
                            int64_t group, const float* bias, int64_t n, void* y, DType yt);

// Dynamic W4A8: each row of x quantized as int8::quantize_per_row_cpu does
// (a, a_scale); isum[m, n, g] = sum_{k in g} a[m, k] * (q[n, k] - zeros[n, g]),
// exact in int32; y[m, n] = a_scale[m] * sum_g scales[n, g] * isum[m, n, g]
// + bias[n], in float32.
void linear_dynamic_cpu(const void* x, DType xt, int64_t m, int64_t k, int64_t ldx,
                        const uint8_t* packed, const float* scales, const uint8_t* zeros,
                        int64_t group, const float* bias, int64_t n, void* y, DType yt);

}  // namespace int4
}  // namespace pk
