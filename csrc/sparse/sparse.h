// sparse family, torch-free API: a sparse weight W [N, K] times dense
// activations, Y = X W^T (+ bias), and the two products its backward needs.
//
// Formats. CSR: row_ptr [N + 1] (int64), a column index per stored value
// (uint16 when K <= 65536, else int32: the index is a third of the bytes at
// 90% sparsity), values fp32. BSR: the same over rows of 4x4 blocks (block
// row b covers rows 4b..4b+3, block column c covers columns 4c..4c+3; values
// [nblocks, 4, 4] row-major). 4x4 because the kernels vectorise over M: each
// load of an activation row then serves four output rows, and the index is
// one per 16 values. N and K need not be multiples of 4: blocks past the
// edge hold zeros.
#pragma once
#include <cstdint>

namespace pk {
namespace sparse {

constexpr int kBlock = 4;

struct Matrix {
  int64_t n = 0, k = 0;              // W is n x k
  int block = 1;                     // 1: CSR, kBlock: BSR
  const int64_t* row_ptr = nullptr;  // rows (CSR) or block rows (BSR), +1
  const void* col = nullptr;         // per value (CSR) or per block (BSR)
  bool col16 = true;                 // uint16 columns, else int32
  const float* values = nullptr;
};

// y[m, n] = sum_k x[m, k] * W[n, k] + bias[n] (bias may be null).
// x: M x K with row stride ldx; y: M x N contiguous.
void linear_cpu(const Matrix& w, const float* x, int64_t m, int64_t ldx, const float* bias,
                float* y);

// Backward of linear_cpu (CSR only; BSR is expanded to CSR by the caller).
// dx (M x K, contiguous, may be null) = dy W; dvalues (may be null)[j] =
// sum_m dy[m, row(j)] * x[m, col(j)], the gradient of the stored values only.
void linear_backward_cpu(const Matrix& w, const float* dy, const float* x, int64_t m, int64_t ldx,
                         float* dx, float* dvalues);

}  // namespace sparse
}  // namespace pk
