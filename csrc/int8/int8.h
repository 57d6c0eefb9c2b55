// int8 family, torch-free API: symmetric per-row quantization and the exact
// int8 x int8 -> int32 GEMM that the W8A8 layers are built on.
#pragma once
#include <cstdint>

namespace pk {
namespace int8 {

// K at or above this could overflow int32 (128 * 128 * K >= 2^31): refused.
constexpr int64_t kMaxK = 131072;

// scale[r] = max|x[r, :]| / 127 (fp32); q = round_half_even(x / scale),
// clamped to [-127, 127]; rows of zeros get scale 0 and q 0. Rows are `ld`
// elements apart. NaN/inf in a row make that row's scale NaN/inf.
void quantize_per_row_cpu(const float* x, int64_t rows, int64_t cols, int64_t ld, int8_t* q,
                          float* scale);

// c[m, n] = sum_k a[m, k] * b[n, k] in int32 (a: M x K, b: N x K, both
// row-major with leading dimensions lda / ldb; c: M x N with ldc). Exact.
void gemm_s8s8s32_cpu(const int8_t* a, const int8_t* b, int32_t* c, int64_t m, int64_t n, int64_t k,
                      int64_t lda, int64_t ldb, int64_t ldc);

}  // namespace int8
}  // namespace pk
