// qat family, torch-free API: fused fake quantization for quantization-aware
// training, with exactly the int8 family's per-row rounding and scales.
#pragma once
#include <cstdint>

namespace pk {
namespace qat {

// One pass per row of x (rows x cols, row stride ld):
//   scale[r] = max|x[r, :]| / 127 (fp32, as pk::int8::quantize_per_row_cpu),
//   y[r, c]  = clamp(round_half_even(x / scale), -127, 127) * scale,
//   mask[r, c] = 1 where x / scale lies in the clipping range [-127.5, 127.5]
//   (the straight-through estimator passes the gradient there), else 0.
// A row of zeros has scale 0, y 0 and mask 1. A row holding NaN or inf has
// scale NaN or inf, y NaN and mask 0 (int8 gives NaN there too). y and mask
// are contiguous (row stride cols).
void fake_quant_per_row_cpu(const float* x, int64_t rows, int64_t cols, int64_t ld, float* y,
                            uint8_t* mask, float* scale);

// The straight-through backward: out[i] = mask[i] ? grad[i] : 0 over n
// contiguous elements.
void fake_quant_backward_cpu(const float* grad, const uint8_t* mask, int64_t n, float* out);

}  // namespace qat
}  // namespace pk
